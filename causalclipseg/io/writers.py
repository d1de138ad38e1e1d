"""Writing masks (and any file) atomically, on the input's grid: a crash never leaves a half-written file.

:func:`atomic_write` is the one way files are written. :class:`GridNibabelWriter` writes a NIfTI with the input's
affine as it is; :class:`SaveMaskd` writes masks for the bundle and MONAI Label; :func:`mask_like_nifti` gives a
mask a NIfTI input's own header; :func:`overlay` draws a mask over a picture.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import NibabelWriter, PILWriter
from monai.transforms import MapTransform, SaveImage
from monai.utils import ImageMetaKey
from PIL import Image

__all__ = ["GridNibabelWriter", "SaveMaskd", "atomic_write", "mask_like_nifti", "overlay"]

logger = logging.getLogger(__name__)

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: the mode a plain open() would give new files is 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the temporary name ends like the final one, so writers that pick the format by extension still work
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes), dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0o600: give the file the mode any new file gets
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class GridNibabelWriter(NibabelWriter):
    """MONAI's NIfTI writer that, with ``resample=False``, writes the data with the input's 4x4 affine as they are.

    MONAI's ``NibabelWriter`` runs an identity resampling even then, through a 2-D affine for 2-D data: it fails
    for a slice whose plane is not axial (sagittal or coronal DICOM) and for 2-D data given as a bare array. Used
    by :meth:`Predictor.write` and by the bundle's ``SaveMaskd`` (as ``SaveImage``'s writer).
    """

    def set_metadata(self, meta_dict: dict | None, resample: bool = True, **options: Any) -> None:
        """Keep the affine of ``meta_dict``; resample only when asked to (as MONAI's writer does)."""
        if resample:
            super().set_metadata(meta_dict, resample=True, **options)
            return
        _, affine, _ = self.get_meta_info(meta_dict)
        if self.output_dtype is None and self.data_obj is not None and hasattr(self.data_obj, "dtype"):
            self.output_dtype = self.data_obj.dtype
        self.affine = affine


class _AtomicNiftiWriter(GridNibabelWriter):
    """The NIfTI mask writer, writing through a temporary file renamed into place (never a half-written mask)."""

    def write(self, filename: str | os.PathLike, verbose: bool = False, **kwargs: Any) -> None:
        atomic_write(filename, lambda tmp: super(_AtomicNiftiWriter, self).write(tmp, verbose=verbose, **kwargs))


class _AtomicPNGWriter(PILWriter):
    """MONAI's PNG writer, writing through a temporary file renamed into place."""

    def write(self, filename: str | os.PathLike, verbose: bool = False, **kwargs: Any) -> None:
        atomic_write(filename, lambda tmp: super(_AtomicPNGWriter, self).write(tmp, verbose=verbose, **kwargs))


class SaveMaskd(MapTransform):
    """Write each mask on its input's grid, named ``<input stem>_mask``: NIfTI always, PNG (0/255) for 2-D inputs.

    The mask carries the input's metadata (MONAI's ``affine`` and file name), and nothing was resampled, so the
    NIfTI has the input's shape and affine (direction and spacing included); the PNG has the input picture's
    rows and columns. Each file is written to a temporary name and renamed into place, so a failure never leaves
    a half-written mask.

    Args:
        keys: the mask key, ``(1, X, Y[, Z])`` in {0, 1}.
        output_dir: the folder, created if missing.
        png_for_2d: also write a PNG for 2-D masks.
    """

    def __init__(self, keys: str | Sequence[str] = "pred", output_dir: str | os.PathLike = "eval",
                 png_for_2d: bool = True, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        common = {"output_dir": str(output_dir), "output_postfix": "mask", "separate_folder": False,
                  "print_log": False, "resample": False}
        self.nifti = SaveImage(output_ext=".nii.gz", output_dtype=np.uint8, writer=_AtomicNiftiWriter, **common)
        self.png = (SaveImage(output_ext=".png", output_dtype=np.uint8, scale=255, writer=_AtomicPNGWriter, **common)
                    if png_for_2d else None)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            mask = d[key]
            self.nifti(mask.to(torch.uint8))
            if self.png is not None and mask.ndim == 3:
                self.png(mask.float())
            logger.info("wrote the mask of %s", mask.meta.get(ImageMetaKey.FILENAME_OR_OBJ))
        return d


def mask_like_nifti(source: str | os.PathLike, mask: np.ndarray) -> nib.Nifti1Image:
    """A uint8 mask image with the NIfTI ``source``'s own header and affine (its scaling reset to 1, 0)."""
    original = nib.load(str(source))
    image = type(original)(mask.reshape(original.shape).astype(np.uint8), original.affine, original.header)
    image.set_data_dtype(np.uint8)
    image.header.set_slope_inter(1.0, 0.0)
    return image


def overlay(gray: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """Gray image (rows, cols) in [0, 1] with the mask blended in red."""
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    red = np.array([1.0, 0.1, 0.1])
    rgb[mask > 0] = (1 - alpha) * rgb[mask > 0] + alpha * red
    return Image.fromarray((rgb * 255).round().astype(np.uint8))
