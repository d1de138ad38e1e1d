"""DICOM pixel values as a viewer displays them: the grayscale pipeline of PS3.4 N.2, with pydicom's functions.

A viewer does not show stored values. It maps them through the Modality LUT (Rescale Slope/Intercept, or a
Modality LUT Sequence) into output units, through the VOI LUT (a window, or a VOI LUT Sequence; the first when
several are given) into the values it displays, and inverts those for ``MONOCHROME1`` (white = low) or a
Presentation LUT Shape of ``INVERSE``. Min-max scaling the stored values instead shows a 12-bit radiograph with a
window and a burned-in label at full scale darker than any viewer does: the label, not the anatomy, sets the top
of the range. :func:`display_values` runs the whole pipeline on a file's pixels; :func:`voi_display` runs the part
that MONAI's ``PydicomReader`` leaves out on a volume it read.

The steps are pydicom's (``pydicom.pixels`` in pydicom 3, ``pydicom.pixel_data_handlers.util`` in pydicom 2,
which MONAI Label 0.8.5 pins), with three corrections for what both pydicom 2.4 and 3.0 get wrong with a VOI LUT
Sequence (they index the LUT with an array of its entry type): a LUT of 8-bit entries with more than 256 entries
is read as 16-bit entries (same values; 8-bit indices wrap around), inputs are clipped to the LUT's input range
first (inputs past ``first mapped + 65535`` wrap around), and non-integer inputs (Rescale Slope/Intercept give
floats) are rounded to the nearest integer (pydicom truncates them, with a warning). Neither version's windowing
looks at ``MONOCHROME1``, so the inversion comes after the VOI LUT in both.

Not handled: the per-frame Pixel Value Transformation and Frame VOI LUT of enhanced multi-frame objects
(functional groups), which pydicom's functions do not read either; a Presentation LUT Sequence (it belongs to
presentation states and print, not to image objects).
"""

from __future__ import annotations

import warnings

import numpy as np
from pydicom.dataset import Dataset

try:  # pydicom >= 3
    from pydicom.pixels import apply_modality_lut, apply_presentation_lut, apply_voi_lut
except ImportError:  # pydicom 2: no Presentation LUT function
    from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut

    apply_presentation_lut = None

__all__ = ["GRAYSCALE", "display_values", "voi_display"]

#: Photometric Interpretations the Modality LUT, VOI LUT and Presentation LUT apply to (PS3.3 C.11.1, C.11.2)
GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")


def display_values(ds: Dataset, arr: np.ndarray | None = None) -> np.ndarray:
    """The pixel values of ``ds`` as a viewer displays them, white = high.

    Grayscale images go through the Modality LUT (``apply_modality_lut``), the VOI LUT (``apply_voi_lut`` with
    ``index=0``: the first window or VOI LUT when several are given; a VOI LUT Sequence is preferred to a window),
    and an inversion (maximum minus value) when the Photometric Interpretation is ``MONOCHROME1`` or the
    Presentation LUT Shape is ``INVERSE``; once when both (DX pairs ``MONOCHROME1`` with ``INVERSE``, PS3.3
    C.8.11.1.1). Colour and palette images (any other Photometric Interpretation, e.g. ``RGB``, ``YBR_FULL``,
    ``PALETTE COLOR``) come back unchanged: these modules are defined for grayscale only. A window or VOI LUT that
    pydicom refuses (a width below 1, an unknown VOI LUT Function, an unsupported entry size) is skipped with a
    warning, as a viewer falls back to its default window.

    Args:
        ds: the dataset (its header: Photometric Interpretation, Bits Stored, Pixel Representation and the
            Modality LUT, VOI LUT and Presentation LUT modules).
        arr: its stored pixel values, ``(rows, columns)``, ``(frames, rows, columns)`` or with a trailing
            samples axis, e.g. frames already decoded; ``ds.pixel_array`` when omitted.

    Returns:
        float32 array of ``arr``'s shape, white = high: the VOI output (a window maps onto the range that Bits
        Stored and the rescale, or the Modality LUT's entry size, give), else the Modality LUT output; inverted
        values start at 0.
    """
    arr = ds.pixel_array if arr is None else np.asarray(arr)
    if _photometric(ds) not in GRAYSCALE:
        return arr.astype(np.float32)
    return _voi_and_inversion(apply_modality_lut(arr, ds), ds)


