"""The input policy: what a path given to ``predict``, the bundle or MONAI Label is, and which images it holds.

One function, :func:`list_inputs`, used by every front door:

- an image file (PNG/JPEG/BMP/TIFF, DICOM, NIfTI, NRRD) is one input, whatever its name (its content is checked
  when it is read: :class:`causalclipseg.io.reader.LoadSegmentableImaged`);
- a folder holding one DICOM series (2+ ``.dcm`` files sharing one SeriesInstanceUID, nothing else to segment) is
  one volume;
- any other folder: each image file directly inside it is one input (a DICOM file of a series mixed with other
  images counts alone);
- a datalist JSON (a list of paths or ``{"image": ...}`` entries, or such a list under ``testing``, ``test``,
  ``validation`` or ``training``; paths relative to the JSON's folder) names its inputs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["IMAGE_SUFFIXES", "PICTURE_SUFFIXES", "file_suffix", "list_inputs"]

#: suffixes of pictures: no geometry, masks written as PNG
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: suffixes of the files a folder is searched for
IMAGE_SUFFIXES = PICTURE_SUFFIXES + (".dcm", ".nii", ".nii.gz", ".nrrd")
_DATALIST_KEYS = ("testing", "test", "validation", "training")


def file_suffix(path: str | os.PathLike) -> str:
    """The lower-case suffix that names a file's kind: ``.nii.gz`` counts as one."""
    path = Path(path)
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _dicom_series_uid(files: list[Path]) -> str | None:
    """The SeriesInstanceUID shared by all ``files`` if they are 2+ DICOM slices of one series, else ``None``."""
    import pydicom

    if len(files) < 2:
        return None
    uids = set()
    for file in files:
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except Exception:  # noqa: BLE001 - pydicom raises many types; all mean "not a DICOM file"
            return None
        uids.add(str(getattr(ds, "SeriesInstanceUID", "")))
    return uids.pop() if len(uids) == 1 and "" not in uids else None


def _datalist_images(path: Path) -> list[Path]:
    """Image paths of a datalist JSON, relative to its folder.

    Raises:
        ValueError: for an unreadable file, none of the keys, or entries without an image.
    """
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read datalist {path}: {err}") from err
    if isinstance(content, dict):
        key = next((k for k in _DATALIST_KEYS if k in content), None)
        if key is None:
            raise ValueError(f"datalist {path} has none of the keys {list(_DATALIST_KEYS)} (keys: {sorted(content)})")
        content = content[key]
    if not isinstance(content, list) or not content:
        raise ValueError(f"datalist {path} must hold a non-empty list of images, got {type(content).__name__}")
    images = []
    for i, entry in enumerate(content):
        image = entry.get("image") if isinstance(entry, dict) else entry
        if not isinstance(image, str) or not image:
            raise ValueError(f"datalist {path} entry {i} has no 'image' path: {entry!r:.120}")
        images.append(path.parent / image)
    return images


def _folder_images(folder: Path) -> list[Path]:
    """One DICOM series folder as itself, else the image files directly inside ``folder``."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and file_suffix(p) in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"input folder {folder} holds no image file ({', '.join(IMAGE_SUFFIXES)})")
    dicoms = [p for p in files if file_suffix(p) == ".dcm"]
    if len(dicoms) == len(files) and _dicom_series_uid(dicoms) is not None:
        return [folder]
    return files


def list_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The images and volumes to segment, in order: files, DICOM series folders (see the module docstring).

    Raises:
        FileNotFoundError: if an input, or a file named by a datalist, does not exist.
        ValueError: for no input, a folder without images, or an unusable datalist.
    """
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not items:
        raise ValueError("input must name at least one file or folder, got an empty list")
    found: list[Path] = []
    for item in map(Path, items):
        if item.is_file() and item.suffix.lower() == ".json":
            paths = _datalist_images(item)
            missing = [str(p) for p in paths if not p.exists()]
            if missing:
                raise FileNotFoundError(f"datalist {item} names missing files: {', '.join(missing[:3])}")
            found += paths
        elif item.is_dir():
            found += _folder_images(item)
        elif item.exists():
            found.append(item)
        else:
            raise FileNotFoundError(f"input not found: {item} (expected an image file, a folder or a datalist JSON; "
                                    f"images: {', '.join(IMAGE_SUFFIXES)})")
    return found
