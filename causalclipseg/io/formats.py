"""What an input file is, from its content and header, before any pixel is decoded.

:func:`read_input_header` recognises PNG, JPEG, BMP, TIFF, DICOM, NIfTI (and Analyze) and NRRD by their bytes (a
name promising another format is refused with the name to use), reads the header of what it found, and refuses an
input holding more than :data:`MAX_INPUT_VOXELS` values. :class:`causalclipseg.io.reader.LoadSegmentableImaged`
uses it to choose MONAI's reader and to refuse what cannot be segmented before decoding it.
"""

from __future__ import annotations

import gzip
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .inputs import file_suffix
from .orientation import patient_orientation_affine

__all__ = ["MAX_INPUT_VOXELS", "InputHeader", "Unreadable", "error_reason", "read_input_header"]

#: Most values (pixels x frames x colour samples) an input file may hold: 2**28 (268 M: a 512 x 512 x 1024 CT, a
#: 16384 x 16384 picture). Read from the file's header before any decoding; larger files are refused (one at the
#: limit takes about 6 GB of memory to segment).
MAX_INPUT_VOXELS = 2**28

_PICTURE_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif"}  # PIL format -> usual suffix
#: what a file-name suffix promises; content of another kind is refused (the fix is to rename the file)
_SUFFIX_KINDS = {".png": "picture", ".jpg": "picture", ".jpeg": "picture", ".bmp": "picture", ".tif": "picture",
                 ".tiff": "picture", ".dcm": "DICOM", ".nii": "NIfTI", ".nii.gz": "NIfTI", ".nrrd": "NRRD",
                 ".nhdr": "NRRD"}
_KIND_SUFFIXES = {"DICOM": ".dcm", "NIfTI": ".nii.gz", "NRRD": ".nrrd"}
_READABLE = "PNG, JPEG, BMP, TIFF, DICOM (with its 'DICM' preamble), NIfTI or NRRD"


class Unreadable(ValueError):
    """An input the loader refuses; the message is the reason, the caller adds the file name."""


@dataclass
class InputHeader:
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
        raise Unreadable(f"it holds {pixels.group(1) if pixels else 'too many'} pixels, more than PIL decodes "
                          f"safely and more than the {MAX_INPUT_VOXELS} this tool accepts") from err
    except Exception:  # noqa: BLE001 - PIL raises many types for "not a picture it knows"
        return None


def _picture_header(path: Path, fmt: str) -> InputHeader:
    from PIL import Image

    with Image.open(path, formats=[fmt]) as image:
        frames = int(getattr(image, "n_frames", 1))
        values = image.width * image.height * frames * len(image.getbands())
        return InputHeader("picture", fmt, values, frames=frames, geometry="picture")


