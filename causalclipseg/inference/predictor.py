"""Prompted prediction on files: 2-D images and 3-D volumes, slice by slice, on the input's grid.

The walk from file to mask: :func:`~causalclipseg.io.inputs.list_inputs` (what each input is) ->
``LoadSegmentableImaged`` (PNG/JPEG/BMP/TIFF, DICOM as a viewer shows it, NIfTI, NRRD; MONAI's axis order, x
first) -> :class:`~causalclipseg.io.orientation.DisplayOrientation` (the patient's left on the image's right) ->
:class:`SliceSegmenter` (the prompt translated to the model's laterality convention and tokenised; per slice:
min-max to [0, 1], resize to the model size, CLIP normalisation -> ``CausalCLIPSeg.forward`` -> logits resized
back) streamed in batches of slices by :class:`SliceWiseInferer` -> back to the input's voxel grid -> sigmoid ->
threshold -> writer with the input's geometry. Outputs are written atomically and never replace an existing file
unless asked to.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import MapTransform
from PIL import Image
from torch import nn
from tqdm import tqdm

from ..data.pipelines import get_slice_preprocessing
from ..data.prompts import check_prompt_side, names_a_side, to_model_side
from ..factory import DEFAULT_CHECKPOINT, DEFAULT_MODEL, create_model, resolve_device
from ..io.inputs import PICTURE_SUFFIXES, file_suffix
from ..io.orientation import GEOMETRY_KEY, DisplayOrientation
from ..io.reader import LoadSegmentableImaged
from ..io.writers import GridNibabelWriter, atomic_write, mask_like_nifti, overlay
from ..model.causalclipseg import CausalCLIPSeg

logger = logging.getLogger(__name__)

__all__ = ["SliceSegmenter", "SliceWiseInferer", "Prediction", "Predictor",
           "WarnUnverifiableSided",
           "inference_ready", "load_trained_model", "model_tokens", "warn_if_side_unverifiable"]


def _stem(path: Path) -> str:
    return path.name[: -len(file_suffix(path))] if file_suffix(path) else path.name


def load_trained_model(model: str = DEFAULT_MODEL, checkpoint: str | os.PathLike | None = None,
                       pretrained: str | None = None, device: str = "auto") -> CausalCLIPSeg:
    """A model ready for inference on ``device``: ``checkpoint=None`` means the weights shipped for the default
    variant (other variants have none: pass a checkpoint, or ``pretrained`` CLIP weights for a smoke run).

    Raises:
        ValueError: for a variant without shipped weights, an unknown model or a bad device.
        FileNotFoundError: if the checkpoint, or the shipped weights, are missing.
    """
    if checkpoint is None and pretrained is None:
        if model != DEFAULT_MODEL:
            raise ValueError(f"model {model!r} has no shipped weights: pass a checkpoint")
        checkpoint = DEFAULT_CHECKPOINT
    return inference_ready(create_model(model, pretrained=pretrained, checkpoint=checkpoint), resolve_device(device))


def inference_ready(model: nn.Module, device: str | torch.device | None = None) -> nn.Module:
    """``model`` in eval mode with channels-last weights (and on ``device`` when given).

    Convolutions are half of the tiny model's CPU time (``causalclipseg benchmark`` profile); with channels-last
    weights oneDNN skips the layout reorders around them, for the same results (max difference 1e-6):
    measured on 2 cores, batch-1 forward 13.1 -> 11.5 ms, batch 8 20.5 -> 12.5 ms per image.
    """
    if device is not None:
        model = model.to(device)
    return model.to(memory_format=torch.channels_last).eval()


def model_tokens(model: CausalCLIPSeg, prompt: str, prompt_side: str = "patient") -> torch.Tensor:
    """Token ids ``(1, L)`` of ``prompt`` as ``model`` understands it: its sides (``prompt_side``: whose left "left"
    is) translated to the convention the model was trained with (``model.prompt_side``), then validated and
    tokenised.

    Raises:
        ValueError, TypeError: for an unknown side or a prompt the tokenizer refuses.
    """
    check_prompt_side(prompt_side)
    model.tokenize(prompt)  # refuse a bad prompt as the user wrote it, before translating it
    return model.tokenize(to_model_side(prompt, prompt_side, model.prompt_side))


def warn_if_side_unverifiable(image: torch.Tensor, prompt: str, source: object) -> None:
    """Log a warning when ``prompt`` names a side and the loaded ``image``'s orientation is not recorded."""
    if names_a_side(prompt) and getattr(image, "meta", {}).get(GEOMETRY_KEY) == "unknown":
        logger.warning("%s does not record its orientation (no DICOM Image Orientation or Patient Orientation, no "
                       "NIfTI qform/sform, no NRRD space): it is taken as stored, the patient's left on the image's "
                       "right; check that the mask is on the side the prompt names", source)


