"""The infer task: the MONAI bundle in ``bundle/`` served by MONAI Label, with the prompt set per request.

MONAI Label's ``BundleInferTask`` reads the bundle (``configs/inference.json``, ``configs/metadata.json``,
``models/model.pt``) and builds its ``network_def`` (the CausalCLIPSeg model). The bundle declares the package's one
inference path (:mod:`causalclipseg.inference.predictor`); this task runs it with what a per-request prompt needs:

- the request's ``prompt`` (default: the bundle's) and ``prompt_side`` (``patient``, the default: "left" is the
  patient's left; or ``viewer``) are checked by the first pre-transform (:class:`PromptTokensd`); the image path
  goes through the input policy every front door shares (:func:`causalclipseg.io.inputs.list_inputs`: one file or
  one DICOM series); the bundle's ``preprocessing`` (``LoadSegmentableImaged``, ``WarnUnverifiableSided``,
  ``DisplayOrientationd``; not its ``ModelTokensd``, see below) then reads it and brings it to display orientation;
  an empty prompt or an unreadable image is a
  :class:`~lib.common.BadRequestError` (HTTP 400);
- the bundle's ``inferer`` (:class:`~causalclipseg.inference.inferer.SliceWiseInferer`: batches of slices
  preprocessed on the request's device) runs the served model with the request's tokens bound by
  ``functools.partial`` (MONAI Label calls ``inferer(inputs, network)``): the prompt translated to the served
  weights' laterality convention; the network is shared between requests, so no per-request state is stored in it;
- the bundle's ``postprocessing`` (back to the input's grid, sigmoid, threshold; its file writer left out) runs
  with the request's
  ``threshold``; the label is written on the request image's grid (:meth:`TextPromptSegmentation.writer`, with the
  package's :func:`~causalclipseg.io.writers.write_mask`) in the
  app's own folder, never in the system temp folder: MONAI Label's client saves a result as ``<its temp
  folder>/<the server's file name>`` and the ``/infer`` endpoint deletes the server's file after answering, so with
  a local client (both in the system temp folder) that clean-up would delete the user's copy;
- explanations on request: MONAI Label answers one file per request, so the request's ``result_map`` chooses it:
  ``mask`` (the default), or one of the served model's ``explanation_maps``: ``probability``, and ``causal_mask``
  for a model with a causal module (``/info`` lists the served model's choices). For a map the network is the
  model's ``explain`` (the bundle's ``explain`` knob does the same), whose causal mask the bundle's postprocessing
  (``SplitExplanationd``) brings back to the input's grid beside the lesion probability, and the file is that map,
  float32 in [0, 1] on the request image's grid (:func:`~causalclipseg.io.writers.write_nifti`): the values
  ``causalclipseg predict --explain`` writes.

The bundle's configs are parsed once, at start; requests do not re-parse them, so concurrent requests are safe.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import AsDiscreted, Compose, SaveImaged
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.utils.others.generic import device_map, name_to_device, strtobool

from causalclipseg.data.prompts import check_prompt_side
from causalclipseg.factory import load_state_dict
from causalclipseg.inference.predictor import SplitExplanationd, inference_ready
from causalclipseg.inference.prompts import ModelTokensd, mirrored_model_tokens, model_tokens
from causalclipseg.inference.tta import MirrorAveraged, check_mirrorable
from causalclipseg.io.inputs import PICTURE_SUFFIXES, file_suffix, list_inputs
from causalclipseg.io.writers import EXPLANATION_MAPS, SaveMaskd, write_mask, write_nifti
from causalclipseg.tokenizer import validate_prompt

from .common import BadRequestError, describe_source

logger = logging.getLogger(__name__)

__all__ = ["PromptTokensd", "TextPromptSegmentation", "RESULT_EXTENSIONS", "RESULT_MAPS"]

#: label file formats a request may ask for with ``result_extension``
RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".png")
#: what a request may ask for with ``result_map``: the mask (the default), or one of the explanation maps (the
#: served model's ``explanation_maps``)
RESULT_MAPS = ("mask", *EXPLANATION_MAPS)



def _usable_device(name: str) -> bool:
    """Whether torch can run on ``name`` here (MONAI Label has already mapped ``cuda`` to ``cpu`` without CUDA)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index is None or device.index < torch.cuda.device_count())
    return device.type == "cpu"


