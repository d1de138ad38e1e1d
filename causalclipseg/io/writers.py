"""Writing masks (and any file) atomically, on the input's grid: a crash never leaves a half-written file.

:func:`atomic_write` is the one way files are written. :class:`GridNibabelWriter` writes a NIfTI with the input's
affine as it is; :class:`SaveMaskd` writes masks for the bundle and MONAI Label; :func:`mask_like_nifti` gives a
mask a NIfTI input's own header; :func:`overlay` draws a mask over a picture; :func:`extra_files` names what is
written beside a mask (the explanation maps, a DICOM Segmentation: :mod:`causalclipseg.io.dicom_seg`) and
:func:`write_dicom` writes a DICOM dataset.
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
from monai.data import NibabelWriter
from monai.transforms import MapTransform
from monai.utils import ImageMetaKey
from PIL import Image
from pydicom.dataset import Dataset

from .dicom_seg import check_dicom_seg_input, dicom_segmentation
from .inputs import PICTURE_SUFFIXES, file_suffix

__all__ = ["EXPLANATION_MAPS", "GridNibabelWriter", "SaveMaskd", "atomic_write", "check_explanation_maps",
           "extra_files", "mask_files", "mask_like_nifti", "overlay", "write_dicom", "write_mask", "write_nifti"]

#: the explanation maps of ``predict --explain`` and the bundle's ``explain``, float32 in [0, 1] on the input's grid,
#: each written as ``<name>_<map>.nii.gz``: the lesion probability, and what the causal module kept (only a model
#: with a causal module has it: a model's ``explanation_maps`` say which it gives)
EXPLANATION_MAPS = ("probability", "causal_mask")

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
    by :func:`write_mask` for inputs other than NIfTI.
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


def mask_files(source: str | os.PathLike, output_dir: str | os.PathLike, suffixes: Sequence[str] | None = None,
               postfix: str = "mask") -> list[Path]:
    """Where the masks of ``source`` go: ``<output_dir>/<input name without suffix>_<postfix><suffix>`` per suffix.

    ``suffixes`` ``None`` is the package's default: ``.png`` for pictures (PNG, JPEG, BMP, TIFF), ``.nii.gz`` for
    DICOM, NIfTI and NRRD inputs.
    """
    source = Path(source)
    suffix = file_suffix(source)
    stem = source.name[: -len(suffix)] if suffix else source.name
    if suffixes is None:
        suffixes = [".png" if suffix in PICTURE_SUFFIXES else ".nii.gz"]
    return [Path(output_dir) / f"{stem}_{postfix}{ext}" for ext in suffixes]


def check_explanation_maps(maps: Sequence[str]) -> tuple[str, ...]:
    """``maps`` as a tuple, checked.

    Raises:
        ValueError: for a name not in :data:`EXPLANATION_MAPS`.
    """
    unknown = [str(name) for name in maps if name not in EXPLANATION_MAPS]
    if unknown:
        raise ValueError(f"explanation maps must be among {', '.join(EXPLANATION_MAPS)}, got {', '.join(unknown)}")
    return tuple(maps)


def extra_files(source: str | os.PathLike, output_dir: str | os.PathLike, maps: Sequence[str] = (),
                dicom_seg: bool = False) -> dict[str, Path]:
    """What is written beside the mask of ``source``: each explanation map of ``maps`` (names of
    :data:`EXPLANATION_MAPS`: ``<name>_probability.nii.gz``, ``<name>_causal_mask.nii.gz``), with ``dicom_seg``
    ``seg`` (``<name>_seg.dcm``, a DICOM Segmentation of the mask), keyed by those names.

    Raises:
        ValueError: as :func:`check_explanation_maps`.
    """
    files = {name: mask_files(source, output_dir, [".nii.gz"], postfix=name)[0]
             for name in check_explanation_maps(maps)}
    if dicom_seg:
        files["seg"] = mask_files(source, output_dir, [".dcm"], postfix="seg")[0]
    return files


def write_dicom(dataset: Dataset, target: str | os.PathLike) -> Path:
    """Write a DICOM dataset (e.g. :func:`~causalclipseg.io.dicom_seg.dicom_segmentation`'s) as a DICOM file, with
    its preamble and file meta information, atomically."""
    return atomic_write(target, lambda tmp: dataset.save_as(tmp))


def write_mask(mask: np.ndarray, meta: Mapping[str, Any], target: str | os.PathLike, png_scale: int = 255) -> Path:
    """Write ``mask`` ``(X, Y[, Z])`` (MONAI's axis order, on the input's grid) atomically, in ``target``'s format.

    ``.png``: 2-D masks only, the picture's rows and columns, values 0 and ``png_scale``. ``.nii``/``.nii.gz``: a
    NIfTI input's own header and affine (:func:`mask_like_nifti`), else the affine MONAI read (``meta["affine"]``,
    direction and spacing included), through :class:`GridNibabelWriter`; values 0 and 1, uint8.

    Raises:
        ValueError: for another format, or a PNG of a volume.
    """
    target = Path(target)
    data = np.asarray(mask).astype(np.uint8)
    source = meta.get(ImageMetaKey.FILENAME_OR_OBJ)
    ext = file_suffix(target)
    if ext == ".png":
        if data.ndim != 2:
            raise ValueError(f"a PNG holds a 2-D mask; the mask of {source} is {data.ndim}-D {data.shape}: write "
                             f".nii.gz")
        picture = Image.fromarray((data.T * png_scale).astype(np.uint8))  # (X, Y) -> rows x columns
        return atomic_write(target, lambda tmp: picture.save(tmp, format="PNG"))
    if ext not in (".nii", ".nii.gz"):
        raise ValueError(f"mask file {target} must end in .png, .nii or .nii.gz")
    return write_nifti(data, meta, target)


def write_nifti(data: np.ndarray, meta: Mapping[str, Any], target: str | os.PathLike) -> Path:
    """Write ``data`` ``(X, Y[, Z])`` on the input's grid as a NIfTI of its own dtype, atomically: a NIfTI input's own
    header and affine (:func:`mask_like_nifti`), else the affine MONAI read (``meta["affine"]``), through
    :class:`GridNibabelWriter`. Masks (:func:`write_mask`) and the explanation maps of ``predict --explain`` use it.
    """
    source = meta.get(ImageMetaKey.FILENAME_OR_OBJ)
    if source is not None and file_suffix(source) in (".nii", ".nii.gz"):
        image = mask_like_nifti(source, data)
        return atomic_write(target, lambda tmp: nib.save(image, tmp))
    writer = GridNibabelWriter(output_dtype=data.dtype)
    writer.set_data_array(data[None], channel_dim=0)
    writer.set_metadata(dict(meta), resample=False)
    return atomic_write(target, lambda tmp: writer.write(tmp, verbose=False))


class SaveMaskd(MapTransform):
    """Write each mask on its input's grid into ``output_dir`` as ``<input name>_mask<suffix>``
    (:func:`mask_files`, :func:`write_mask`): the one mask writer of ``predict``, the bundle and MONAI Label.

    The mask carries the input's metadata (file name, MONAI's ``affine``) and nothing was resampled, so a NIfTI mask
    has the input's shape and geometry and a PNG the input picture's rows and columns. Each file is written to a
    temporary name and renamed into place, so a failure never leaves a half-written mask. Beside it
    (:func:`extra_files`): the explanation maps of ``maps``, which the data hold under their names (float32 NIfTI,
    :func:`write_nifti`), as ``predict --explain`` writes them; with ``dicom_seg`` a DICOM
    Segmentation of the mask over a DICOM input's source instances, labelled with the prompt
    (:func:`~causalclipseg.io.dicom_seg.dicom_segmentation`), as ``predict --dicom-seg`` writes it.

    Args:
        keys: the mask key, ``(1, X, Y[, Z])`` in {0, 1}.
        output_dir: the folder, created if missing.
        suffixes: the formats to write; ``None``: PNG for pictures, NIfTI otherwise. A ``.png`` is skipped for
            volumes.
        png_scale: the PNG's lesion value (255 to view it, 1 for a label map).
        overwrite: replace existing files; otherwise an existing file is refused before anything is written.
        maps: the explanation maps to write too (names of :data:`EXPLANATION_MAPS`; a model's
            ``explanation_maps``), each ``(1, X, Y[, Z])`` under its name in the data.
        dicom_seg: also write ``<input name>_seg.dcm``; DICOM inputs only.
        prompt: the segment's label when the data hold no ``prompt_key``.
        prompt_key: where the data may hold the prompt.
        dicom_seg_parameters: recorded in the Segmentation as the algorithm's parameters.

    Raises:
        FileExistsError: if an output file exists and ``overwrite`` is false.
        ValueError: as :func:`write_mask`; with ``dicom_seg``, for an input that is not DICOM (naming it, before
            anything is written for it); for an unknown map, or when the data lack one of ``maps``.
    """

    def __init__(self, keys: str | Sequence[str] = "pred", output_dir: str | os.PathLike = "eval",
                 suffixes: Sequence[str] | None = None, png_scale: int = 255, overwrite: bool = True,
                 maps: Sequence[str] = (), dicom_seg: bool = False, prompt: str | None = None,
                 prompt_key: str = "prompt", dicom_seg_parameters: Mapping[str, object] | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir, self.suffixes = Path(output_dir), None if suffixes is None else list(suffixes)
        self.png_scale, self.overwrite = png_scale, overwrite
        self.maps, self.dicom_seg = check_explanation_maps(maps), bool(dicom_seg)
        self.prompt, self.prompt_key = prompt, prompt_key
        self.dicom_seg_parameters = dict(dicom_seg_parameters or {})

    def targets(self, mask: torch.Tensor) -> list[Path]:
        """The files :meth:`__call__` writes for ``mask`` (a PNG only for 2-D masks), the extra files last."""
        source = mask.meta[ImageMetaKey.FILENAME_OR_OBJ]
        files = [f for f in mask_files(source, self.output_dir, self.suffixes) if f.suffix != ".png" or mask.ndim == 3]
        return files + list(extra_files(source, self.output_dir, self.maps, self.dicom_seg).values())

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            mask = d[key]
            source = mask.meta.get(ImageMetaKey.FILENAME_OR_OBJ)
            targets = self.targets(mask)
            for target in targets:
                if target.exists() and not self.overwrite:
                    raise FileExistsError(f"output {target} exists; pass --overwrite to replace it")
            extras = extra_files(source, self.output_dir, self.maps, self.dicom_seg)
            array = mask[0].detach().cpu().numpy()
            maps = {}
            for name in self.maps:
                if name not in d:
                    raise ValueError(f"explain: the data of {source} hold no {name!r} map: the network must be the "
                                     f"model's explain and its maps the model's explanation_maps (the bundle's "
                                     f"explain knob sets both)")
                maps[extras[name]] = d[name][0].detach().cpu().numpy().astype(np.float32)
            seg = None
            if self.dicom_seg:  # built before anything is written: an input it refuses leaves no file
                check_dicom_seg_input(source)
                seg = dicom_segmentation(array, mask.meta, d.get(self.prompt_key, self.prompt),
                                         self.dicom_seg_parameters)
            for target in targets[: len(targets) - len(extras)]:
                write_mask(array, mask.meta, target, self.png_scale)
            for target, values in maps.items():
                write_nifti(values, mask.meta, target)
            if seg is not None:
                write_dicom(seg, extras["seg"])
            logger.info("wrote the mask of %s: %s", source, ", ".join(map(str, targets)))
        return d


def mask_like_nifti(source: str | os.PathLike, mask: np.ndarray) -> nib.Nifti1Image:
    """``mask`` (uint8, or float32 maps) as an image with the NIfTI ``source``'s own header and affine (its scaling
    reset to 1, 0); other dtypes become uint8."""
    original = nib.load(str(source))
    dtype = np.float32 if mask.dtype == np.float32 else np.uint8
    image = type(original)(mask.reshape(original.shape).astype(dtype), original.affine, original.header)
    image.set_data_dtype(dtype)
    image.header.set_slope_inter(1.0, 0.0)
    return image


def overlay(gray: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """Gray image (rows, cols) in [0, 1] with the mask blended in red."""
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    red = np.array([1.0, 0.1, 0.1])
    rgb[mask > 0] = (1 - alpha) * rgb[mask > 0] + alpha * red
    return Image.fromarray((rgb * 255).round().astype(np.uint8))