class WarnUnverifiableSided(MapTransform):
    """Pre-transform: :func:`warn_if_side_unverifiable` for each image key, with the request's prompt (``data``'s
    ``prompt_key``, as MONAI Label passes it) or the one given here (the bundle's).

    Args:
        keys: image keys, as loaded (their ``meta`` says where the orientation comes from).
        prompt: the prompt when the data holds none.
        prompt_key: where the data holds its prompt.
    """

    def __init__(self, keys: KeysCollection = "image", prompt: str | None = None, prompt_key: str = "prompt",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.prompt, self.prompt_key = prompt, prompt_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        prompt = d.get(self.prompt_key, self.prompt)
        for key in self.key_iterator(d):
            if isinstance(prompt, str):
                image = d[key]
                warn_if_side_unverifiable(image, prompt, getattr(image, "meta", {}).get("filename_or_obj", key))
        return d


class SliceSegmenter(nn.Module):
    """The model with its prompt bound and its preprocessing inside: raw slices in, logits on their grid out.

    MONAI inferers call ``network(x)`` with one argument (``SliceInferer`` drops extra ones), so the prompt's
    tokens are bound here (:func:`model_tokens`). Each slice is preprocessed by
    :func:`~causalclipseg.data.pipelines.get_slice_preprocessing`, as in training.

    Args:
        model: a CausalCLIPSeg.
        prompt: the text; validated, translated to the model's laterality convention and tokenised once.
        prompt_side: whose left the prompt's "left" is: ``patient`` (default) or ``viewer``.
    """

    def __init__(self, model: CausalCLIPSeg, prompt: str, prompt_side: str = "patient") -> None:
        super().__init__()
        self.model = model
        self.register_buffer("tokens", model_tokens(model, prompt, prompt_side), persistent=False)  # (1, L)
        self.preprocess = get_slice_preprocessing(model.config.image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 1, X, Y) raw intensities -> logits (N, 1, X, Y)."""
        x = x.as_subclass(torch.Tensor)
        batch = torch.stack([self.preprocess(s.float().cpu()).as_subclass(torch.Tensor) for s in x])  # (N, 3, S, S)
        logits = self.model(batch.to(self.tokens.device), self.tokens)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False).to(x.device)


class SliceWiseInferer(Inferer):
    """2-D inputs ``(B, C, X, Y)`` in one call; volumes ``(B, C, X, Y, Z)`` slice by slice along ``Z`` in batches.

    A volume is streamed: ``sw_batch_size`` slices at a time go through the network (which preprocesses them, see
    :class:`SliceSegmenter`) and their logits are written into the one float32 output volume, so the memory beyond
    the input and the output stays flat in the number of slices (``causalclipseg benchmark`` measures it). MONAI's
    ``SliceInferer`` computes the same but keeps a second full-size volume (its overlap count map), which whole
    slices never need. The output keeps the input's metadata (affine, file name), so writers put it on the input's
    grid.

    Args:
        sw_batch_size: slices per forward pass.
        progress: show a progress bar over a volume's slice batches.
    """

    def __init__(self, sw_batch_size: int = 8, progress: bool = True) -> None:
        super().__init__()
        if sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
        self.sw_batch_size = sw_batch_size
        self.progress = progress

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        """inputs (B, C, X, Y[, Z]) -> logits (B, 1, X, Y[, Z]); extra arguments go to the network."""
        if inputs.ndim == 4:
            logits = network(inputs, *args, **kwargs)
        elif inputs.ndim == 5:
            logits = self._stream(inputs.as_subclass(torch.Tensor), network, *args, **kwargs)
        else:
            raise ValueError(f"inputs must be (B, C, X, Y) or (B, C, X, Y, Z), got shape {tuple(inputs.shape)}")
        if isinstance(inputs, MetaTensor):
            logits = MetaTensor(logits.as_subclass(torch.Tensor)).copy_meta_from(inputs)
        return logits

    def _stream(self, volume: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any,
                **kwargs: Any) -> torch.Tensor:
        b, c, x, y, z = volume.shape
        out: torch.Tensor | None = None
        starts = range(0, z, self.sw_batch_size)
        for start in tqdm(starts, desc="slices", unit="batch", disable=not self.progress or len(starts) < 2,
                          leave=False):
            chunk = volume[..., start:start + self.sw_batch_size]  # (B, C, X, Y, n)
            n = chunk.shape[-1]
            logits = network(chunk.permute(0, 4, 1, 2, 3).reshape(b * n, c, x, y), *args, **kwargs)
            logits = logits.as_subclass(torch.Tensor)  # (B n, K, X, Y)
            if out is None:
                out = torch.empty((b, logits.shape[1], x, y, z), dtype=torch.float32, device=logits.device)
            out[..., start:start + n] = logits.reshape(b, n, -1, x, y).permute(0, 2, 3, 4, 1)
        return out


@dataclass
class Prediction:
    """A prediction on the input's grid (MONAI axis order: x = image columns first)."""

    source: Path  # the input file
    probability: np.ndarray  # (X, Y) or (X, Y, Z) float32 lesion probability
    mask: np.ndarray  # same shape, uint8 in {0, 1}
    image: np.ndarray | None  # 2-D inputs: float32 input scaled to [0, 1], for the overlay; None for volumes
    meta: dict  # MONAI metadata of the loaded input (affine, spatial_shape, ...)


class Predictor:
    """Loads a model once and segments files with a prompt.

    Prompts name the patient's sides by default ("left lung": the patient's left, on the image's right in standard
    display); pass ``prompt_side="viewer"`` for prompts that name the image's sides, such as QaTa-COV19's captions
    as written. Each input is brought to display orientation before the model sees it and the mask back to the
    input's grid (:mod:`causalclipseg.io.orientation`).

    Args:
        model: variant name.
        checkpoint: CausalCLIPSeg weights; ``None`` uses the weights shipped for the default variant.
        pretrained: CLIP weights (only useful without a checkpoint).
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda[:N]``.
        threshold: probability above which a voxel is lesion.
        batch_size: slices per forward pass for volumes.
        prompt_side: whose left the prompts' "left" is: ``patient`` or ``viewer``.

    Raises:
        ValueError: for an unknown model, a bad device, threshold, batch size or prompt side, or missing default
            weights.
    """

    def __init__(self, model: str = DEFAULT_MODEL, checkpoint: str | os.PathLike | None = None,
                 pretrained: str | None = None, device: str = "auto", threshold: float = 0.5,
                 batch_size: int = 8, prompt_side: str = "patient") -> None:
        self.prompt_side = check_prompt_side(prompt_side)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = load_trained_model(model, checkpoint, pretrained, device)
        self.threshold = threshold
        self.batch_size = batch_size
        self.loader = LoadSegmentableImaged("image")
        self.orientation = DisplayOrientation()

    @torch.no_grad()
    def predict(self, path: str | os.PathLike, prompt: str) -> Prediction:
        """Segment one file or DICOM series folder: a 2-D image, or a 3-D volume slice by slice (in display
        orientation: see :mod:`causalclipseg.io.orientation`); the result is on the input's grid.

        Raises:
            ValueError: if the prompt is empty or the file cannot be read or segmented.
        """
        path = Path(path)
        segmenter = SliceSegmenter(self.model, prompt, self.prompt_side)  # checks the prompt before any file work
        image = self.loader({"image": str(path)})["image"]  # (1, X, Y) or (1, X, Y, Z), finite
        warn_if_side_unverifiable(image, prompt, path)
        try:
            shown = self.orientation(image)  # display orientation, the same shape up to a permutation
            inferer = SliceWiseInferer(self.batch_size, progress=sys.stderr.isatty())  # no bar in redirected logs
            logits = self.orientation.inverse(inferer(shown[None], segmenter)[0])  # (1, X, Y[, Z]), input grid
        except (RuntimeError, MemoryError) as err:  # e.g. out of memory: one line naming the file, cause chained
            raise ValueError(f"cannot segment {path}: {type(err).__name__}: {_one_line(err)}") from err
        # in place, and the gray copy for overlays only for 2-D inputs: a volume costs its input, its float32
        # probability and its uint8 mask, not several more copies of itself
        probability = torch.sigmoid_(logits[0].as_subclass(torch.Tensor).float()).numpy()
        gray = None
        if probability.ndim == 2:
            gray = image[0].as_subclass(torch.Tensor).numpy().astype(np.float32)
            gray = (gray - gray.min()) / max(float(gray.max() - gray.min()), 1e-8)
        return Prediction(path, probability, (probability > self.threshold).astype(np.uint8), gray, dict(image.meta))

    def write(self, prediction: Prediction, output_dir: str | os.PathLike, overwrite: bool = False) -> list[Path]:
        """Write the mask into ``output_dir``, named after the input, and an overlay PNG for 2-D inputs.

        Pictures get a PNG mask (0/255); DICOM, NIfTI and NRRD inputs a NIfTI mask (0/1) on the input's
        geometry (NIfTI inputs keep their own header and affine).

        Raises:
            FileExistsError: if an output exists and ``overwrite`` is false.
            ValueError: if a mask cannot be written (the cause chained); what was written is complete.
        """
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        src = prediction.source
        picture = file_suffix(src) in PICTURE_SUFFIXES
        mask_path = out / f"{_stem(src)}_mask{'.png' if picture else '.nii.gz'}"
        targets = [mask_path] + ([out / f"{_stem(src)}_overlay.png"] if prediction.mask.ndim == 2 else [])
        for target in targets:
            if target.exists() and not overwrite:
                raise FileExistsError(f"output {target} exists; pass --overwrite to replace it")
        try:
            if picture:
                mask_img = Image.fromarray((prediction.mask.T * 255).astype(np.uint8))  # (X, Y) -> rows x columns
                atomic_write(mask_path, lambda tmp: mask_img.save(tmp, format="PNG"))
            elif file_suffix(src) in (".nii", ".nii.gz"):
                image = mask_like_nifti(src, prediction.mask)
                atomic_write(mask_path, lambda tmp: nib.save(image, tmp))
            else:
                writer = GridNibabelWriter(output_dtype=np.uint8)
                writer.set_data_array(prediction.mask[None], channel_dim=0)
                writer.set_metadata(prediction.meta, resample=False)
                atomic_write(mask_path, lambda tmp: writer.write(tmp, verbose=False))
            if len(targets) == 2:
                blended = overlay(prediction.image.T, prediction.mask.T)
                atomic_write(targets[1], lambda tmp: blended.save(tmp, format="PNG"))
        except (PermissionError, FileExistsError):
            raise
        except Exception as err:  # noqa: BLE001 - writers raise many types; atomic_write left no partial file
            raise ValueError(f"cannot write the mask of {src} into {out}: {_one_line(err)}") from err
        return targets


def _one_line(err: BaseException) -> str:
    """An exception's message on one line (library messages may span several, e.g. printing a matrix)."""
    return " ".join(str(err).split()) or type(err).__name__