def voi_display(volume: np.ndarray, ds: Dataset) -> np.ndarray:
    """A grayscale DICOM volume (or slice) read by MONAI's ``PydicomReader`` as a viewer displays it, white = high.

    ``PydicomReader`` (monai/data/image_reader.py, ``_get_array_data``) already applied the Modality LUT's
    rescale: each slice times Rescale Slope plus Rescale Intercept, in float32, when either is present (a missing
    one taken as 1 or 0). It ignores a Modality LUT Sequence, the VOI LUT and the Photometric Interpretation. So
    this applies a Modality LUT Sequence when ``ds`` has one and no rescale (to the values rounded to integers),
    then the VOI LUT and the inversion of :func:`display_values`, with the first slice's window or VOI LUT for the
    whole volume, as a viewer shows a series with one window. Colour volumes come back unchanged.

    Args:
        volume: the reader's array, any layout (``(X, Y[, Z])``, channel first or not): values are mapped one by
            one, and the inversion is about the maximum of the whole array.
        ds: the dataset of the first slice (``stop_before_pixels`` suffices).

    Returns:
        float32 array of ``volume``'s shape.
    """
    volume = np.asarray(volume)
    if _photometric(ds) not in GRAYSCALE:
        return volume.astype(np.float32)
    if ds.get("ModalityLUTSequence") and "RescaleSlope" not in ds and "RescaleIntercept" not in ds:
        volume = apply_modality_lut(np.rint(volume).astype(np.int64), ds)
    return _voi_and_inversion(volume, ds)


def _photometric(ds: Dataset) -> str:
    return str(ds.get("PhotometricInterpretation", "")).strip().upper()


def _voi_and_inversion(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """VOI LUT or window (the first), then the inversion to white = high: float32."""
    item = _voi_lut_item(ds)
    descriptor = None
    if item is not None:  # pydicom will apply this LUT: give it in-range integer inputs and wide enough indices
        entries, first, bits = (int(v) for v in item.LUTDescriptor)
        entries = entries or 2**16
        values = (np.rint(arr) if arr.dtype.kind == "f" else arr).astype(np.int64)
        arr = np.clip(values, first, first + entries - 1)
        if bits == 8 and entries > 256:
            descriptor = list(item.LUTDescriptor)
            item.LUTDescriptor = [entries, first, 16]
    try:
        arr = apply_voi_lut(arr, ds, index=0)
    except (ValueError, NotImplementedError) as err:
        warnings.warn(f"DICOM window / VOI LUT ignored ({err}): values left in output units", stacklevel=3)
    finally:
        if descriptor is not None:
            item.LUTDescriptor = descriptor  # the caller's dataset is left as it was
    return _white_high(np.asarray(arr, dtype=np.float64), ds).astype(np.float32)


def _voi_lut_item(ds: Dataset) -> Dataset | None:
    """The VOI LUT Sequence item ``apply_voi_lut(index=0)`` uses (its test: the first item has both LUT
    Descriptor and LUT Data; then it wins over a window), or ``None`` when it windows or leaves values alone."""
    sequence = ds.get("VOILUTSequence")
    if not sequence:
        return None
    item = sequence[0]
    return item if item.get("LUTDescriptor") is not None and item.get("LUTData") is not None else None


def _white_high(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Invert once for ``MONOCHROME1`` and/or Presentation LUT Shape ``INVERSE``, about the array's maximum.

    pydicom 3's ``apply_presentation_lut`` inverts for ``INVERSE`` (``arr.max() - arr``) but does not look at the
    Photometric Interpretation, and pydicom 2 has no such function: the same one line covers those cases, so that
    both pydicom versions give the same values.
    """
    shape = str(ds.get("PresentationLUTShape", "")).strip().upper()
    if shape == "INVERSE" and apply_presentation_lut is not None and "PresentationLUTSequence" not in ds:
        return apply_presentation_lut(arr, ds)
    if shape == "INVERSE" or _photometric(ds) == "MONOCHROME1":
        return arr.max() - arr
    return arr