def _affine_4x4(image: torch.Tensor) -> np.ndarray:
    """The voxel-to-RAS matrix MONAI's reader gave ``image``, as 4x4 (a 2-D affine gets a unit third axis)."""
    affine = np.asarray(getattr(image, "affine", np.eye(4)), dtype=np.float64)
    if affine.shape == (3, 3):
        full = np.eye(4)
        full[:2, :2], full[:2, 3] = affine[:2, :2], affine[:2, 2]
        affine = full
    return affine


class PromptTokensd:
    """First pre-transform: checks the request's knobs.

    ``data["prompt"]`` must be text the tokenizer takes; ``data["prompt_side"]`` (``patient``, the default, or
    ``viewer``: whose left the prompt's "left" is); ``data["threshold"]`` -> float in (0, 1); ``data["result_map"]``
    (``mask``, the default, or an explanation map: :data:`RESULT_MAPS`); ``data["flip_tta"]`` -> bool (``true`` or
    ``false``, as a JSON boolean or text; missing: ``false``). The token ids are made when the served
    network is known (:meth:`TextPromptSegmentation._get_network`), in its weights' convention.

    Args:
        tokenize: the model's tokenizer (validates the prompt).

    Raises:
        BadRequestError: for a prompt that is not text or is empty, an unknown prompt side, a threshold outside
            (0, 1), an unknown result map, a map asked for as a PNG, or a flip_tta that is not true or false.
    """

    def __init__(self, tokenize: Callable[[str], torch.Tensor]) -> None:
        self.tokenize = tokenize

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        side = d.get("prompt_side")
        if isinstance(side, (list, tuple)):  # the config's list of choices, sent back as it is: its first
            side = side[0] if side else None
        d["prompt_side"] = side or "patient"
        try:
            check_prompt_side(d["prompt_side"])
        except ValueError as err:
            raise BadRequestError(str(err)) from err
        try:
            self.tokenize(validate_prompt(d.get("prompt")))
        except (TypeError, ValueError) as err:
            raise BadRequestError(f"{err}; send params {{\"prompt\": \"what to segment\"}}") from err
        threshold = d.get("threshold")
        try:
            d["threshold"] = float(threshold)
        except (TypeError, ValueError):
            d["threshold"] = float("nan")
        if not 0.0 < d["threshold"] < 1.0:
            raise BadRequestError(f"threshold must be a number in (0, 1), got {threshold!r}")
        flip_tta = d.get("flip_tta", False)
        if str(flip_tta).lower() not in ("true", "false"):
            raise BadRequestError(f"flip_tta must be true or false, got {flip_tta!r}")
        d["flip_tta"] = str(flip_tta).lower() == "true"
        result_map = d.get("result_map")
        if isinstance(result_map, (list, tuple)):  # the config's list of choices, sent back as it is: its first
            result_map = result_map[0] if result_map else None
        d["result_map"] = result_map = result_map or "mask"
        if result_map not in RESULT_MAPS:
            raise BadRequestError(f"result_map must be one of {', '.join(RESULT_MAPS)}, got {result_map!r}")
        if result_map != "mask" and d.get("result_extension") == ".png":
            raise BadRequestError(f"result_map {result_map} is a float32 map, which a PNG cannot hold: ask for "
                                  f"result_extension .nii.gz, .nii or .nrrd")
        return d


