"""DICOM pixel values as a viewer displays them (``causalclipseg.io.dicom``), with pydicom 2 and 3.

pydicom's own test files (those this pydicom ships; the downloadable ones only where already present, never
downloaded), pydicom's files given LUTs they lack, and a 12-bit windowed DX with a burned-in label made from a real
QaTa-COV19 X-ray. Only numpy, pydicom and Pillow are needed, except for the MONAI reader's tests.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from causalclipseg.io.dicom import display_values, voi_display

from .conftest import save_dicom, write_windowed_dx

try:  # pydicom >= 3
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
except ImportError:  # pydicom 2
    from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut

PYDICOM_3 = int(pydicom.__version__.split(".")[0]) >= 3
LABEL = (0, 0, 20, 60)  # row, column, height, width of the burned-in label, in the picture's frame


# ------------------------------------------------------------------------------------------------------ helpers
def _testdata(name: str) -> Path:
    """pydicom's test file ``name``, never downloaded; skips, saying why, where this pydicom does not have it."""
    from pydicom.data import get_testdata_file

    try:
        path = get_testdata_file(name, download=False)
    except ImportError as err:  # pydicom 2.4 looks through external data sources with pkg_resources
        pytest.skip(f"pydicom {pydicom.__version__} does not ship {name}, and cannot look further here: {err}")
    if path is None:
        pytest.skip(f"pydicom {pydicom.__version__} does not ship {name} (it downloads it on demand; tests do not)")
    return Path(path)


def _read(name: str, **kwargs) -> Dataset:
    return pydicom.dcmread(_testdata(name), **kwargs)


