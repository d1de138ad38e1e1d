"""Prompted prediction on files: 2-D images and 3-D volumes, slice by slice, on the input's grid.

The one path from file to mask, shared by ``causalclipseg predict``, :class:`Predictor`, the bundle's
``inference.json`` (which declares the same steps in MONAI's config vocabulary) and the MONAI Label app:

1. the input policy, :func:`~causalclipseg.io.inputs.list_inputs` (a file, a DICOM series folder, a folder, a
   datalist);
2. :func:`inference_preprocessing`: :class:`~causalclipseg.io.reader.LoadSegmentableImaged` (PNG/JPEG/BMP/TIFF,
   DICOM as a viewer shows it, NIfTI, NRRD; MONAI's axis order, x first), a warning when the prompt names a side the
   image cannot confirm (:class:`~causalclipseg.inference.prompts.WarnUnverifiableSided`), then
   :class:`~causalclipseg.io.orientation.DisplayOrientationd` (the patient's left on the image's right);
3. :class:`~causalclipseg.inference.inferer.SliceWiseInferer`: batches of slices moved to the model's device,
   preprocessed there as in training, ``CausalCLIPSeg(slices, tokens)`` with the prompt's token ids in the model's
   laterality convention (:func:`~causalclipseg.inference.prompts.model_tokens`), logits resized back;
4. :func:`inference_postprocessing`: :class:`SplitExplanationd` (an explanation's causal mask apart from the
   logits), MONAI's ``Invertd`` (back to the input's voxel grid), ``Activationsd`` (sigmoid), ``AsDiscreted``
   (threshold);
5. the writer, :func:`~causalclipseg.io.writers.write_mask` (:class:`~causalclipseg.io.writers.SaveMaskd` in the
   bundle and MONAI Label), with the explanation maps and a DICOM Segmentation beside the mask on request: written
   atomically, never replacing an existing file unless asked to.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import Activationsd, AsDiscrete, AsDiscreted, Compose, Invertd, MapTransform
from torch import nn

from ..data.prompts import check_prompt_side
from ..factory import DEFAULT_CHECKPOINT, DEFAULT_MODEL, create_model, resolve_device
from ..io.dicom_seg import check_dicom_seg_input, dicom_segmentation
from ..io.orientation import DisplayOrientationd
from ..io.reader import LoadSegmentableImaged
from ..io.writers import atomic_write, extra_files, mask_files, overlay, write_dicom, write_mask, write_nifti
from ..model.causalclipseg import CausalCLIPSeg
from .inferer import SliceWiseInferer
from .prompts import WarnUnverifiableSided, mirrored_model_tokens, model_tokens
from .tta import MirrorAveraged, check_mirrorable

logger = logging.getLogger(__name__)

__all__ = ["Prediction", "Predictor", "SplitExplanationd", "inference_postprocessing", "inference_preprocessing",
           "inference_ready", "load_trained_model"]


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


def inference_preprocessing(prompt: str | None = None) -> Compose:
    """Read an input and bring it to display orientation: ``{"image": path[, "prompt": text]}`` in, ``image``
    ``(1, X, Y)`` or ``(1, X, Y, Z)`` out (raw intensities; nothing resampled). ``prompt`` is used for the
    laterality warning when the data hold none. The bundle's ``preprocessing`` declares the same transforms."""
    return Compose([LoadSegmentableImaged("image"), WarnUnverifiableSided("image", prompt=prompt),
                    DisplayOrientationd("image")])


