"""MONAI transforms shared by training, evaluation, inference and the bundle: image + prompt in, tensors out.

Output contract of :func:`get_train_transforms` and :func:`get_val_transforms` (per sample, before collation):

- ``image``: float32 ``(3, S, S)``, grayscale scaled to [0, 1] per image (min-max), repeated to 3 channels,
  normalised with open_clip's ``OPENAI_DATASET_MEAN``/``STD``;
- ``label``: float32 ``(1, S, S)``, values in {0, 1} (mask > 0);
- ``text``: int64 ``(context_length,)`` CLIP token ids;
- ``prompt``: the prompt string the tokens encode (after laterality swap or prompt transform).

Inference reads a file with :class:`LoadSegmentableImaged` and preprocesses each slice with
:func:`get_slice_preprocessing` (the same steps and settings as the tail of these pipelines).

Axis convention. Images are loaded by MONAI's ``LoadImaged``, which follows the world (ITK/NIfTI) convention for
every reader: the first spatial axis is x, the image's columns (PIL images arrive transposed, ``(C, W, H)``;
DICOM and NIfTI arrive as ``(C, X, Y)``). All readers thus agree, geometry metadata stays valid, and
``SaveImage``/``Invertd`` write predictions back on the input grid. Spatial axis :data:`LATERAL_AXIS` (= 0, tensor
dim 1) is therefore the left-right axis of the picture as a viewer sees it, and is the axis
:class:`RandLateralFlipd` flips. Shapes are written ``(C, H, W)`` in this package; since images are resized to a
square ``S x S`` the distinction is only one of orientation, which the model learns.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import struct
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImage,
    LoadImaged,
    MapTransform,
    NormalizeIntensity,
    NormalizeIntensityd,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RepeatChannel,
    RepeatChanneld,
    Resize,
    Resized,
    ScaleIntensity,
    ScaleIntensityd,
    Transform,
)
from monai.utils import TraceKeys
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from causalclipseg.data.prompts import get_prompt_transform, swap_laterality
from causalclipseg.io.dicom import voi_display
from causalclipseg.io.inputs import file_suffix
from causalclipseg.io.orientation import GEOMETRY_KEY, patient_orientation_affine
from causalclipseg.tokenizer import PromptTokenizer

__all__ = [
    "LATERAL_AXIS",
    "error_reason",
    "Binarize",
    "Binarized",
    "Grayscale2D",
    "Grayscale2Dd",
    "PromptTransformd",
    "RandLateralFlipd",
    "TokenizeText",
    "TokenizeTextd",
    "LoadSegmentableImaged",
    "MAX_INPUT_VOXELS",
    "get_slice_preprocessing",
    "get_load_transforms",
    "get_train_transforms",
    "get_val_transforms",
]

#: Spatial axis (tensor dim ``1 + LATERAL_AXIS`` of a channel-first image) that runs left-right across the picture
#: as a viewer sees it, in MONAI's loading convention (see the module docstring).
LATERAL_AXIS = 0

#: Most values (pixels x frames x colour samples) an input file may hold for :class:`LoadSegmentableImaged`: 2**28
#: (268 M: a 512 x 512 x 1024 CT, a 16384 x 16384 picture). Read from the file's header before any decoding; larger
#: files are refused (one at the limit takes about 6 GB of memory to segment).
MAX_INPUT_VOXELS = 2**28

logger = logging.getLogger(__name__)

_REDUCTIONS = ("mean", "max")


def _check_size(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")


class Grayscale2D(Transform):
    """Channel-first 2-D image ``(C, X, Y[, 1...])`` to one channel ``(1, X, Y)``.

    X-rays arrive as 8/16-bit grayscale PNG, RGB(A) PNG/JPEG, DICOM, or single-slice NIfTI ``(X, Y, 1)``; this
    drops trailing singleton spatial axes, drops an alpha channel, and merges colour channels.

    Args:
        reduction: ``"mean"`` for images, ``"max"`` for masks (a mask drawn in any colour stays foreground).
    """

    def __init__(self, reduction: str = "mean") -> None:
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        """Reduce ``img`` ``(C, X, Y[, 1...])`` to float32 ``(1, X, Y)``.

        Raises:
            ValueError: if ``img`` has more than two non-singleton spatial axes, or fewer than two spatial axes.
        """
        img = torch.as_tensor(img) if not isinstance(img, torch.Tensor) else img
        while img.ndim > 3 and img.shape[-1] == 1:
            img = img.squeeze(-1)  # (C, X, Y, 1) -> (C, X, Y)
        if img.ndim != 3:
            raise ValueError(f"image must be channel-first 2-D (C, X, Y), got shape {tuple(img.shape)}; "
                             f"volumes are segmented slice by slice")
        img = img.to(torch.float32)
        if img.shape[0] == 4:
            img = img[:3]  # RGBA -> RGB
        if img.shape[0] > 1:
            img = img.mean(dim=0, keepdim=True) if self.reduction == "mean" else img.amax(dim=0, keepdim=True)
        return img


class Grayscale2Dd(MapTransform):
    """Dictionary version of :class:`Grayscale2D`; ``reduction`` may be one per key."""

    def __init__(self, keys: KeysCollection, reduction: str | Sequence[str] = "mean",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        reductions = [reduction] * len(self.keys) if isinstance(reduction, str) else list(reduction)
        if len(reductions) != len(self.keys):
            raise ValueError(f"reduction must be one name or one per key ({len(self.keys)}), got {reduction!r}")
        self.converters = [Grayscale2D(r) for r in reductions]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, converter in self.key_iterator(d, self.converters):
            d[key] = converter(d[key])
        return d


class Binarize(Transform):
    """Mask to float32 {0, 1}: 1 where the value is strictly above ``threshold`` (default: any non-zero value)."""

    def __init__(self, threshold: float = 0.0) -> None:
        self.threshold = float(threshold)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        """``(img > threshold)`` as float32, same shape and metadata."""
        img = torch.as_tensor(img) if not isinstance(img, torch.Tensor) else img
        return (img > self.threshold).to(torch.float32)


class Binarized(MapTransform):
    """Dictionary version of :class:`Binarize`."""

    def __init__(self, keys: KeysCollection = "label", threshold: float = 0.0,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.binarize = Binarize(threshold)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.binarize(d[key])
        return d


class TokenizeText(Transform):
    """Prompt string to CLIP token ids ``(context_length,)`` int64, with the package's ``PromptTokenizer``.

    Truncation of prompts longer than ``context_length`` is logged as a warning by the tokenizer.

    Args:
        context_length: token slots, start- and end-of-text included.
        allow_empty: accept empty prompts (the ``empty`` prompt transform, to measure reliance on text).
    """

    def __init__(self, context_length: int = 32, allow_empty: bool = False) -> None:
        _check_size("context_length", context_length, 3)
        self.tokenizer = PromptTokenizer(context_length)
        self.allow_empty = allow_empty

    def __call__(self, prompt: str) -> torch.Tensor:
        """Token ids of ``prompt``, ``(context_length,)`` int64, zero-padded.

        Raises:
            TypeError: if ``prompt`` is not a ``str``.
            ValueError: if ``prompt`` is empty and ``allow_empty`` is false.
        """
        return self.tokenizer(prompt, allow_empty=self.allow_empty)[0].to(torch.int64)


class TokenizeTextd(MapTransform):
    """Dictionary version of :class:`TokenizeText`: reads ``keys`` (a prompt string), writes ``output_key``.

    Args:
        keys: key of the prompt string (one key).
        output_key: key the token ids are written to; the prompt is kept.
        context_length: token slots, start- and end-of-text included.
        allow_empty: accept empty prompts.
    """

    def __init__(self, keys: KeysCollection = "prompt", output_key: str = "text", context_length: int = 32,
                 allow_empty: bool = False, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"keys must name one prompt key, got {self.keys}")
        self.output_key = output_key
        self.tokenize = TokenizeText(context_length, allow_empty)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.output_key] = self.tokenize(d[key])
        return d


class PromptTransformd(MapTransform):
    """Apply a named prompt transform (``none``, ``swap``, ``empty``; see :mod:`causalclipseg.data.prompts`)."""

    def __init__(self, keys: KeysCollection = "prompt", name: str = "none", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.name = name
        self.func = get_prompt_transform(name)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.func(d[key])
        return d


class RandLateralFlipd(RandFlipd):
    """Mirror image and mask left-right AND swap "left"/"right" in the prompt, drawn once per sample.

    Prompts name the patient's side; mirroring the picture moves each lung to the other side of the image, so the
    words must follow (DESIGN.md section 1). A flip without the swap teaches the model to ignore laterality.
    Flips spatial axis :data:`LATERAL_AXIS` in MONAI's loading convention; invertible like ``RandFlipd``.

    Args:
        keys: image-like keys flipped together.
        prompt_key: key of the prompt string, swapped when the flip happens; ``None`` to leave prompts alone.
        prob: probability of flipping a sample.
        spatial_axis: the axis to flip (keep the default unless images are loaded another way).
    """

    def __init__(self, keys: KeysCollection = ("image", "label"), prompt_key: str | None = "prompt",
                 prob: float = 0.5, spatial_axis: int = LATERAL_AXIS, allow_missing_keys: bool = False) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        super().__init__(keys, prob=prob, spatial_axis=spatial_axis, allow_missing_keys=allow_missing_keys)
        self.prompt_key = prompt_key

    def _swap_prompt(self, d: dict[Hashable, Any]) -> None:
        if self.prompt_key is None:
            return
        if self.prompt_key not in d:
            if self.allow_missing_keys:
                return
            raise KeyError(f"prompt_key {self.prompt_key!r} not in the data (keys: {list(d)}); pass prompt_key=None "
                           f"to flip without a prompt")
        d[self.prompt_key] = swap_laterality(d[self.prompt_key])

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        d = super().__call__(data, lazy)
        if self._do_transform:
            self._swap_prompt(d)
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        first = next(iter(self.key_iterator(d)), None)
        flipped = first is not None and self.get_most_recent_transform(d, first, check=False)[TraceKeys.DO_TRANSFORM]
        d = super().inverse(d)
        if flipped:
            self._swap_prompt(d)
        return d


# --------------------------------------------------------------------------------------- reading an input file
_PICTURE_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif"}  # PIL format -> usual suffix
#: what a file-name suffix promises; content of another kind is refused (the fix is to rename the file)
_SUFFIX_KINDS = {".png": "picture", ".jpg": "picture", ".jpeg": "picture", ".bmp": "picture", ".tif": "picture",
                 ".tiff": "picture", ".dcm": "DICOM", ".nii": "NIfTI", ".nii.gz": "NIfTI", ".nrrd": "NRRD",
                 ".nhdr": "NRRD"}
_KIND_SUFFIXES = {"DICOM": ".dcm", "NIfTI": ".nii.gz", "NRRD": ".nrrd"}
_READABLE = "PNG, JPEG, BMP, TIFF, DICOM (with its 'DICM' preamble), NIfTI or NRRD"


class _Unreadable(ValueError):
    """An input the loader refuses; the message is the reason, the caller adds the file name."""


@dataclass
class _InputHeader:
    """What an input file's header says, read before any pixel is decoded."""

    kind: str  # picture, DICOM, NIfTI, NRRD
    format: str  # PNG, JPEG, ..., DICOM, NIfTI-1, ...
    values: int  # pixels x frames (or slices) x colour samples
    frames: int = 1  # pages of a picture, frames (times files) of DICOM
    samples: int = 1  # DICOM SamplesPerPixel
    photometric: str = ""  # DICOM PhotometricInterpretation
    geometry: str = "affine"  # where the orientation comes from: one of io.orientation.GEOMETRIES
    patient_orientation: tuple[str, str] | None = None  # DICOM Patient Orientation, when it is what orients the image
    pixel_spacing: tuple[float, float] = (1.0, 1.0)  # DICOM (column, row) spacing, for that orientation's affine
    dataset: Any = None  # DICOM: the first file's header (LUTs, window, photometric), for io.dicom.voi_display


