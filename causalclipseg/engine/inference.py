"""Prompted prediction on image files: load the model once, then segment file after file.

The walk from file to mask: :func:`~causalclipseg.data.transforms.get_inference_transforms` (read, grayscale,
[0, 1], resize to the model size, CLIP normalisation, tokens) -> ``CausalCLIPSeg.forward`` -> sigmoid ->
``Invertd`` (back to the input grid) -> threshold -> writer. Outputs are written atomically and never
replace an existing file unless asked to.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor, NibabelWriter
from monai.transforms import Invertd
from PIL import Image

from ..data.transforms import get_inference_transforms
from ..factory import DEFAULT_CHECKPOINT, DEFAULT_MODEL, create_model
from .checkpoint import atomic_write
from .training import resolve_device

logger = logging.getLogger(__name__)

__all__ = ["Prediction", "Predictor", "IMAGE_SUFFIXES", "find_images", "load_trained_model"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".nii", ".nii.gz")
_NIFTI = (".nii", ".nii.gz")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _stem(path: Path) -> str:
    return path.name[: -len(_suffix(path))] if _suffix(path) else path.name


def find_images(inputs: list[str | os.PathLike]) -> list[Path]:
    """Files to segment: each input file as given, and the image files directly inside each input folder.

    Raises:
        FileNotFoundError: if an input does not exist.
        ValueError: if a folder holds no image file.
    """
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and _suffix(p) in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"input folder {item} holds no image file ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"input not found: {item}")
    return files


def load_trained_model(model: str = DEFAULT_MODEL, checkpoint: str | os.PathLike | None = None,
                       pretrained: str | None = None, device: str = "auto") -> torch.nn.Module:
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
    return create_model(model, pretrained=pretrained, checkpoint=checkpoint).to(resolve_device(device)).eval()


@dataclass
class Prediction:
    """A prediction on the input's grid."""

    source: Path  # the input file
    probability: np.ndarray  # (X, Y) float32 lesion probability, MONAI axis order (x = image columns)
    mask: np.ndarray  # (X, Y) uint8 in {0, 1}
    image: np.ndarray  # (X, Y) float32 input in [0, 1], for overlays
    meta: dict  # MONAI metadata of the loaded input (affine, spatial_shape, ...)


class Predictor:
    """Loads a model once and segments image files with a prompt.

    Args:
        model: variant name.
        checkpoint: CausalCLIPSeg weights; ``None`` uses the weights shipped with the package for the
            default variant (and is an error for other variants).
        pretrained: CLIP weights (only useful without a checkpoint).
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda[:N]``.
        threshold: probability above which a pixel is lesion.

    Raises:
        ValueError: for an unknown model, a bad device or threshold, or missing default weights.
    """

    def __init__(self, model: str = DEFAULT_MODEL, checkpoint: str | os.PathLike | None = None,
                 pretrained: str | None = None, device: str = "auto", threshold: float = 0.5) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.model = load_trained_model(model, checkpoint, pretrained, device)
        self.device = next(self.model.parameters()).device
        cfg = self.model.config
        self.transforms = get_inference_transforms(cfg.image_size, cfg.clip.context_length)
        self.invert = Invertd(keys="pred", transform=self.transforms, orig_keys="image", nearest_interp=False)
        self.threshold = threshold

    @torch.no_grad()
    def predict(self, path: str | os.PathLike, prompt: str) -> Prediction:
        """Segment one 2-D image file (PNG/JPEG/BMP/TIFF, DICOM, or single-slice NIfTI).

        Raises:
            ValueError: if the prompt is empty or the file cannot be read as a 2-D image.
        """
        path = Path(path)
        self.model.tokenize(prompt)  # validates the prompt before any file work
        try:
            data = self.transforms({"image": str(path), "prompt": prompt})
        except Exception as err:  # noqa: BLE001 - readers raise many types; all mean "unreadable"
            cause = err.__cause__ or err  # MONAI wraps the reader's error in a transform-application error
            reason = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
            raise ValueError(f"cannot read {path} as a 2-D image: {reason}") from err
        image = data["image"]
        if not torch.isfinite(image).all():
            raise ValueError(f"cannot segment {path}: it contains NaN or infinite pixel values")
        logits = self.model(image[None].to(self.device), data["text"][None].to(self.device))
        data["pred"] = MetaTensor(torch.sigmoid(logits[0]).float().cpu(), meta=image.meta,
                                  applied_operations=image.applied_operations)
        probability = self.invert(data)["pred"][0].numpy()  # (X, Y) on the input grid
        raw = self.transforms.transforms[0]({"image": str(path)})["image"]  # the reader alone, for the overlay
        gray = np.asarray(raw, dtype=np.float32).reshape(probability.shape + (-1,)).mean(axis=-1)
        gray = (gray - gray.min()) / max(float(gray.max() - gray.min()), 1e-8)
        return Prediction(path, probability.astype(np.float32), (probability > self.threshold).astype(np.uint8),
                          gray, dict(image.meta))

    def write(self, prediction: Prediction, output_dir: str | os.PathLike, overwrite: bool = False) -> list[Path]:
        """Write the mask (PNG 0/255 for picture inputs, NIfTI 0/1 on the input geometry for DICOM/NIfTI) and an
        overlay PNG into ``output_dir``, named after the input.

        Raises:
            FileExistsError: if an output exists and ``overwrite`` is false.
        """
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        src = prediction.source
        volume_like = _suffix(src) in _NIFTI or _suffix(src) == ".dcm"
        mask_path = out / f"{_stem(src)}_mask{'.nii.gz' if volume_like else '.png'}"
        overlay_path = out / f"{_stem(src)}_overlay.png"
        for target in (mask_path, overlay_path):
            if target.exists() and not overwrite:
                raise FileExistsError(f"output {target} exists; pass --overwrite to replace it")
        if _suffix(src) in _NIFTI:
            original = nib.load(str(src))  # same affine and header as the input, same shape as its data
            mask = prediction.mask.reshape(original.shape)
            image = nib.Nifti1Image(mask, original.affine, original.header)
            image.set_data_dtype(np.uint8)
            atomic_write(mask_path, lambda tmp: nib.save(image, tmp))
        elif volume_like:
            writer = NibabelWriter(output_dtype=np.uint8)
            writer.set_data_array(prediction.mask[None], channel_dim=0)
            writer.set_metadata(prediction.meta, resample=False)
            atomic_write(mask_path, lambda tmp: writer.write(tmp, verbose=False))
        else:
            mask_img = Image.fromarray((prediction.mask.T * 255).astype(np.uint8))  # (X, Y) -> rows x columns
            atomic_write(mask_path, lambda tmp: mask_img.save(tmp, format="PNG"))
        overlay = _overlay(prediction.image.T, prediction.mask.T)
        atomic_write(overlay_path, lambda tmp: overlay.save(tmp, format="PNG"))
        return [mask_path, overlay_path]


def _overlay(gray: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """Gray image (rows, cols) in [0, 1] with the mask blended in red."""
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    red = np.array([1.0, 0.1, 0.1])
    rgb[mask > 0] = (1 - alpha) * rgb[mask > 0] + alpha * red
    return Image.fromarray((rgb * 255).round().astype(np.uint8))
