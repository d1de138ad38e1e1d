"""A segmentation request: for the local backend the files it needs and the ``causalclipseg predict`` command, for
a MONAI Label server the ``/infer`` parameters.

A job folder holds everything one run needs and leaves behind, so that a failed run can be repeated by hand::

    job/
      input.nii.gz      the volume, on its exact geometry (see :mod:`.volume_io`)
      prompt.txt        the prompt (any punctuation is safe in a file)
      request.json      prompt, prompt side, device, threshold, model, model config, checkpoint, explain, flip TTA,
                        input and output paths
      output/           where ``causalclipseg predict`` (or ``causalclipseg worker``) writes ``input_mask.nii.gz``, and
                        with ``explain`` ``input_probability.nii.gz`` and ``input_causal_mask.nii.gz``

The command is built from ``request.json`` alone, and the model worker (:mod:`.worker`) is sent its path, so that the
file is the single record of what was asked.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .volume_io import write_volume

__all__ = ["DEVICES", "PROMPT_SIDES", "EXAMPLE_PROMPTS", "SegmentationRequest", "LocalJob",
           "prepare_job", "load_request", "build_predict_command", "child_environment"]

DEVICES = ("auto", "cpu", "cuda")

# Whose left "left" in a prompt is: the patient's (as clinicians say; the default of every front door) or the viewer's
# (the screen's left, as QaTa-COV19's captions are written). The same values as causalclipseg.data.prompts.PROMPT_SIDES,
# repeated because this Lib must not import the package (Slicer's Python may not have it).
PROMPT_SIDES = ("patient", "viewer")

# Prompts in the style the shipped model was trained on (QaTa-COV19 chest X-ray reports): where, how many, which side.
# Their sides are read as the request's prompt_side says (the patient's by default).
EXAMPLE_PROMPTS = (
    "Bilateral pulmonary infection, two infected areas, lower left lung and lower right lung.",
    "Unilateral pulmonary infection, one infected area, lower left lung.",
    "Unilateral pulmonary infection, one infected area, middle right lung.",
    "Bilateral pulmonary infection, multiple infected areas, all left lung and all right lung.",
)

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
REQUEST_FILE = "request.json"
PROMPT_FILE = "prompt.txt"
INPUT_FILE = "input.nii.gz"
OUTPUT_DIR = "output"


@dataclass(frozen=True)
class SegmentationRequest:
    """What to segment and how.

    Args:
        prompt: the text describing what to segment.
        device: ``auto`` (GPU when present), ``cpu``, ``cuda`` or ``cuda:N``.
        threshold: probability from which (>=) a voxel is in the segment, in (0, 1).
        model: model variant; ``None`` lets the package pick its default.
        model_config: a model config file (or folder) that registers ``model`` when the package does not ship it (a
            variant trained with ``causalclipseg train --model-config``); ``None``: none.
        checkpoint: weights file; ``None`` uses the weights shipped with the package.
        prompt_side: whose left "left" in the prompt is: ``patient`` (as clinicians say; in Slicer's default views the
            patient's left is on the screen's right) or ``viewer`` (the screen's sides, as QaTa-COV19's captions).
        explain: also write the lesion probability and the causal mask as float maps on the input's grid
            (``causalclipseg predict --explain``; local backend only).
        flip_tta: average the prediction with the one on the image mirrored left-right under the prompt with its
            sides swapped (``causalclipseg predict --flip-tta``; twice the time).

    Raises:
        ValueError: for an empty prompt, an unknown device, a threshold outside (0, 1), an unknown prompt side, or an
            ``explain`` or ``flip_tta`` that is not a boolean.
    """

    prompt: str
    device: str = "auto"
    threshold: float = 0.5
    model: str | None = None
    checkpoint: str | None = None
    prompt_side: str = "patient"
    explain: bool = False
    flip_tta: bool = False
    model_config: str | None = None

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise ValueError("the prompt is empty: type what to segment, e.g. 'lesion in the lower left lung'")
        if not _DEVICE.match(self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be between 0 and 1 (exclusive), got {self.threshold}")
        if self.prompt_side not in PROMPT_SIDES:
            raise ValueError(f"prompt_side must be patient or viewer (whose left 'left' means), "
                             f"got {self.prompt_side!r}")
        for name in ("explain", "flip_tta"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("checkpoint", "model", "model_config"):  # blank: not given
            if getattr(self, name) is not None and not getattr(self, name).strip():
                object.__setattr__(self, name, None)

    def server_params(self) -> dict[str, str | float | bool]:
        """The ``params`` of a MONAI Label ``/infer`` request: prompt, prompt side, device, threshold and flip TTA."""
        return {"prompt": self.prompt, "prompt_side": self.prompt_side, "device": self.device,
                "threshold": self.threshold, "flip_tta": self.flip_tta}


@dataclass(frozen=True)
class LocalJob:
    """The files of one prepared local run."""

    folder: Path
    request_file: Path
    input_file: Path
    output_dir: Path

    @property
    def mask_file(self) -> Path:
        """Where ``causalclipseg predict`` writes the mask for :attr:`input_file`."""
        return self.output_dir / "input_mask.nii.gz"

    @property
    def explanation_files(self) -> dict[str, Path]:
        """Where ``causalclipseg predict --explain`` writes its float maps for :attr:`input_file`, by kind."""
        return {"probability": self.output_dir / "input_probability.nii.gz",
                "causal mask": self.output_dir / "input_causal_mask.nii.gz"}


def prepare_job(folder: str | os.PathLike, request: SegmentationRequest, array_kji: np.ndarray,
                ijk_to_ras: np.ndarray) -> LocalJob:
    """Write the volume, the prompt and ``request.json`` into ``folder`` (created if needed).

    Args:
        folder: the job folder; an earlier job's files there are replaced.
        request: what to segment.
        array_kji: the scalar volume, (K, J, I) as Slicer gives it; (1, J, I) for a single picture.
        ijk_to_ras: its 4x4 geometry.

    Raises:
        ValueError: for a bad array or matrix (see :func:`.volume_io.write_volume`).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    input_file = write_volume(folder / INPUT_FILE, array_kji, ijk_to_ras)
    (folder / PROMPT_FILE).write_text(request.prompt.strip() + "\n", encoding="utf-8")
    output_dir = folder / OUTPUT_DIR
    output_dir.mkdir(exist_ok=True)
    record = {**asdict(request), "input": str(input_file), "prompt_file": str(folder / PROMPT_FILE),
              "output_dir": str(output_dir)}
    request_file = folder / REQUEST_FILE
    request_file.write_text(json.dumps(record, indent=2), encoding="utf-8")
    return LocalJob(folder, request_file, input_file, output_dir)