class SplitExplanationd(MapTransform):
    """Post-transform: the channels of :meth:`~causalclipseg.model.causalclipseg.CausalCLIPSeg.explain` (logits,
    and with a causal module the causal mask) under keys of their own, so that the steps after it treat the logits
    as any prediction.

    ``pred`` ``(2, ...)`` becomes the logits ``(1, ...)`` and ``causal_key`` the causal mask ``(1, ...)``; a
    prediction of one channel (the model's ``forward``, or the ``explain`` of a model without a causal module) stays
    the logits. With ``probability_key`` the logits are also copied there, where the sigmoid turns them into the
    lesion probability that the threshold on ``pred`` would otherwise replace by the mask (the bundle's ``explain``,
    MONAI Label's ``result_map``).

    Args:
        keys: the network output.
        causal_key: where the causal mask goes.
        probability_key: where a copy of the logits goes; ``None`` for none.
    """

    def __init__(self, keys: KeysCollection = "pred", causal_key: str = "causal_mask",
                 probability_key: str | None = "probability", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.causal_key, self.probability_key = causal_key, probability_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            output = d[key]
            if output.shape[0] == 2:
                d[key], d[self.causal_key] = output[:1], output[1:]  # (1, X, Y[, Z]) each, metadata kept
            if self.probability_key is not None:
                d[self.probability_key] = output[:1].clone()
        return d


def inference_postprocessing(preprocessing: Compose, threshold: float | None = None) -> Compose:
    """Logits ``pred`` in display orientation -> probabilities (or, with ``threshold``, a {0, 1} mask) on the
    input's grid. An explanation's output (:class:`SplitExplanationd`) gives ``causal_mask`` on the input's grid too,
    and, with ``threshold``, the probability under ``probability``. The bundle's ``postprocessing`` declares the same
    transforms, then its writer."""
    steps: list[Callable] = [
        SplitExplanationd("pred", probability_key=None if threshold is None else "probability"),
        Invertd(["pred", "causal_mask", "probability"], transform=preprocessing, orig_keys="image",
                nearest_interp=False, allow_missing_keys=True),
        Activationsd(["pred", "probability"], sigmoid=True, allow_missing_keys=True)]
    if threshold is not None:
        steps.append(AsDiscreted("pred", threshold=threshold))
    return Compose(steps)


@dataclass
class Prediction:
    """A prediction on the input's grid (MONAI axis order: x = image columns first)."""

    source: Path  # the input file
    probability: np.ndarray  # (X, Y) or (X, Y, Z) float32 lesion probability
    mask: np.ndarray  # same shape, uint8 in {0, 1}
    image: np.ndarray | None  # 2-D inputs: float32 input scaled to [0, 1], for the overlay; None for volumes
    meta: dict  # MONAI metadata of the input (affine, spatial_shape, ...)
    maps: dict[str, np.ndarray] = field(default_factory=dict)  # with explain: the model's explanation maps, by name
    prompt: str | None = None  # what was segmented, as the user wrote it (a DICOM Segmentation's segment label)


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
        threshold: probability from which a voxel is lesion (``>=``, MONAI's ``AsDiscrete``, as the bundle).
        batch_size: slices per forward pass for volumes.
        prompt_side: whose left the prompts' "left" is: ``patient`` or ``viewer``.
        flip_tta: average each prediction with the one on the mirrored input under the mirrored prompt
            (:class:`~causalclipseg.inference.tta.MirrorAveraged`; twice the inference time).

    Raises:
        ValueError: for an unknown model, a bad device, threshold, batch size or prompt side, or missing default
            weights.
    """

    def __init__(self, model: str = DEFAULT_MODEL, checkpoint: str | os.PathLike | None = None,
                 pretrained: str | None = None, device: str = "auto", threshold: float = 0.5,
                 batch_size: int = 8, prompt_side: str = "patient", flip_tta: bool = False) -> None:
        self.configure(threshold, prompt_side, flip_tta)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = load_trained_model(model, checkpoint, pretrained, device)
        self.model_name = model
        self.device = next(self.model.parameters()).device
        self.preprocessing = inference_preprocessing()
        self.inferer = SliceWiseInferer(self.model.config.image_size, batch_size, device=self.device,
                                        progress=sys.stderr.isatty())  # no progress bar in redirected logs
        self.postprocessing = inference_postprocessing(self.preprocessing)

    def configure(self, threshold: float, prompt_side: str, flip_tta: bool = False) -> None:
        """Set the threshold, the prompt side and the flip test-time augmentation of later predictions; the loaded
        model is kept (``causalclipseg worker`` serves requests that differ in them with one model).

        Raises:
            ValueError: for a threshold outside (0, 1) or an unknown prompt side.
        """
        prompt_side = check_prompt_side(prompt_side)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.threshold, self.prompt_side, self.flip_tta = threshold, prompt_side, bool(flip_tta)

    @torch.no_grad()
    def predict(self, path: str | os.PathLike, prompt: str, explain: bool = False) -> Prediction:
        """Segment one file or DICOM series folder: a 2-D image, or a 3-D volume slice by slice (in display
        orientation: see :mod:`causalclipseg.io.orientation`); the result is on the input's grid.

        Args:
            path: the input.
            prompt: what to segment.
            explain: also return the model's explanation maps on the input's grid
                (:attr:`~causalclipseg.model.causalclipseg.CausalCLIPSeg.explanation_maps`: the probability, and
                with a causal module the causal mask).

        Raises:
            ValueError: if the prompt is empty, or the file cannot be read or segmented.
        """
        path = Path(path)
        tokens = [model_tokens(self.model, prompt, self.prompt_side).to(self.device)]  # before any file work
        network = self.model.explain if explain else self.model
        if self.flip_tta:
            tokens.append(mirrored_model_tokens(self.model, prompt, self.prompt_side).to(self.device))
            network = MirrorAveraged(network)
        data = _apply(self.preprocessing, {"image": str(path), "prompt": prompt})  # (1, X, Y[, Z]), displayed
        if self.flip_tta:
            check_mirrorable(data["image"], path)
        try:
            data["pred"] = self.inferer(data["image"][None], network, *tokens)[0]  # (1 or 2, X, Y[, Z]) logits
            data = _apply(self.postprocessing, data)  # probabilities (and the causal mask) on the input's grid
        except (RuntimeError, MemoryError) as err:  # e.g. out of memory: one line naming the file, cause chained
            raise ValueError(f"cannot segment {path}: {type(err).__name__}: {_one_line(err)}") from err
        probability = data["pred"][0].as_subclass(torch.Tensor).numpy()
        gray = None
        if probability.ndim == 2:  # the overlay's gray copy only for 2-D inputs, on the input's grid too
            gray = self.preprocessing.inverse({"image": data["image"]})["image"][0]
            gray = gray.as_subclass(torch.Tensor).numpy().astype(np.float32)
            gray = (gray - gray.min()) / max(float(gray.max() - gray.min()), 1e-8)
        maps = {}
        for name in self.model.explanation_maps if explain else ():
            maps[name] = probability if name == "probability" else data[name][0].as_subclass(torch.Tensor).numpy()
        mask = AsDiscrete(threshold=self.threshold)(probability).astype(np.uint8)  # the bundle's rule: >= threshold
        return Prediction(path, probability, mask, gray,
                          dict(data["pred"].meta), maps, prompt)

    def write(self, prediction: Prediction, output_dir: str | os.PathLike, overwrite: bool = False,
              dicom_seg: bool = False) -> list[Path]:
        """Write the mask into ``output_dir``, named after the input, and an overlay PNG for 2-D inputs.

        Pictures get a PNG mask (0/255); DICOM, NIfTI and NRRD inputs a NIfTI mask (0/1) on the input's
        geometry (NIfTI inputs keep their own header and affine): :func:`~causalclipseg.io.writers.write_mask`. A
        prediction made with ``explain`` also gets its maps: ``<name>_probability.nii.gz``, and from a model with a
        causal module ``<name>_causal_mask.nii.gz`` (float32 in [0, 1], on the input's grid,
        :func:`~causalclipseg.io.writers.write_nifti`). With ``dicom_seg``, a
        DICOM input also gets ``<name>_seg.dcm``: the mask as a DICOM Segmentation over its source instances, labelled
        with the prompt (:func:`~causalclipseg.io.dicom_seg.dicom_segmentation`).

        Raises:
            FileExistsError: if an output exists and ``overwrite`` is false.
            ValueError: with ``dicom_seg``, for an input that is not DICOM (naming it; nothing is written), or if a
                mask cannot be written (the cause chained); what was written is complete.
        """
        out = Path(output_dir)
        src = prediction.source
        meta = {**prediction.meta, "filename_or_obj": str(src)}
        if dicom_seg:
            check_dicom_seg_input(src)
        targets = mask_files(src, out)
        if prediction.mask.ndim == 2:
            targets += mask_files(src, out, [".png"], postfix="overlay")
        extras = extra_files(src, out, tuple(prediction.maps), dicom_seg)
        targets += list(extras.values())
        for target in targets:
            if target.exists() and not overwrite:
                raise FileExistsError(f"output {target} exists; pass --overwrite to replace it")
        try:
            seg = None
            if dicom_seg:  # built before anything is written
                seg = dicom_segmentation(prediction.mask, meta, prediction.prompt, {
                    "model": self.model_name, "threshold": self.threshold, "prompt_side": self.prompt_side})
            out.mkdir(parents=True, exist_ok=True)
            write_mask(prediction.mask, meta, targets[0])
            if prediction.mask.ndim == 2:
                blended = overlay(prediction.image.T, prediction.mask.T)
                atomic_write(targets[1], lambda tmp: blended.save(tmp, format="PNG"))
            for name, values in prediction.maps.items():
                write_nifti(values.astype(np.float32), meta, extras[name])
            if seg is not None:
                write_dicom(seg, extras["seg"])
        except (PermissionError, FileExistsError):
            raise
        except Exception as err:  # noqa: BLE001 - writers raise many types; atomic_write left no partial file
            raise ValueError(f"cannot write the mask of {src} into {out}: {_one_line(err)}") from err
        return targets


def _apply(transforms: Compose, data: dict) -> dict:
    """``transforms(data)``, raising what a transform raised (MONAI's ``Compose`` wraps it in ``RuntimeError``s
    saying which transform failed; the user needs the reason)."""
    try:
        return transforms(data)
    except RuntimeError as err:
        cause: BaseException = err
        while (isinstance(cause, RuntimeError) and str(cause).startswith("applying transform")
               and cause.__cause__ is not None):
            cause = cause.__cause__
        if cause is err:
            raise
        raise cause from None


def _one_line(err: BaseException) -> str:
    """An exception's message on one line (library messages may span several, e.g. printing a matrix)."""
    return " ".join(str(err).split()) or type(err).__name__
