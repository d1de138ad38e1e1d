"""A mask of a DICOM input as a DICOM Segmentation object (highdicom), referencing the source instances.

A mask on a DICOM input's grid (``predict``'s and the bundle's, after ``Invertd``) is in MONAI's axis order: x along
the stored rows (the columns), y down the stored columns (the rows), z the slices in the order MONAI's reader stacked
them, which :class:`~causalclipseg.io.reader.LoadSegmentableImaged` records, file by file
(:data:`~causalclipseg.io.reader.SOURCE_FILES_KEY`). Each frame of the Segmentation is the mask of one source
instance, on that instance's stored pixel grid (rows x columns, as the file holds them: the display orientation the
model saw is undone before), so a DICOM viewer lays it over the source images as it lays the images out.

The object (highdicom's ``Segmentation``): binary, one frame per source instance (empty frames kept, so that each
instance has its frame), one segment labelled with the prompt (Segment Label, LO: at most 64 characters, cut
with "..."; Segment Description, ST: the prompt up to 1024 characters), coded as a finding: property category
"Morphologically Abnormal Structure" (SCT 49755003, CID 7150), property type "Lesion" (SCT 52988006); segment
algorithm type AUTOMATIC, identified as ``causalclipseg`` with its version (family "Artificial Intelligence", DCM
123110, CID 7162) and its parameters; text in UTF-8 (Specific Character Set ``ISO_IR 192``), since prompts may be
in any script. highdicom 0.22 (the last for pydicom 2, which MONAI Label 0.8.5 pins) and 0.23+ (pydicom 3) build it
alike.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import pydicom
from monai.utils import ImageMetaKey
from pydicom.dataset import Dataset

from ..version import __version__
from .formats import Unreadable, read_input_header
from .reader import SOURCE_FILES_KEY

__all__ = ["SEGMENT_DESCRIPTION_MAX", "SEGMENT_LABEL_MAX", "check_dicom_seg_input", "dicom_segmentation",
           "fit_text"]

#: characters a Long String (LO: Segment Label, Series and Content Description) may hold (PS3.5 table 6.2-1)
SEGMENT_LABEL_MAX = 64
#: characters a Short Text (ST: Segment Description) may hold
SEGMENT_DESCRIPTION_MAX = 1024
_RULE = "a DICOM Segmentation is written for DICOM inputs only (a DICOM file or a folder holding one DICOM series)"
#: Type 2 attributes of the Patient and General Study modules that a Segmentation copies from its source: present in
#: every conformant image, possibly empty; a source without them (anonymised, hand-made) gets them empty, as Type 2
#: allows (the source files are not touched)
_COPIED_TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                  "ReferringPhysicianName", "StudyID", "AccessionNumber")


def fit_text(text: str, limit: int, multi_valued: bool = True) -> str:
    """``text`` as a DICOM string of at most ``limit`` characters: whitespace runs as one space, cut with ``...``
    when longer; for multi-valued VRs (LO) a backslash, their value separator, becomes ``/``."""
    text = " ".join(str(text).split())
    if multi_valued:
        text = text.replace("\\", "/")
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def check_dicom_seg_input(source: str | os.PathLike) -> None:
    """Refuse, before any work, an input a DICOM Segmentation cannot be written for.

    Raises:
        ValueError: naming ``source`` and the rule, when it is not DICOM (a picture, NIfTI, NRRD), cannot be read,
            or is a multi-frame DICOM file (its frames are not single source instances MONAI's reader stacks).
    """
    try:
        header = read_input_header(source)
    except Unreadable as err:
        raise ValueError(f"cannot read {source}: {err}") from err
    if header.kind != "DICOM":
        what = f"a {header.format} picture" if header.kind == "picture" else f"a {header.kind} image"
        raise ValueError(f"{source} is {what}, not DICOM: {_RULE}")
    frames = int(header.dataset.get("NumberOfFrames") or 1)
    if frames > 1:
        raise ValueError(f"{source} is a multi-frame DICOM image ({frames} frames): {_RULE}, of single-frame images")


def _source_frames(mask: np.ndarray, meta: Mapping[str, Any]) -> tuple[list[Dataset], np.ndarray]:
    """The source datasets (headers) and the mask as one boolean frame ``(rows, columns)`` per source instance."""
    source = meta.get(ImageMetaKey.FILENAME_OR_OBJ)
    files = meta.get(SOURCE_FILES_KEY)
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    if not files:
        raise ValueError(f"{source} was not read as DICOM (no source files recorded): {_RULE}")
    data = np.asarray(mask)
    data = data[..., None] if data.ndim == 2 else data
    if data.ndim != 3 or data.shape[2] != len(files):
        raise ValueError(f"cannot write a DICOM Segmentation for {source}: the mask {data.shape} does not hold one "
                         f"slice per source file ({len(files)} files)")
    frames = np.ascontiguousarray(data.transpose(2, 1, 0) > 0)  # (X, Y, Z) -> (Z, Y, X): (frames, rows, columns)
    datasets = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in files]
    for path, ds in zip(files, datasets):
        for keyword in _COPIED_TYPE_2:
            if keyword not in ds:
                setattr(ds, keyword, None)  # an empty value: unknown
        if (int(ds.Rows), int(ds.Columns)) != frames.shape[1:]:
            raise ValueError(f"cannot write a DICOM Segmentation for {source}: {path} has {ds.Rows} x {ds.Columns} "
                             f"pixels, the mask {frames.shape[1]} x {frames.shape[2]}")
    return datasets, frames


def dicom_segmentation(mask: np.ndarray, meta: Mapping[str, Any], prompt: str | None,
                       parameters: Mapping[str, object] | None = None) -> Dataset:
    """The DICOM Segmentation (see the module docstring) of ``mask`` over the DICOM input it was predicted for.

    Args:
        mask: ``(X, Y)`` or ``(X, Y, Z)`` in {0, 1}, on the input's grid (MONAI's axis order).
        meta: the input's metadata as :class:`~causalclipseg.io.reader.LoadSegmentableImaged` read it (its file name
            and :data:`~causalclipseg.io.reader.SOURCE_FILES_KEY`).
        prompt: what was segmented: the segment's label and description.
        parameters: recorded as the algorithm's parameters (e.g. model, threshold, prompt side).

    Returns:
        a highdicom ``Segmentation`` (a pydicom ``Dataset``), ready to save.

    Raises:
        ValueError: naming the input, when it was not read as DICOM, the mask does not lie on its grid, or there is no
            prompt to label the segment with.
    """
    import highdicom as hd  # imported here: it takes a second, which predictions without a Segmentation do not pay
    from pydicom.sr.codedict import codes

    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"cannot write a DICOM Segmentation for {meta.get(ImageMetaKey.FILENAME_OR_OBJ)}: its "
                         f"segment is labelled with the prompt, got {prompt!r}")
    datasets, frames = _source_frames(mask, meta)
    label = fit_text(prompt, SEGMENT_LABEL_MAX)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="causalclipseg", family=codes.cid7162.ArtificialIntelligence, version=__version__,
        parameters={str(k): str(v) for k, v in (parameters or {}).items()} or None)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label=label,
        segmented_property_category=codes.cid7150.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)
    segment.SegmentDescription = fit_text(prompt, SEGMENT_DESCRIPTION_MAX, multi_valued=False)
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment], series_instance_uid=hd.UID(), series_number=1, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="causalclipseg", manufacturer_model_name="CausalCLIPSeg",
        software_versions=__version__, device_serial_number="0", content_label="LESION",
        content_description=label, series_description=fit_text(f"causalclipseg: {prompt}", SEGMENT_LABEL_MAX),
        omit_empty_frames=False)
    seg.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: prompts (and the copied patient names) in any script
    return seg