def _dicom_header(path: Path) -> InputHeader:
    """Header of a DICOM file, or of a series folder (its first DICOM file, times the number of files)."""
    import pydicom
    try:
        from pydicom.pixels import get_decoder  # pydicom >= 3
    except ImportError:  # pydicom 2 (MONAI Label 0.8.5 pins it) has no decoder registry: decoding reports it
        get_decoder = None

    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    first = next((p for p in files if pydicom.misc.is_dicom(p)), None)
    if first is None:
        raise Unreadable("the folder holds no DICOM file")
    try:
        ds = pydicom.dcmread(first, stop_before_pixels=True)
        if "Rows" not in ds or "Columns" not in ds:
            what = getattr(ds.get("SOPClassUID"), "name", "") or "no Rows/Columns"
            raise Unreadable(f"the DICOM file holds no image ({what}): nothing to segment")
        frames = int(ds.get("NumberOfFrames") or 1) * len(files)
        samples = int(ds.get("SamplesPerPixel") or 1)
        values = int(ds.Rows) * int(ds.Columns) * frames * samples
        photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
        syntax = ds.file_meta.get("TransferSyntaxUID")
        geometry, orientation, spacing = _dicom_geometry(ds)
    except Unreadable:
        raise
    except Exception as err:  # noqa: BLE001 - pydicom raises many types; all mean "broken header"
        raise Unreadable(f"its DICOM header cannot be read ({error_reason(err)})") from err
    if syntax is not None:
        try:
            decoder = get_decoder(syntax) if syntax.is_compressed and get_decoder is not None else None
        except (NotImplementedError, ValueError) as err:
            raise Unreadable(f"its pixel data is encoded as {syntax.name or syntax}, which cannot be decoded "
                              f"here") from err
        if decoder is not None and not decoder.is_available:
            missing = "; ".join(" ".join(m.split()) for m in decoder.missing_dependencies)
            raise Unreadable(f"its pixel data is compressed as {syntax.name} and no installed decoder reads it "
                              f"(any one of: {missing})")
    return InputHeader("DICOM", "DICOM", values, frames=frames, samples=samples, photometric=photometric,
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


def _nibabel_header(path: Path) -> InputHeader:
    import nibabel as nib
    from nibabel.analyze import AnalyzeHeader

    try:
        image = nib.load(path)
    except Exception as err:  # noqa: BLE001 - nibabel raises many types; all mean "cannot read"
        raise Unreadable(error_reason(err)) from err
    if not isinstance(image.header, AnalyzeHeader):  # MGH, MINC, PAR/REC, AFNI, CIFTI, ...
        raise Unreadable(f"{type(image).__name__} files are not supported: convert it to NIfTI")
    header = image.header
    coded = any(int(header.get(code, 0) or 0) > 0 for code in ("qform_code", "sform_code")) if \
        "qform_code" in header else False  # Analyze headers have no orientation codes
    return InputHeader("NIfTI", type(image).__name__, int(np.prod(image.shape, dtype=np.int64)),
                        geometry="affine" if coded else "unknown")


def _nrrd_header(path: Path) -> InputHeader:
    import nrrd

    try:
        header = nrrd.read_header(str(path))
        sizes = [int(s) for s in header["sizes"]]
    except Exception as err:  # noqa: BLE001 - pynrrd raises many types; all mean "broken header"
        raise Unreadable(f"its NRRD header cannot be read ({error_reason(err)})") from err
    return InputHeader("NRRD", "NRRD", int(np.prod(sizes, dtype=np.int64)),
                        geometry="affine" if header.get("space") else "unknown")


def read_input_header(path: str | os.PathLike, max_voxels: int = MAX_INPUT_VOXELS) -> InputHeader:
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
            raise Unreadable(err.strerror or error_reason(err)) from err
        if not head:
            raise Unreadable("the file is empty (0 bytes)")
        found = _sniff(path, head)
        if found is None:  # nibabel also knows NIfTI/Analyze pairs (.img/.hdr) and other formats by their names
            import nibabel as nib

            try:
                nib.load(path)
            except Exception:  # noqa: BLE001 - nibabel raises many types; all mean "not a format it knows"
                raise Unreadable(f"not an image file this tool reads ({_READABLE})") from None
            found = "NIfTI", "nibabel"
        kind, fmt = found
        promised = _SUFFIX_KINDS.get(file_suffix(path))
        if promised is not None and promised != kind:
            good = _PICTURE_FORMATS.get(fmt, ".png") if kind == "picture" else _KIND_SUFFIXES[kind]
            raise Unreadable(f"it holds a {fmt} image but its name ends in {file_suffix(path)}: rename it to end "
                              f"in {good}")
        readers = {"picture": lambda: _picture_header(path, fmt), "DICOM": lambda: _dicom_header(path),
                   "NRRD": lambda: _nrrd_header(path), "NIfTI": lambda: _nibabel_header(path)}
        header = readers[kind]()
    if header.values > max_voxels:
        raise Unreadable(f"it holds {header.values} values (pixels x slices x colour samples), more than the "
                          f"{max_voxels} this tool accepts")
    return header