def error_reason(err: BaseException) -> str:
    """The most useful line of an exception message (libraries put the cause last), on one line."""
    lines = [line.strip() for line in str(err.__cause__ or err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def _nifti_magic(head: bytes) -> str | None:
    """``NIfTI-1``, ``NIfTI-2`` or ``Analyze`` from the first bytes of an uncompressed header, else ``None``."""
    if len(head) >= 348:
        for order in "<>":
            size = struct.unpack(order + "i", head[:4])[0]
            if size == 348:
                return "NIfTI-1" if head[344:348] in (b"n+1\x00", b"ni1\x00") else "Analyze"
            if size == 540 and head[4:8] in (b"n+2\x00", b"ni2\x00"):
                return "NIfTI-2"
    return None


def _sniff(path: Path, head: bytes) -> tuple[str, str] | None:
    """``(kind, format)`` of a file from its content (not its name), or ``None`` when not recognised."""
    if head[128:132] == b"DICM":
        return "DICOM", "DICOM"
    if head.startswith(b"NRRD"):
        return "NRRD", "NRRD"
    if head.startswith(b"\x1f\x8b"):  # gzip: look at what it holds
        try:
            with gzip.open(path, "rb") as f:
                inner = f.read(544)
        except (OSError, EOFError):
            inner = b""
        magic = _nifti_magic(inner)
        return ("NIfTI", magic) if magic else None
    magic = _nifti_magic(head)
    if magic:
        return "NIfTI", magic
    from PIL import Image

    try:
        with Image.open(path, formats=list(_PICTURE_FORMATS)) as image:
            return "picture", str(image.format)
    except Image.DecompressionBombError as err:  # PIL refuses pictures of more than 2 * MAX_IMAGE_PIXELS itself
        pixels = re.search(r"\((\d+) pixels\)", str(err))
        raise _Unreadable(f"it holds {pixels.group(1) if pixels else 'too many'} pixels, more than PIL decodes "
                          f"safely and more than the {MAX_INPUT_VOXELS} this tool accepts") from err
    except Exception:  # noqa: BLE001 - PIL raises many types for "not a picture it knows"
        return None


def _picture_header(path: Path, fmt: str) -> _InputHeader:
    from PIL import Image

    with Image.open(path, formats=[fmt]) as image:
        frames = int(getattr(image, "n_frames", 1))
        values = image.width * image.height * frames * len(image.getbands())
        return _InputHeader("picture", fmt, values, frames=frames, geometry="picture")


def _dicom_header(path: Path) -> _InputHeader:
    """Header of a DICOM file, or of a series folder (its first DICOM file, times the number of files)."""
    import pydicom
    try:
        from pydicom.pixels import get_decoder  # pydicom >= 3
    except ImportError:  # pydicom 2 (MONAI Label 0.8.5 pins it) has no decoder registry: decoding reports it
        get_decoder = None

    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    first = next((p for p in files if pydicom.misc.is_dicom(p)), None)
    if first is None:
        raise _Unreadable("the folder holds no DICOM file")
    try:
        ds = pydicom.dcmread(first, stop_before_pixels=True)
        if "Rows" not in ds or "Columns" not in ds:
            what = getattr(ds.get("SOPClassUID"), "name", "") or "no Rows/Columns"
            raise _Unreadable(f"the DICOM file holds no image ({what}): nothing to segment")
        frames = int(ds.get("NumberOfFrames") or 1) * len(files)
        samples = int(ds.get("SamplesPerPixel") or 1)
        values = int(ds.Rows) * int(ds.Columns) * frames * samples
        photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
        syntax = ds.file_meta.get("TransferSyntaxUID")
        geometry, orientation, spacing = _dicom_geometry(ds)
    except _Unreadable:
        raise
    except Exception as err:  # noqa: BLE001 - pydicom raises many types; all mean "broken header"
        raise _Unreadable(f"its DICOM header cannot be read ({error_reason(err)})") from err
    if syntax is not None:
        try:
            decoder = get_decoder(syntax) if syntax.is_compressed and get_decoder is not None else None
        except (NotImplementedError, ValueError) as err:
            raise _Unreadable(f"its pixel data is encoded as {syntax.name or syntax}, which cannot be decoded "
                              f"here") from err
        if decoder is not None and not decoder.is_available:
            missing = "; ".join(" ".join(m.split()) for m in decoder.missing_dependencies)
            raise _Unreadable(f"its pixel data is compressed as {syntax.name} and no installed decoder reads it "
                              f"(any one of: {missing})")
    return _InputHeader("DICOM", "DICOM", values, frames=frames, samples=samples, photometric=photometric,
                        geometry=geometry, patient_orientation=orientation, pixel_spacing=spacing, dataset=ds)


def _dicom_geometry(ds: Any) -> tuple[str, tuple[str, str] | None, tuple[float, float]]:
    """Where a DICOM image's orientation comes from: Image Orientation (Patient) (MONAI's reader builds the affine
    from it), else Patient Orientation (projection radiographs), else nothing: ``(geometry, codes, spacing)``."""
    if len(ds.get("ImageOrientationPatient") or ()) == 6:
        return "affine", None, (1.0, 1.0)
    codes = tuple(str(c).strip().upper() for c in (ds.get("PatientOrientation") or ()))
    spacing = ds.get("ImagerPixelSpacing") or ds.get("PixelSpacing") or (1.0, 1.0)
    try:
        row_spacing, column_spacing = (float(v) for v in spacing)
    except (TypeError, ValueError):
        row_spacing = column_spacing = 1.0
    if len(codes) == 2 and patient_orientation_affine(codes) is not None:  # type: ignore[arg-type]
        return "affine", codes, (column_spacing, row_spacing)  # type: ignore[return-value]
    return "unknown", None, (1.0, 1.0)


def _nibabel_header(path: Path) -> _InputHeader:
    import nibabel as nib
    from nibabel.analyze import AnalyzeHeader

    try:
        image = nib.load(path)
    except Exception as err:  # noqa: BLE001 - nibabel raises many types; all mean "cannot read"
        raise _Unreadable(error_reason(err)) from err
    if not isinstance(image.header, AnalyzeHeader):  # MGH, MINC, PAR/REC, AFNI, CIFTI, ...
        raise _Unreadable(f"{type(image).__name__} files are not supported: convert it to NIfTI")
    header = image.header
    coded = any(int(header.get(code, 0) or 0) > 0 for code in ("qform_code", "sform_code")) if \
        "qform_code" in header else False  # Analyze headers have no orientation codes
    return _InputHeader("NIfTI", type(image).__name__, int(np.prod(image.shape, dtype=np.int64)),
                        geometry="affine" if coded else "unknown")


def _nrrd_header(path: Path) -> _InputHeader:
    import nrrd

    try:
        header = nrrd.read_header(str(path))
        sizes = [int(s) for s in header["sizes"]]
    except Exception as err:  # noqa: BLE001 - pynrrd raises many types; all mean "broken header"
        raise _Unreadable(f"its NRRD header cannot be read ({error_reason(err)})") from err
    return _InputHeader("NRRD", "NRRD", int(np.prod(sizes, dtype=np.int64)),
                        geometry="affine" if header.get("space") else "unknown")


def _read_input_header(path: str | os.PathLike, max_voxels: int = MAX_INPUT_VOXELS) -> _InputHeader:
    """Recognise an input by its content and read its header, without decoding pixels.

    Raises:
        ValueError: (without the file name) for an empty, unrecognised or misnamed file, an image too large
            (``max_voxels``), a DICOM file without an image or with pixel data no installed decoder reads.
    """
    path = Path(path)
    if path.is_dir():
        header = _dicom_header(path)
    else:
        try:
            with open(path, "rb") as f:
                head = f.read(1024)
        except OSError as err:
            raise _Unreadable(err.strerror or error_reason(err)) from err
        if not head:
            raise _Unreadable("the file is empty (0 bytes)")
        found = _sniff(path, head)
        if found is None:  # nibabel also knows NIfTI/Analyze pairs (.img/.hdr) and other formats by their names
            import nibabel as nib

            try:
                nib.load(path)
            except Exception:  # noqa: BLE001 - nibabel raises many types; all mean "not a format it knows"
                raise _Unreadable(f"not an image file this tool reads ({_READABLE})") from None
            found = "NIfTI", "nibabel"
        kind, fmt = found
        promised = _SUFFIX_KINDS.get(file_suffix(path))
        if promised is not None and promised != kind:
            good = _PICTURE_FORMATS.get(fmt, ".png") if kind == "picture" else _KIND_SUFFIXES[kind]
            raise _Unreadable(f"it holds a {fmt} image but its name ends in {file_suffix(path)}: rename it to end "
                              f"in {good}")
        readers = {"picture": lambda: _picture_header(path, fmt), "DICOM": lambda: _dicom_header(path),
                   "NRRD": lambda: _nrrd_header(path), "NIfTI": lambda: _nibabel_header(path)}
        header = readers[kind]()
    if header.values > max_voxels:
        raise _Unreadable(f"it holds {header.values} values (pixels x slices x colour samples), more than the "
                          f"{max_voxels} this tool accepts")
    return header


def _plain_picture(image: Any) -> Any:
    """PIL converter: palette, CMYK, YCbCr, ... pictures to RGB, gray + alpha to gray; gray, RGB(A), 16-bit and
    float pictures as they are (a palette picture's raw values are colour indices, not intensities)."""
    if image.mode in ("1", "L", "RGB", "RGBA", "F") or image.mode.startswith("I"):
        return image
    return image.convert("L" if image.mode in ("LA", "La") else "RGB")


def _complete_slice_normal(img: torch.Tensor) -> None:
    """Make a DICOM affine invertible, in place: for a single slice (or slices at one position) MONAI's reader
    sets the third column to ``(0, 0, 1)`` (or zero) whatever the slice's plane, which is singular for sagittal and
    coronal slices; the column becomes the slice normal (row x column direction), keeping its length (1 if none)."""
    affine = getattr(img, "affine", None)
    if affine is None or tuple(affine.shape) != (4, 4):
        return
    a = affine.detach().cpu().double().clone()
    if abs(float(torch.linalg.det(a[:3, :3]))) > 1e-12:
        return
    normal = torch.linalg.cross(a[:3, 0], a[:3, 1])
    if float(normal.norm()) < 1e-12:
        return  # the in-plane directions themselves are broken: left as read
    length = float(a[:3, 2].norm()) or 1.0
    a[:3, 2] = normal / normal.norm() * length
    img.affine = a.to(affine.dtype)


def _quiet_load_image() -> LoadImage:
    """MONAI's ``LoadImage`` without the warnings its GPU DICOM reader prints on machines without nvImageCodec."""
    plugin_log = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    disabled, plugin_log.disabled = plugin_log.disabled, True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return LoadImage(image_only=True, ensure_channel_first=True)
    finally:
        plugin_log.disabled = disabled


class LoadSegmentableImaged(MapTransform):
    """Read an image file or DICOM series into what the slice-wise network takes, on its own grid (no resampling).

    MONAI's readers read it (PNG/JPEG/BMP/TIFF, DICOM file or series folder, NIfTI, NRRD) channel first with its
    metadata (affine, file name, and :data:`~causalclipseg.io.orientation.GEOMETRY_KEY`: where its orientation
    comes from; a radiograph's affine is built from its Patient Orientation); 2-D inputs (and volumes with one
    slice) become grayscale ``(1, X, Y)`` (colour merged, alpha dropped, as in training); volumes stay
    ``(1, X, Y, Z)``. :class:`~causalclipseg.io.orientation.DisplayOrientation` then orients them for the model.

    Input policy (every refusal is a ``ValueError`` naming the file and the reason, before anything is written):

    - the format is recognised by the file's content; a name promising another format (a PNG named ``.dcm``)
      is refused with the name to use; empty files and other formats are refused;
    - the header is read first, and an input holding more than :data:`MAX_INPUT_VOXELS` values is refused before
      any decoding, as is DICOM whose compressed pixel data no installed decoder reads, or DICOM without an image;
    - DICOM is shown as a viewer shows it (:func:`causalclipseg.io.dicom.voi_display`: modality LUT, the first
      window or VOI LUT, ``MONOCHROME1`` and Presentation LUT Shape inversion), colour (RGB, YBR) is merged
      to gray like colour pictures; ``PALETTE COLOR`` and multi-frame colour DICOM are refused; palette and CMYK
      pictures are converted to RGB first (their raw values are not intensities);
    - 4-D inputs (time series, several values per voxel) and multi-page pictures are refused: extract one image;
    - NaN or infinite values are refused rather than guessed (a mask of a partly undefined image could look
      right and be wrong), and so is an image whose pixels all have one value (there is nothing to segment).

    Args:
        keys: keys holding the file or folder to read.
        max_voxels: the size limit, :data:`MAX_INPUT_VOXELS` by default.

    Raises:
        ValueError: as above, naming the file.
    """

    def __init__(self, keys: str | Sequence[str] = "image", allow_missing_keys: bool = False,
                 max_voxels: int = MAX_INPUT_VOXELS) -> None:
        super().__init__(keys, allow_missing_keys)
        from monai.data import NibabelReader, NrrdReader, PILReader, PydicomReader

        self.loader = _quiet_load_image()
        self.readers = {"picture": PILReader(converter=_plain_picture), "DICOM": PydicomReader(),
                        "NIfTI": NibabelReader(), "NRRD": NrrdReader()}
        self.max_voxels = max_voxels
        self.grayscale = Grayscale2D("mean")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            source = d[key]
            if not isinstance(source, (str, os.PathLike)):
                raise TypeError(f"{key} must be a file or folder path, got {type(source).__name__}")
            caught: list[warnings.WarningMessage] = []
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    header = _read_input_header(source, self.max_voxels)
                    self._check_header(header)
                    img = self.loader(str(source), reader=self.readers[header.kind])
            except _Unreadable as err:
                raise ValueError(f"cannot read {source}: {err}") from err
            except Exception as err:  # noqa: BLE001 - readers raise many types; all mean "unreadable"
                raise ValueError(f"cannot read {source}: {error_reason(err)}") from err
            finally:
                for warning in caught:  # readers' remarks on odd headers: kept out of the user's terminal
                    logger.debug("%s: %s", source, warning.message)
            if header.kind == "DICOM":
                if header.samples == 1:  # as a viewer shows it: modality LUT, first window or VOI LUT, inversion
                    img = MetaTensor(torch.from_numpy(voi_display(img.numpy(), header.dataset))).copy_meta_from(img)
                img = self._dicom_colour(img, header)
                _complete_slice_normal(img)
                if header.patient_orientation is not None:
                    img.affine = torch.as_tensor(patient_orientation_affine(header.patient_orientation,
                                                                            header.pixel_spacing))
            img.meta[GEOMETRY_KEY] = header.geometry
            spatial = [s for s in img.shape[1:]]
            while len(spatial) > 2 and spatial[-1] == 1:
                spatial.pop()
            if len(spatial) == 2:
                img = self.grayscale(img)
            elif len(spatial) == 3 and img.shape[0] == 1:
                img = img.reshape(1, *spatial).float()
            else:
                raise ValueError(f"cannot segment {source}: it is {len(spatial) + (img.shape[0] > 1)}-D ("
                                 f"{img.shape[0]} image(s) of shape {tuple(spatial)}); only 2-D images and 3-D "
                                 f"volumes are segmented: extract one image or volume first")
            if not torch.isfinite(img).all():
                raise ValueError(f"cannot segment {source}: it contains NaN or infinite pixel values")
            low, high = float(img.min()), float(img.max())
            if low == high:
                raise ValueError(f"cannot segment {source}: every pixel has the value {low:g}, there is nothing "
                                 f"to segment")
            d[key] = img
        return d

    @staticmethod
    def _check_header(header: _InputHeader) -> None:
        """Refuse, before decoding, what the header shows cannot be segmented as one image or volume."""
        if header.frames > 1 and header.kind == "picture":
            raise _Unreadable(f"it is a {header.format} of {header.frames} pages: save the page to segment as a "
                              f"picture of its own")
        if header.kind == "DICOM" and header.photometric == "PALETTE COLOR":
            raise _Unreadable("PALETTE COLOR DICOM (pixel values index a colour table) is not supported: export it "
                              "as MONOCHROME2 or RGB")
        if header.kind == "DICOM" and header.samples > 1 and header.frames > 1:
            raise _Unreadable(f"multi-frame colour DICOM ({header.frames} frames of {header.samples} samples) is not "
                              f"supported: export one frame, or gray frames")

    @staticmethod
    def _dicom_colour(img: torch.Tensor, header: _InputHeader) -> torch.Tensor:
        """MONAI's DICOM reader leaves colour samples as a last spatial axis, ``(1, X, Y, 3)``: make them channels."""
        if header.samples > 1 and img.ndim == 4 and img.shape[0] == 1 and img.shape[-1] == header.samples:
            img = img[0].movedim(-1, 0)  # (3, X, Y), merged to gray below like a colour picture
            if hasattr(img, "meta"):
                img.meta["spatial_shape"] = tuple(img.shape[1:])
        return img


def get_load_transforms(image_size: int = 224, keys: Sequence[str] = ("image", "label")) -> list[Transform]:
    """The deterministic loading prefix: read, channel first, grayscale, [0, 1], resize to ``S x S``, binarise mask.

    Output: ``image`` float32 ``(1, S, S)`` in [0, 1]; ``label`` (if in ``keys``) float32 ``(1, S, S)`` in {0, 1}.
    These transforms are deterministic, so ``monai.data.CacheDataset`` caches their result.

    Args:
        image_size: side ``S`` of the square model input.
        keys: ``("image", "label")`` for training and evaluation, ``("image",)`` for inference.
    """
    _check_size("image_size", image_size, 1)
    keys = tuple(keys)
    if "image" not in keys or not set(keys) <= {"image", "label"}:
        raise ValueError(f"keys must be ('image',) or ('image', 'label'), got {keys}")
    modes = tuple("bilinear" if k == "image" else "nearest" for k in keys)
    transforms: list[Transform] = [
        LoadImaged(keys, image_only=True),
        EnsureChannelFirstd(keys),
        Grayscale2Dd(keys, reduction=["mean" if k == "image" else "max" for k in keys]),
        ScaleIntensityd("image", minv=0.0, maxv=1.0),
        Resized(keys, spatial_size=(image_size, image_size), mode=modes,
                anti_aliasing=[k == "image" for k in keys]),
    ]
    if "label" in keys:
        transforms.append(Binarized("label"))
    return transforms


def _finish_transforms(keys: Sequence[str], context_length: int, prompt_transform: str = "none") -> list[Transform]:
    """The deterministic tail: the prompt transform, 3 channels, CLIP normalisation, tokens, dtypes.

    Raises:
        ValueError: if ``prompt_transform`` is not a registered name.
    """
    get_prompt_transform(prompt_transform)
    return [
        PromptTransformd("prompt", prompt_transform),
        RepeatChanneld("image", repeats=3),
        NormalizeIntensityd("image", subtrahend=OPENAI_DATASET_MEAN, divisor=OPENAI_DATASET_STD, channel_wise=True),
        TokenizeTextd("prompt", output_key="text", context_length=context_length,
                      allow_empty=prompt_transform == "empty"),
        EnsureTyped(tuple(keys), dtype=torch.float32),
    ]


def get_slice_preprocessing(image_size: int = 224) -> Compose:
    """Array transforms taking one raw grayscale slice ``(1, X, Y)`` to the model input ``(3, S, S)``.

    The same steps, with the same settings, as the dictionary pipeline (:func:`get_load_transforms` after
    reading, then the tail of the training and evaluation transforms): min-max to [0, 1], anti-aliased
    bilinear resize to ``S x S``, 3 channels, CLIP normalisation. The slice-wise inference network
    (:class:`causalclipseg.engine.inference.SliceSegmenter`) applies it to every slice of a volume.
    """
    _check_size("image_size", image_size, 1)
    return Compose([
        ScaleIntensity(minv=0.0, maxv=1.0),
        Resize(spatial_size=(image_size, image_size), mode="bilinear", anti_aliasing=True),
        RepeatChannel(repeats=3),
        NormalizeIntensity(subtrahend=OPENAI_DATASET_MEAN, divisor=OPENAI_DATASET_STD, channel_wise=True),
    ])


def get_train_transforms(image_size: int = 224, context_length: int = 32, augment: bool = True,
                         prompt_transform: str = "none") -> Compose:
    """Training transforms for records ``{"image", "label", "prompt"}`` (see the module docstring for the output).

    Order: the deterministic loading prefix (:func:`get_load_transforms`, cached by ``CacheDataset``), then the
    random part, cheap enough for CPU training: :class:`RandLateralFlipd` (p 0.5, swaps the prompt's sides), a small
    ``RandAffined`` on image and mask together (p 0.5, rotation within +/-10 degrees, scale 0.9-1.1 per axis,
    bilinear / nearest), and mild intensity jitter on the [0, 1] image (scale +/-10 %, shift +/-0.05, gamma
    0.85-1.15, p 0.5 / 0.5 / 0.3); then the deterministic tail (3 channels, CLIP normalisation, tokens).

    Args:
        image_size: side of the square model input.
        context_length: token slots of the text encoder.
        augment: include the random part; without it the result equals :func:`get_val_transforms`.
        prompt_transform: ``none``, or ``empty`` to train without text (the ablation); ``swap`` would teach the
            wrong side and is refused.

    Raises:
        ValueError: for ``swap`` or an unregistered name.
    """
    if prompt_transform == "swap":
        raise ValueError("prompt_transform 'swap' would train on prompts naming the wrong side; use 'none' or 'empty'")
    keys = ("image", "label")
    transforms = get_load_transforms(image_size, keys)
    if augment:
        # --- random part starts here: everything above is deterministic and cacheable ---
        transforms += [
            RandLateralFlipd(keys, prompt_key="prompt", prob=0.5),
            RandAffined(keys, prob=0.5, rotate_range=np.deg2rad(10.0), scale_range=(0.1, 0.1),
                        mode=("bilinear", "nearest"), padding_mode="zeros"),
            RandScaleIntensityd("image", factors=0.1, prob=0.5),
            RandShiftIntensityd("image", offsets=0.05, prob=0.5),
            RandAdjustContrastd("image", gamma=(0.85, 1.15), prob=0.3),
        ]
    return Compose(transforms + _finish_transforms(keys, context_length, prompt_transform))


def get_val_transforms(image_size: int = 224, context_length: int = 32, prompt_transform: str = "none",
                       mirror: bool = False) -> Compose:
    """Evaluation transforms for records ``{"image", "label", "prompt"}``; deterministic (the loading is cacheable).

    Args:
        image_size: side of the square model input.
        context_length: token slots of the text encoder.
        prompt_transform: ``none``, ``swap`` (left/right exchanged) or ``empty``, to measure reliance on the text;
            the output ``prompt`` is the transformed one.
        mirror: mirror every image and mask left-right and swap the prompt's sides with them (what
            :class:`RandLateralFlipd` does to half the training samples): a model that learned the flip scores
            the same as without it (mirror equivariance).

    Raises:
        ValueError: if ``prompt_transform`` is not a registered name.
    """
    keys = ("image", "label")
    flip = [RandLateralFlipd(keys, prompt_key="prompt", prob=1.0)] if mirror else []
    return Compose(get_load_transforms(image_size, keys) + flip + _finish_transforms(keys, context_length,
                                                                                      prompt_transform))
