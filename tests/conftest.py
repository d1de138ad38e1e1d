"""Shared fixtures: tiny random models on the CPU, and the QaTa-COV19 location."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import causalclipseg

# The Slicer scene suite runs in an environment of its own (slicer-core, no torch): tests/slicer_scene/run.sh.
collect_ignore = ["slicer_scene"]

QATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "qata_cov19"
PROMPT = "bilateral pulmonary infection, two infected areas, lower left lung and lower right lung."

TINY_VIT = {
    "clip": {
        "model_cfg": {
            "embed_dim": 32,
            "vision_cfg": {"image_size": 64, "layers": 4, "width": 32, "head_width": 16, "patch_size": 16},
            "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        },
        "context_length": 32,
        "vit_feature_blocks": [0, 1],
    },
    "decoder": {"dim": 32, "num_layers": 1, "num_heads": 2, "ffn_dim": 64},
    "causal": {"hidden": 8},
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", default=False,
                     help="also run the slow real-component tests (servers, torchrun, subprocess sweeps, the bundle "
                          "run as a command, wheel builds); .ci/run does")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` run only with ``--slow`` (or when selected with ``-m slow``)."""
    if config.getoption("--slow") or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow real-component test: run with --slow (.ci/run does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny_checkpoint_and_picture(root: Path, picture: str, model: str = causalclipseg.DEFAULT_MODEL
                                ) -> tuple[dict[str, Path], np.random.Generator]:
    """The random weights of ``model`` (the shipped variant by default; torch seed 0) as ``files["ckpt"]`` and a
    random 72 rows x 88 columns PNG ``root/picture`` as ``files["png"]``; with the generator (seed 0) that drew it,
    for more inputs."""
    from causalclipseg.training.checkpoint import save_weights

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    files = {"ckpt": save_weights(causalclipseg.create_model(model).state_dict(), root / f"{model}.pt"),
             "png": root / picture}
    Image.fromarray((rng.random((72, 88)) * 255).astype(np.uint8)).save(files["png"])
    return files, rng


def register_config(tmp_path: Path, name: str, data: dict) -> str:
    """Write a model config JSON and register it; returns the name."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    causalclipseg.add_model_config(path)
    return name


def write_datalist(tmp_path: Path, n: int = 6) -> Path:
    """A MONAI datalist of ``n`` random 64x64 PNG images with box masks: ``n - 2`` training, 2 validation."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        img = rng.integers(0, 255, size=(64, 64), dtype=np.uint8)
        mask = np.zeros((64, 64), dtype=np.uint8)
        mask[10 + i:40, 5:30 + i] = 255
        Image.fromarray(img).save(tmp_path / f"img_{i}.png")
        Image.fromarray(mask).save(tmp_path / f"mask_{i}.png")
        rows.append({"image": f"img_{i}.png", "label": f"mask_{i}.png",
                     "prompt": "unilateral pulmonary infection, one infected area, lower left lung."})
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": rows[:-2], "validation": rows[-2:]}))
    return path


def save_dicom(ds, path: str | Path) -> Path:
    """Write ``ds`` as a proper DICOM file (preamble, file meta) with pydicom 3 or 2 (MONAI Label's pin)."""
    import pydicom
    option = ({"enforce_file_format": True} if int(pydicom.__version__.split(".")[0]) >= 3
              else {"write_like_original": False})
    ds.save_as(str(path), **option)
    return Path(path)


def write_dicom_image(path: str | Path, pixels: np.ndarray, modality: str, series_uid: str, **tags) -> Path:
    """A single-frame 16-bit MONOCHROME2 DICOM image (DX for ``modality`` ``DX``, else CT) of ``pixels`` (rows x
    columns, Bits Stored 12), in study ``1.2.3.4`` and series ``series_uid``; ``tags`` add or override attributes
    (``ImagePositionPatient``, ``InstanceNumber``, ``PatientName``, ...)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1" if modality == "DX" else "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = modality, series_uid, "1.2.3.4"
    ds.PatientName, ds.PatientID = "Test^Bundle", "0"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return save_dicom(ds, path)


def pydicom_test_files() -> list[Path]:
    """Every file of pydicom's test data; skips, saying why, where this pydicom cannot list it (pydicom 2.4 needs
    ``pkg_resources``, which new setuptools no longer ship)."""
    import pydicom
    try:
        from pydicom.data import get_testdata_files
        return sorted(Path(f) for f in get_testdata_files() if Path(f).is_file())
    except ImportError as err:
        pytest.skip(f"pydicom {pydicom.__version__} cannot list its test data here: {err}")


@pytest.fixture
def qata_root() -> Path:
    if not (QATA_ROOT / "prompts" / "annotation.json").is_file():
        pytest.skip(f"QaTa-COV19 not found at {QATA_ROOT} (see the project README)")
    return QATA_ROOT


def write_windowed_dx(png_path: str | Path, dcm_path: str | Path, mirrored: bool = False, monochrome1: bool = False,
                      slope: float = 1.0, intercept: float = 0.0,
                      label: tuple[int, int, int, int] = (0, 0, 20, 60)) -> Path:
    """A 12-bit DX radiograph made from an 8-bit grayscale picture the way a modality writes one; returns its path.

    Stored values ``s = 1000 + 8 v`` for the picture's values ``v`` (Bits Stored 12 in 16, unsigned), a label burned
    in at full scale (4095) over ``label`` (row, column, height, width, in the picture's frame), Rescale Slope and
    Intercept ``slope`` and ``intercept``, and a window, in their output units, covering exactly the picture's
    values: a viewer shows the picture with the label white, while min-max scaling the stored values shows it
    darker (the label sets the top). ``monochrome1``: stored inverted (``4095 - s``, the label 0), Photometric
    Interpretation MONOCHROME1 with Presentation LUT Shape INVERSE: displayed the same. ``mirrored``: the image,
    label included, stored left-right mirrored with Patient Orientation ``R\\F`` instead of ``L\\F`` (standard
    display: the patient's left on the image's right, feet down): oriented for display, the same picture.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    with Image.open(png_path) as image:
        picture = np.asarray(image.convert("L"), dtype=np.int64)
    stored = 1000 + 8 * picture
    if monochrome1:
        stored = 4095 - stored  # white = low
    output = slope * stored + intercept
    low, high = float(output.min()), float(output.max())  # the window: exactly these, the label left out
    row, column, height, width = label
    stored[row:row + height, column:column + width] = 0 if monochrome1 else 4095  # white
    if mirrored:
        stored = stored[:, ::-1]

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = "DX", generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = "Windowed^DX", "0"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PatientOrientation = ["R", "F"] if mirrored else ["L", "F"]
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.PresentationLUTShape = "INVERSE" if monochrome1 else "IDENTITY"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
    ds.WindowCenter, ds.WindowWidth = (low + high + 1) / 2, high - low + 1  # pydicom's LINEAR: low -> 0, high -> top
    ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()
    return save_dicom(ds, dcm_path)