def _pipeline(ds: Dataset, arr: np.ndarray, index: int = 0) -> np.ndarray:
    """pydicom's functions in a viewer's order; inverted (about the maximum) for MONOCHROME1 or INVERSE."""
    out = apply_voi_lut(apply_modality_lut(arr, ds), ds, index=index).astype(np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1" or ds.get("PresentationLUTShape") == "INVERSE":
        out = out.max() - out
    return out.astype(np.float32)


def _lut_item(descriptor: list[int], data: list[int]) -> Dataset:
    item = Dataset()
    item.add_new("LUTDescriptor", "US", descriptor)  # the VRs written, not left ambiguous (US or SS, US or OW)
    item.add_new("LUTData", "US", data)
    return item


def _grey(values: np.ndarray) -> np.ndarray:
    """Min-max to [0, 255], as the loader scales an image."""
    values = values.astype(np.float64)
    return (values - values.min()) / (values.max() - values.min()) * 255


def _outside_label(shape: tuple[int, ...]) -> np.ndarray:
    row, column, height, width = LABEL
    keep = np.ones(shape, dtype=bool)
    keep[row:row + height, column:column + width] = False
    return keep


@pytest.fixture
def xray(qata_root) -> Path:
    """A real QaTa-COV19 X-ray (8-bit grayscale PNG)."""
    pictures = sorted((qata_root / "images" / "valid" / "images").glob("*.png"))
    if not pictures:
        pytest.skip(f"no validation pictures under {qata_root}")
    return pictures[0]


# ------------------------------------------------------------------------------- pydicom's own test files
def test_rescale_without_voi_gives_modality_values():
    ds = _read("CT_small.dcm")  # Rescale Slope 1, Intercept -1024, no window
    out = display_values(ds)
    assert out.dtype == np.float32 and out.shape == ds.pixel_array.shape
    np.testing.assert_array_equal(out, ds.pixel_array.astype(np.float32) - 1024)


def test_window_maps_stored_values_onto_the_output_range():
    ds = _read("MR_small.dcm")  # window 600 / 1600, signed 16-bit, no rescale
    arr = ds.pixel_array
    out = display_values(ds)
    np.testing.assert_array_equal(out, _pipeline(ds, arr))
    assert out.max() == 2**15 - 1 and np.all(out[arr > 1400] == 2**15 - 1)  # above the window: the top
    order = np.argsort(arr, axis=None, kind="stable")
    assert np.all(np.diff(out.ravel()[order]) >= 0)  # monotonic: white = high


def test_first_of_several_windows_is_used():
    ds = _read("J2K_pixelrep_mismatch.dcm", stop_before_pixels=True)  # centres 40\40\40, widths 100\100\200
    ramp = np.arange(-100, 200, dtype=np.int16)  # frames the caller decoded itself
    out = display_values(ds, ramp)
    np.testing.assert_array_equal(out, _pipeline(ds, ramp, index=0))
    assert not np.array_equal(out, _pipeline(ds, ramp, index=2))
    y_min, y_max = -(2**12), 2**12 - 1  # 13 bits stored, signed, slope 1 / intercept 0
    assert out[ramp == -10][0] == y_min and out[ramp == 90][0] == y_max  # window 40 / 100 (LINEAR)


def test_first_of_several_windows_on_pixels():
    ds = _read("examples_overlay.dcm")  # pydicom 3: centres 450\200, widths 790\443
    out = display_values(ds)
    np.testing.assert_array_equal(out, _pipeline(ds, ds.pixel_array, index=0))
    assert not np.array_equal(out, _pipeline(ds, ds.pixel_array, index=1))


def test_monochrome1_is_inverted_once():
    ds = _read("6154")  # dicomdirtests CR: MONOCHROME1, slope 0.684, intercept 200, window 1600 / 2800
    arr = ds.pixel_array
    windowed = apply_voi_lut(apply_modality_lut(arr, ds), ds, index=0)
    out = display_values(ds)
    np.testing.assert_allclose(out, (windowed.max() - windowed).astype(np.float32))
    assert np.all(out[arr == arr.max()] == out.min()) and np.all(out[arr == arr.min()] == out.max())

    ds.PresentationLUTShape = "INVERSE"  # as DX requires with MONOCHROME1: the same inversion, not a second one
    np.testing.assert_array_equal(display_values(ds, arr), out)
    if PYDICOM_3:
        from pydicom.pixels import apply_presentation_lut
        np.testing.assert_allclose(out, apply_presentation_lut(windowed, ds).astype(np.float32))
    ds.PhotometricInterpretation = "MONOCHROME2"  # INVERSE alone inverts too
    np.testing.assert_array_equal(display_values(ds, arr), out)
    del ds.PresentationLUTShape
    np.testing.assert_allclose(display_values(ds, arr), windowed.astype(np.float32))


def test_voi_lut_sequence_file():
    ds = _read("vlut_04.dcm")  # pydicom-data: 8-bit stored, VOI LUT [256, 0, 16]
    out = display_values(ds)
    np.testing.assert_array_equal(out, _pipeline(ds, ds.pixel_array))
    assert [out[387, 448], out[178, 126], out[186, 389], out[129, 79]] == [0, 19532, 45746, 65535]  # pydicom's


def test_modality_lut_sequence_file():
    ds = _read("mlut_18.dcm")  # pydicom-data: 12-bit signed, Modality LUT [4096, -2048, 16]
    out = display_values(ds)
    np.testing.assert_array_equal(out, _pipeline(ds, ds.pixel_array))
    assert [out[185, 340], out[185, 385], out[228, 385], out[291, 385]] == [39321, 45867, 52428, 58974]


def test_colour_passes_through():
    ds = _read("SC_rgb_small_odd.dcm")
    out = display_values(ds)
    assert out.dtype == np.float32 and out.shape == ds.pixel_array.shape and out.ndim == 3
    np.testing.assert_array_equal(out, ds.pixel_array)


# --------------------------------------------------------------- pydicom's files given the LUTs they lack
def test_voi_lut_sequence_is_preferred_to_the_window_and_takes_rescaled_values():
    ds = _read("MR_small.dcm")  # keeps its window 600 / 1600
    ds.RescaleSlope, ds.RescaleIntercept = 0.5, 0.25  # non-integer outputs into the LUT
    lut = [min(16 * i, 65535) for i in range(4096)]
    ds.VOILUTSequence = [_lut_item([4096, 0, 16], lut)]
    arr = ds.pixel_array
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rounded before the LUT: no float-input warning from pydicom
        out = display_values(ds)
    expected = np.asarray(lut)[np.clip(np.rint(arr * 0.5 + 0.25), 0, 4095).astype(int)]
    np.testing.assert_array_equal(out, expected.astype(np.float32))


def test_voi_lut_sequence_with_8_bit_entries():
    ds = _read("MR_small.dcm")  # stored 127..2145: indices past 255 into an 8-bit LUT of 4096 entries
    ds.VOILUTSequence = [_lut_item([4096, 0, 8], [i // 16 for i in range(4096)]),
                         _lut_item([4096, 0, 8], [255 - i // 16 for i in range(4096)])]
    arr = ds.pixel_array
    out = display_values(ds)
    np.testing.assert_array_equal(out, (np.clip(arr, 0, 4095) // 16).astype(np.float32))  # the first LUT
    assert list(ds.VOILUTSequence[0].LUTDescriptor) == [4096, 0, 8]  # the dataset is left as it was

    beyond = np.array([-5, 0, 4095, 5000, 70000], dtype=np.int64)  # below and past the LUT's input range
    np.testing.assert_array_equal(display_values(ds, beyond), [0, 0, 255, 255, 255])


def test_modality_lut_sequence_then_window():
    ds = _read("MR_small.dcm")
    ds.ModalityLUTSequence = [_lut_item([4096, 0, 16], [min(16 * i, 65535) for i in range(4096)])]
    ds.WindowCenter, ds.WindowWidth = 15000, 20000  # in the LUT's output units: stored 313..1562
    arr = ds.pixel_array
    out = display_values(ds)
    np.testing.assert_array_equal(out, _pipeline(ds, arr))
    assert (out.min(), out.max()) == (0, 2**16 - 1)  # the window's output range: the LUT's 16 bits


def test_a_window_pydicom_refuses_is_skipped_with_a_warning():
    ds = _read("MR_small.dcm")
    ds.WindowWidth = 0  # LINEAR needs a width of at least 1
    with pytest.warns(UserWarning, match="VOI LUT ignored"):
        out = display_values(ds)
    np.testing.assert_array_equal(out, ds.pixel_array.astype(np.float32))


def test_frames_are_mapped_alike():
    ds = _read("MR_small.dcm")
    arr = ds.pixel_array
    frames = display_values(ds, np.stack([arr, arr[::-1]]))  # (frames, rows, columns)
    np.testing.assert_array_equal(frames[0], display_values(ds, arr))
    np.testing.assert_array_equal(frames[1], display_values(ds, arr[::-1]))


# --------------------------------------------------------- a 12-bit windowed DX with a burned-in label
@pytest.mark.parametrize("monochrome1", [False, True], ids=["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("slope, intercept", [(1.0, 0.0), (2.0, -1000.0)], ids=["identity", "rescaled"])
def test_windowed_dx_shows_the_picture(xray, tmp_path, slope, intercept, monochrome1):
    path = write_windowed_dx(xray, tmp_path / "dx.dcm", monochrome1=monochrome1, slope=slope, intercept=intercept,
                             label=LABEL)
    ds = pydicom.dcmread(path)
    assert (ds.Modality, list(ds.PatientOrientation), ds.BitsStored) == ("DX", ["L", "F"], 12)
    with Image.open(xray) as image:
        picture = np.asarray(image.convert("L"))
    keep = _outside_label(picture.shape)

    out = display_values(ds)
    assert np.abs(_grey(out) - _grey(picture))[keep].max() <= 1  # the picture, within one grey level
    row, column, height, width = LABEL
    assert np.all(out[row:row + height, column:column + width] == out.max())  # the label: white
    stored = ds.pixel_array.astype(np.float64)
    naive = _grey(stored if not monochrome1 else stored.max() - stored)  # min-max of stored values, as before
    assert naive[keep].mean() < _grey(picture)[keep].mean() - 20  # darker: the label set the top


def test_monochrome1_dx_displays_like_monochrome2(xray, tmp_path):
    two = display_values(pydicom.dcmread(write_windowed_dx(xray, tmp_path / "two.dcm")))
    one = pydicom.dcmread(write_windowed_dx(xray, tmp_path / "one.dcm", monochrome1=True))
    assert (one.PhotometricInterpretation, one.PresentationLUTShape) == ("MONOCHROME1", "INVERSE")
    np.testing.assert_allclose(_grey(display_values(one)), _grey(two), atol=1e-3)


def test_mirrored_dx_stores_the_mirror_image(xray, tmp_path):
    plain = pydicom.dcmread(write_windowed_dx(xray, tmp_path / "plain.dcm"))
    mirrored = pydicom.dcmread(write_windowed_dx(xray, tmp_path / "mirrored.dcm", mirrored=True))
    assert list(mirrored.PatientOrientation) == ["R", "F"]
    np.testing.assert_array_equal(mirrored.pixel_array, plain.pixel_array[:, ::-1])
    np.testing.assert_array_equal(display_values(mirrored), display_values(plain)[:, ::-1])


# ------------------------------------------------------------------------------ volumes read by MONAI
def _monai_array(path: Path) -> np.ndarray:
    """What MONAI's ``PydicomReader`` gives for a file: ``(X, Y)`` (columns first)."""
    monai_data = pytest.importorskip("monai.data")
    reader = monai_data.PydicomReader()
    arr, _ = reader.get_data(reader.read(str(path)))
    return np.asarray(arr)


@pytest.mark.filterwarnings("ignore:PydicomReader. ImageOrientationPatient:UserWarning")  # a DX has none
@pytest.mark.parametrize("monochrome1", [False, True], ids=["MONOCHROME2", "MONOCHROME1"])
def test_voi_display_completes_monai_rescaled_values(xray, tmp_path, monochrome1):
    path = write_windowed_dx(xray, tmp_path / "dx.dcm", monochrome1=monochrome1, slope=2.0, intercept=-1000.0)
    ds = pydicom.dcmread(path)
    volume = _monai_array(path)
    np.testing.assert_array_equal(volume, (ds.pixel_array * 2.0 - 1000.0).T)  # MONAI applies the rescale
    np.testing.assert_allclose(voi_display(volume, ds), display_values(ds).T, rtol=1e-6)


def test_voi_display_applies_a_modality_lut_sequence_monai_ignores(tmp_path):
    ds = _read("MR_small.dcm")
    ds.ModalityLUTSequence = [_lut_item([4096, 0, 16], [min(16 * i, 65535) for i in range(4096)])]
    path = save_dicom(ds, tmp_path / "mlut.dcm")
    ds = pydicom.dcmread(path)
    volume = _monai_array(path)
    np.testing.assert_array_equal(volume, ds.pixel_array.T)  # stored values: the LUT is not applied
    np.testing.assert_array_equal(voi_display(volume.astype(np.float32), ds), display_values(ds).T)