def load_request(request_file: str | os.PathLike) -> dict:
    """Read ``request.json``, checking its fields; a request written before ``prompt_side``, ``explain`` or
    ``flip_tta`` existed gets ``patient``, ``false`` and ``false``.

    Raises:
        ValueError: if the file is not a request written by :func:`prepare_job`.
    """
    try:
        record = json.loads(Path(request_file).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read the request {request_file}: {err}") from err
    missing = [key for key in ("prompt", "device", "threshold", "input", "prompt_file", "output_dir")
               if key not in record]
    if missing:
        raise ValueError(f"the request {request_file} lacks {', '.join(missing)}")
    record.setdefault("prompt_side", "patient")
    record.setdefault("explain", False)
    record.setdefault("flip_tta", False)
    SegmentationRequest(record["prompt"], record["device"], record["threshold"], record.get("model"),
                        record.get("checkpoint"), record["prompt_side"], record["explain"],
                        record["flip_tta"], record.get("model_config"))  # validates
    return record


def build_predict_command(python: str | os.PathLike, request_file: str | os.PathLike) -> list[str]:
    """``python -m causalclipseg.cli predict INPUT --prompt-file ... --prompt-side ... ... [--explain] [--flip-tta]``
    for a request file.

    Args:
        python: the interpreter that has the ``causalclipseg`` package (Slicer's ``PythonSlicer``, or another).
        request_file: ``request.json`` from :func:`prepare_job`.

    Raises:
        ValueError: if the request file is invalid.
    """
    record = load_request(request_file)
    command = [str(python), "-m", "causalclipseg.cli", "predict", record["input"],
               "--prompt-file", record["prompt_file"], "--prompt-side", record["prompt_side"],
               "--output-dir", record["output_dir"],
               "--device", record["device"], "--threshold", repr(float(record["threshold"])), "--overwrite"]
    if record.get("model"):
        command += ["--model", record["model"]]
    if record.get("model_config"):
        command += ["--model-config", record["model_config"]]
    if record.get("checkpoint"):
        command += ["--checkpoint", record["checkpoint"]]
    if record["explain"]:
        command.append("--explain")
    if record["flip_tta"]:
        command.append("--flip-tta")
    return command


def child_environment(base: Mapping[str, str], own_interpreter: bool) -> dict[str, str]:
    """The environment for the predict process.

    Slicer sets ``PYTHONHOME``/``PYTHONPATH`` for its own interpreter; another interpreter (a conda or venv
    Python chosen by the user) breaks with them, so they are dropped unless ``own_interpreter`` is true.
    """
    env = dict(base)
    if not own_interpreter:
        for key in ("PYTHONHOME", "PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONSTARTUP"):
            env.pop(key, None)
    env["PYTHONIOENCODING"] = "utf-8"
    return env