class _RequestImaged:
    """Runs the bundle's loading transforms; an image they cannot read is the request's fault (HTTP 400)."""

    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, data: dict) -> dict:
        source = data.get("image")
        if not isinstance(source, str):
            raise BadRequestError(f"image must be a file path, a datastore image id or an upload, got "
                                  f"{type(source).__name__}")
        try:
            found = list_inputs(source)  # the input policy of every front door: a file, or one DICOM series
            if len(found) != 1:
                raise ValueError(f"{source} holds {len(found)} images: send one image or one DICOM series per "
                                 f"request")
            for transform in self.transforms:
                data = transform(data)
        except (ValueError, FileNotFoundError) as err:
            raise BadRequestError(describe_source(str(err), source)) from err
        return data


class TextPromptSegmentation(BundleInferTask):
    """The bundle served with a prompt per request; the label comes back on the request image's grid.

    Config (``/info``, settable per request): ``prompt`` (default: the bundle's, or ``--conf prompt``),
    ``threshold`` (default: the bundle's), ``device`` (``auto``, ``cpu``, ``cuda``), ``result_map`` (``mask``, or one of
    the served model's ``explanation_maps``: which volume the answer's file holds), ``flip_tta`` (default: the
    bundle's; the prediction averaged with the one on the mirrored image under the mirrored prompt), and MONAI Label's
    ``result_extension`` (``.png`` for a picture's mask, ``.nii.gz`` otherwise; also ``.nii`` and ``.nrrd``).

    Args:
        bundle_dir: the MONAI bundle (``configs/``, ``models/model.pt``).
        conf: the app's ``--conf`` options.
        weights: weight files, oldest first; the last one that exists is served and reloaded when it changes (the
            base weights, then the fine-tuned ones the train task publishes).
        label_dir: the app's folder for the label files being answered (created when needed); MONAI Label deletes
            each after sending it. Not the system temp folder, where a local client saves its copy under that name.
        model_name: the variant (``network_def``'s ``model_name``); ``None`` keeps the bundle's.
        prompt: the default prompt; ``None`` keeps the bundle's.

    Raises:
        ValueError: if the bundle cannot be served.
    """

    def __init__(self, bundle_dir: str | os.PathLike, conf: dict, weights: Sequence[str | os.PathLike],
                 label_dir: str | os.PathLike, model_name: str | None = None, prompt: str | None = None) -> None:
        self._model_name = model_name
        self.label_dir = Path(label_dir)
        preload = strtobool(str(conf.get("preload", "false")))
        conf = {k: v for k, v in conf.items() if k != "preload"}  # loaded below, once the weights are set
        super().__init__(str(bundle_dir), conf, type=InferType.SEGMENTATION, add_post_restore=False,
                         load_strict=True)
        if not self.valid:
            raise ValueError(f"bundle {bundle_dir} cannot be served: it needs configs/inference.json, "
                             f"configs/metadata.json and models/model.pt")
        self.path = [str(w) for w in weights]
        self._config.pop("model_filename", None)  # MONAI Label's per-request file choice would bypass self.path
        default_prompt = prompt if prompt is not None else self.bundle_config.get_parsed_content("prompt_text")
        PromptTokensd(self.network.tokenize)({"prompt": default_prompt, "threshold": 0.5})  # fail at start
        self._config.update({"prompt": default_prompt, "prompt_side": ["patient", "viewer"],
                             "threshold": float(self.bundle_config["threshold"]),
                             "result_map": ["mask", *self.network.explanation_maps],
                             "flip_tta": bool(self.bundle_config.get("flip_tta", False))})

        parsed = self.bundle_config.get_parsed_content
        pre = parsed(self.const.key_preprocessing()[0])
        post = parsed(self.const.key_postprocessing()[0])
        # the request's tokens are bound to the served weights in _get_network, not made by the bundle's ModelTokensd
        pre = pre.transforms if isinstance(pre, Compose) else pre
        self._pre = [t for t in pre if not isinstance(t, ModelTokensd)]
        post = list(post.transforms) if isinstance(post, Compose) else list(post)
        self._post = [t for t in post if not isinstance(t, (SaveImaged, SaveMaskd))]  # the task writes the label
        self._inferer = parsed(self.const.key_inferer()[0])
        self._inferer.device = None  # slices go where MONAI Label put the request's input: the request's device
        self._lock = threading.Lock()
        if preload:
            for device in device_map().values():
                self._network(device)

    def _load_bundle_config(self, path, config):
        parser = super()._load_bundle_config(path, config)
        parser["progress"] = False  # no progress bars in the server log
        if self._model_name:
            parser["model_name"] = self._model_name
        return parser

    # ------------------------------------------------------------------------------------------ the request
    def __call__(self, request: dict, callbacks: dict | None = None) -> tuple[str | None, dict]:
        request = dict(request)
        device = request.get("device")
        if isinstance(device, (list, tuple)):  # the config's list of devices, sent back as it is
            device = request["device"] = device[0] if device else None
        if device in (None, "", "auto"):
            request["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        elif not isinstance(device, str) or not _usable_device(name_to_device(device)):
            raise BadRequestError(f"device must be auto, cpu or cuda[:N], got {device!r}")
        return super().__call__(request, callbacks)

    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return [PromptTokensd(self.network.tokenize), _RequestImaged(self._pre)]

    def inferer(self, data=None):
        return self._inferer

    def _network(self, device: str) -> tuple[torch.nn.Module, str]:
        """The network on ``device`` with the served weights, loaded again when the weight file changes."""
        path = self.get_path()
        if path is None:
            raise MONAILabelException(MONAILabelError.INFERENCE_ERROR, f"none of the weight files exists: {self.path}")
        stamp = (path, os.stat(path).st_mtime_ns)
        with self._lock:
            cached = self._networks.get(device)
            if cached is None or cached[1] != stamp:
                network = copy.deepcopy(self.network)
                network.load_state_dict(load_state_dict(path))  # safetensors or torch files, checked
                network = inference_ready(network, torch.device(device))
                self._networks[device] = (network, stamp)
                logger.info("serving weights %s on %s", path, device)
            return self._networks[device][0], path

    def _get_network(self, device, data):
        """The network for ``device`` with the request's tokens bound (shared by concurrent requests): the prompt
        translated to the laterality convention of the weights served (a fine-tuned file records its own); for an
        explanation map (``result_map``), the model's ``explain`` (the logits, and a causal module's mask); with
        ``flip_tta``, that averaged with itself on the mirrored slices under the mirrored prompt
        (:class:`~causalclipseg.inference.tta.MirrorAveraged`).

        Raises:
            BadRequestError: for an explanation map the served model does not give (a causal mask from a model
                without a causal module), or flip TTA asked for a volume cut in sagittal slices.
        """
        network, path = self._network(device)
        data["weights"] = os.path.basename(path)
        tokens = {"text": model_tokens(network, data["prompt"], data["prompt_side"]).to(torch.device(device))}
        forward = network
        result_map = data.get("result_map", "mask")
        if result_map != "mask":
            if result_map not in network.explanation_maps:
                raise BadRequestError(f"result_map {result_map} needs a model with a causal module; the served "
                                      f"{self.bundle_config['model_name']!r} has none: ask for "
                                      f"{', '.join(['mask', *network.explanation_maps])}")
            forward = network.explain
        if data.get("flip_tta"):
            try:
                check_mirrorable(data["image"], "the request's image")
            except ValueError as err:
                raise BadRequestError(str(err)) from err
            forward = MirrorAveraged(forward)
            tokens["mirrored_text"] = mirrored_model_tokens(network, data["prompt"], data["prompt_side"]).to(
                torch.device(device))
        return functools.partial(forward, **tokens)

    def post_transforms(self, data=None) -> Sequence[Callable]:
        """The bundle's postprocessing with the request's threshold, and for a map the probability kept apart (the
        bundle's ``explain`` does the same)."""
        threshold, explain = data["threshold"], data.get("result_map", "mask") != "mask"

        def per_request(t: Callable) -> Callable:
            if isinstance(t, AsDiscreted):
                return AsDiscreted(keys=t.keys, threshold=threshold)
            if isinstance(t, SplitExplanationd) and explain:
                return SplitExplanationd(t.keys, t.causal_key, "probability", t.allow_missing_keys)
            return t

        return [per_request(t) for t in self._post]

    # ------------------------------------------------------------------------------------------- the label
    def writer(self, data: dict, extension: str | None = None, dtype: Any = None) -> tuple[str, dict]:
        """Write the mask (values 0 background, 1 lesion, uint8), or the explanation map the request asked for
        (``result_map``: float32 in [0, 1]), on the request image's grid to a temporary file.

        The file lies in ``label_dir``, where no client saves its copy under the same name; MONAI Label's ``/infer``
        endpoint deletes it after answering.

        Pictures (PNG/JPEG/BMP/TIFF) give a PNG with the picture's rows and columns; NIfTI inputs a NIfTI with the
        input's own header and affine; DICOM and NRRD inputs a NIfTI with the geometry MONAI read (RAS); a map is a
        NIfTI for every input. ``result_extension`` picks another format: ``.nii.gz``/``.nii`` (any input),
        ``.nrrd``, ``.png`` (a 2-D image's mask only).

        Raises:
            BadRequestError: for an unknown ``result_extension`` or a PNG asked for a volume.
        """
        source = str(data["image_path"])
        label = data[self.output_label_key]  # back on the input's grid (Invertd), with the input's affine
        image = label if hasattr(label, "affine") else data[self.input_key]
        mask = label[0].detach().cpu().numpy().astype(np.uint8)  # (X, Y) or (X, Y, Z)
        result_map = data.get("result_map", "mask")
        values = mask if result_map == "mask" else data[result_map][0].detach().cpu().numpy().astype(np.float32)
        picture = file_suffix(source) in PICTURE_SUFFIXES and result_map == "mask"
        ext = extension or data.get("result_extension") or (".png" if picture else ".nii.gz")
        if ext not in RESULT_EXTENSIONS:
            raise BadRequestError(f"result_extension must be one of {', '.join(RESULT_EXTENSIONS)}, got {ext!r}")
        if ext == ".png" and mask.ndim != 2:
            raise BadRequestError(f"result_extension .png needs a 2-D image; this one is a volume of shape "
                                  f"{mask.shape}: use .nii.gz")
        self.label_dir.mkdir(parents=True, exist_ok=True)
        prefix = "causalclipseg_label_" if result_map == "mask" else f"causalclipseg_{result_map}_"
        fd, target = tempfile.mkstemp(suffix=ext, prefix=prefix, dir=self.label_dir)
        os.close(fd)
        meta = {**getattr(image, "meta", {}), "filename_or_obj": source, "affine": torch.as_tensor(_affine_4x4(image))}
        try:
            if ext == ".nrrd":
                from monailabel.transform.writer import write_itk

                write_itk(values if values.ndim == 3 else values[..., None], target, _affine_4x4(image), values.dtype,
                          True)
            elif result_map == "mask":  # the package's writer: PNG rows x columns, NIfTI with a NIfTI input's own
                write_mask(mask, meta, target, png_scale=1)  # header or the affine read
            else:  # a map, as `causalclipseg predict --explain` writes it
                write_nifti(values, meta, target)
        except BaseException:
            Path(target).unlink(missing_ok=True)
            raise
        result = {
            "prompt": data["prompt"],
            "prompt_side": data["prompt_side"],
            "threshold": data["threshold"],
            "weights": data.get("weights"),
            "result_map": result_map,
            "label_values": {"background": 0, "lesion": 1},
            "lesion_fraction": round(float(mask.mean()), 6),
            "shape": list(mask.shape),
        }
        if result_map != "mask":
            del result["label_values"]
            result["value_range"] = [round(float(values.min()), 6), round(float(values.max()), 6)]
        return target, result
