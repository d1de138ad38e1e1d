"""Hostile input files through ``causalclipseg predict`` and the bundle's inference.

Every input must end in one of two ways: a mask on the input's grid (exit status 0), or exit status 2 with ONE
line on stderr naming the file and the reason. Never a traceback, never a hang (each case runs under a deadline),
never a half-written output (outputs are written atomically), never a touched input (inputs are hashed before and
after). Inputs: every file pydicom and nibabel ship as test data (each sweep is one CLI call over all the files, one
model load, with a per-file deadline), and files written here: empty, truncated, misnamed, NaN/Inf, constant,
1 x 1, 20000 x 20000, 4-D, RGB, palette, 16-bit, colour/MONOCHROME1/sagittal DICOM, DICOM that cannot be decoded.
A random tiny checkpoint stands in for the shipped model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from causalclipseg import DEFAULT_MODEL, cli, create_model
from causalclipseg.inference.predictor import Predictor
from causalclipseg.io.formats import MAX_INPUT_VOXELS
from causalclipseg.io.reader import LoadSegmentableImaged
from causalclipseg.training.checkpoint import save_weights

from .conftest import pydicom_test_files, save_dicom

PROMPT = "bilateral pulmonary infection, two infected areas, lower left lung and lower right lung."
ROOT = Path(__file__).resolve().parents[1]
PER_FILE_SECONDS = 30  # generous: the suite shares two CPU cores; a hang is what this catches


# ------------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_weights(create_model(DEFAULT_MODEL).state_dict(), tmp_path_factory.mktemp("ckpt") / "tiny.pt")


class Deadline(Exception):
    """Raised in the main thread when a case runs past its deadline."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[dict]:
    """Run the block under SIGALRM; ``state["fired"]`` tells whether it ran out (the loader would turn the
    exception into a ValueError, so the flag, not the exception, is what the tests check)."""
    state = {"fired": False}

    def _expire(signum, frame):
        state["fired"] = True
        raise Deadline(f"ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, _expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield state
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _digest(paths: list[Path]) -> dict[Path, str]:
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")) if p.is_dir() else [])]
    return {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def _leftovers(out: Path) -> list[str]:
    """Temporary files of atomic writes left in ``out`` (they start with a dot)."""
    return [p.name for p in out.iterdir() if p.name.startswith(".")] if out.exists() else []


def _predict(inputs: list[Path], out: Path, checkpoint: Path, capsys, *extra: str,
             seconds: float = PER_FILE_SECONDS) -> tuple[int, list[str], list[str]]:
    """``causalclipseg predict`` in-process under a deadline; (exit status, stdout lines, stderr lines)."""
    before = _digest(inputs)
    with deadline(seconds) as state:
        code = cli.main(["predict", *map(str, inputs), "--prompt", PROMPT, "--checkpoint", str(checkpoint),
                         "--output-dir", str(out), "--device", "cpu", *extra])
    captured = capsys.readouterr()
    assert not state["fired"], f"{inputs} took more than {seconds} s"
    assert _digest(inputs) == before, "an input file was modified"
    assert not _leftovers(out), f"temporary files left behind: {_leftovers(out)}"
    return code, captured.out.splitlines(), captured.err.splitlines()


def _assert_one_line_error(code: int, err: list[str], path: Path, reason: str = "") -> None:
    assert code == 2, err
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and path.name in err[0], err
    assert reason.lower() in err[0].lower(), (reason, err)
    assert "Traceback" not in err[0]


def _spatial_grid(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine of what the loader makes of ``path`` (the grid a mask must be on)."""
    image = LoadSegmentableImaged("image")({"image": str(path)})["image"]
    return tuple(image.shape[1:]), image.affine.numpy()


def _assert_mask_on_grid(path: Path, out: Path, stdout: list[str]) -> None:
    line = next((x for x in stdout if x.startswith(f"{path} -> ")), None)
    assert line is not None, stdout
    mask_path = Path(line.split(" -> ")[1].split(", ")[0])
    if mask_path.suffix == ".png":
        mask = np.array(Image.open(mask_path))
        with Image.open(path) as source:
            assert mask.shape == (source.height, source.width)
        assert set(np.unique(mask)) <= {0, 255}
        return
    mask = nib.load(mask_path)
    data = np.asarray(mask.dataobj)
    assert set(np.unique(data)) <= {0, 1}
    if path.name.lower().endswith((".nii", ".nii.gz")):
        source = nib.load(path)
        assert mask.shape == source.shape
        np.testing.assert_allclose(mask.affine, source.affine, atol=1e-4)
    else:
        shape, affine = _spatial_grid(path)
        assert mask.shape == shape
        np.testing.assert_allclose(mask.affine, affine, atol=1e-4)
        assert abs(np.linalg.det(mask.affine[:3, :3])) > 0, "the mask's geometry is degenerate"


# ------------------------------------------------------------------------------------------------ input writers
def _picture(path: Path, array: np.ndarray) -> Path:
    """Save ``array`` (rows, columns[, channels]) as a picture; PIL picks the mode from the dtype and channels."""
    Image.fromarray(array).save(path)
    return path


def _noise(shape, dtype=np.uint8, high=255, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, size=shape).astype(dtype)


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def _dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", orientation=(1, 0, 0, 0, 1, 0),
           syntax: str | None = None, rows_cols: tuple[int, int] | None = None,
           pixel_data: bytes | None = None) -> Path:
    """A DX/CT-like DICOM file: 16-bit gray, or 8-bit RGB when ``pixels`` is (rows, cols, 3)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = UID(syntax) if syntax else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "CT", generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = "Hostile^Input", "0"
    ds.Rows, ds.Columns = rows_cols or pixels.shape[:2]
    ds.ImageOrientationPatient = list(orientation)
    ds.ImagePositionPatient = [10.0, -20.0, 30.0]
    ds.PixelSpacing = [0.8, 0.6]
    ds.PhotometricInterpretation = photometric
    if pixels.ndim == 3:
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        data = pixels.astype(np.uint8).tobytes()
    else:
        ds.SamplesPerPixel = 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        data = pixels.astype(np.uint16).tobytes()
    ds.PixelData = pixel_data if pixel_data is not None else data
    if syntax:  # compressed: encapsulated pixel data (garbage frames: the decoder must never be reached)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    return save_dicom(ds, path)


def _huge_png(path: Path, side: int = 20000) -> Path:
    """A real, valid ``side`` x ``side`` 8-bit gray PNG (all black: 2 MB on disk, 400 MB decoded)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    compressor = zlib.compressobj(1)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def _huge_nifti_header(path: Path) -> Path:
    """A NIfTI whose header claims 20000 x 20000 x 4 voxels; the data is a few bytes."""
    header = nib.Nifti1Header()
    header.set_data_shape((20000, 20000, 4))
    header.set_data_dtype(np.uint8)
    with open(path, "wb") as f:
        header.write_to(f)
        f.write(b"\x00" * 4 + b"\x01" * 64)
    return path


def _truncated(path: Path, write: Callable[[Path], Path], keep: float = 0.6) -> Path:
    full = write(path.with_name("full_" + path.name))
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _renamed(path: Path, write: Callable[[Path], Path]) -> Path:
    write(path.with_name("src_" + path.stem + "_" + path.suffix.strip("."))).rename(path)
    return path


def _multipage_tiff(path: Path) -> Path:
    pages = [Image.fromarray(_noise((32, 40), seed=i)) for i in range(3)]
    pages[0].save(path, save_all=True, append_images=pages[1:])
    return path


def _float_tiff_with_inf(path: Path) -> Path:
    data = np.random.default_rng(0).random((32, 40)).astype(np.float32)
    data[3, 4] = np.inf
    return _picture(path, data)  # mode F


def _nifti_with_nan(path: Path) -> Path:
    data = np.random.default_rng(0).random((24, 20, 3)).astype(np.float32)
    data[5, 5, 1] = np.nan
    return _nifti(path, data)


def _jpeg_ls_dicom(path: Path) -> Path:
    from pydicom.encaps import encapsulate

    return _dicom(path, _noise((32, 32), np.uint16, 4000), syntax="1.2.840.10008.1.2.4.80",
                  pixel_data=encapsulate([b"\xff\xd8\xff\xf7garbage-not-a-jpeg-ls-stream\xff\xd9"]))


def _no_pixels_dicom(path: Path) -> Path:
    ds_path = _dicom(path, _noise((8, 8), np.uint16, 100))
    import pydicom

    ds = pydicom.dcmread(ds_path)
    for keyword in ("PixelData", "Rows", "Columns"):
        delattr(ds, keyword)
    save_dicom(ds, ds_path)
    return ds_path


_SAGITTAL = (0, 1, 0, 0, 0, -1)  # rows run anterior-posterior, columns head-foot

# (id, file name, writer, outcome): "mask" or a phrase the one error line must hold
CASES: list[tuple[str, str, Callable[[Path], Path], str]] = [
    ("empty-png", "empty.png", lambda p: (p.write_bytes(b""), p)[1], "empty (0 bytes)"),
    ("empty-dcm", "empty.dcm", lambda p: (p.write_bytes(b""), p)[1], "empty (0 bytes)"),
    ("empty-nii.gz", "empty.nii.gz", lambda p: (p.write_bytes(b""), p)[1], "empty (0 bytes)"),
    ("text-named-png", "notes.png", lambda p: (p.write_text("not an image\n"), p)[1], "not an image file"),
    ("truncated-png", "cut.png", lambda p: _truncated(p, lambda q: _picture(q, _noise((64, 80))), 0.5), "cannot read"),
    ("truncated-dcm", "cut.dcm", lambda p: _truncated(p, lambda q: _dicom(q, _noise((64, 80), np.uint16, 4000))),
     "cannot read"),
    ("truncated-nii.gz", "cut.nii.gz",
     lambda p: _truncated(p, lambda q: _nifti(q, _noise((40, 30, 6), np.float32, 100)), 0.5), "cannot read"),
    ("truncated-nii", "cut.nii", lambda p: _truncated(p, lambda q: _nifti(q, _noise((40, 30, 6), np.float32, 100))),
     "cannot read"),
    ("png-named-dcm", "picture.dcm", lambda p: _renamed(p, lambda q: _picture(q.with_suffix(".png"), _noise((30, 40)))),
     "rename it to end in .png"),
    ("nifti-named-png", "scan.png",
     lambda p: _renamed(p, lambda q: _nifti(q.with_suffix(".nii.gz"), _noise((20, 20, 3), np.float32))),
     "rename it to end in .nii.gz"),
    ("dicom-named-png", "xray.png", lambda p: _renamed(p, lambda q: _dicom(q.with_suffix(".dcm"), _noise((20, 24),
                                                                                                        np.uint16))),
     "rename it to end in .dcm"),
    ("nan-nifti", "nan.nii.gz", _nifti_with_nan, "NaN or infinite"),
    ("inf-float-tiff", "inf.tif", _float_tiff_with_inf, "NaN or infinite"),
    ("constant-png", "blank.png", lambda p: _picture(p, np.full((40, 50), 77, np.uint8)), "every pixel has the value"),
    ("constant-nifti-volume", "blank.nii.gz", lambda p: _nifti(p, np.zeros((16, 16, 4), np.float32)),
     "every pixel has the value"),
    ("1x1-png", "dot.png", lambda p: _picture(p, np.array([[200]], np.uint8)), "every pixel has the value"),
    ("1x2-png", "pair.png", lambda p: _picture(p, np.array([[0, 255]], np.uint8)), "mask"),
    ("1-row-volume", "thin.nii.gz", lambda p: _nifti(p, _noise((1, 30, 3), np.float32, 100)), "mask"),
    ("4d-nifti", "fmri.nii.gz", lambda p: _nifti(p, _noise((12, 10, 4, 3), np.float32, 100)), "4-D"),
    ("rgb-png", "colour.png", lambda p: _picture(p, _noise((48, 64, 3))), "mask"),
    ("rgba-png", "alpha.png", lambda p: _picture(p, _noise((48, 64, 4))), "mask"),
    ("gray-alpha-png", "la.png", lambda p: _picture(p, _noise((48, 64, 2))), "mask"),
    ("palette-png", "palette.png", lambda p: (Image.fromarray(_noise((48, 64, 3))).quantize(16).save(p), p)[1],
     "mask"),
    ("16bit-png", "deep.png", lambda p: _picture(p, _noise((48, 64), np.uint16, 65535)), "mask"),
    ("16bit-tiff", "deep.tiff", lambda p: _picture(p, _noise((48, 64), np.uint16, 65535)), "mask"),
    ("bilevel-png", "bits.png", lambda p: (Image.fromarray(_noise((40, 40), high=2) > 0).save(p), p)[1], "mask"),
    ("multipage-tiff", "pages.tif", _multipage_tiff, "3 pages"),
    ("dicom-16bit", "ct.dcm", lambda p: _dicom(p, _noise((40, 56), np.uint16, 4000)), "mask"),
    ("dicom-monochrome1", "cr.dcm", lambda p: _dicom(p, _noise((40, 56), np.uint16, 4000), "MONOCHROME1"), "mask"),
    ("dicom-rgb", "rgb.dcm", lambda p: _dicom(p, _noise((40, 56, 3)), "RGB"), "mask"),
    ("dicom-sagittal", "sagittal.dcm", lambda p: _dicom(p, _noise((40, 56), np.uint16, 4000), orientation=_SAGITTAL),
     "mask"),
    ("dicom-no-extension", "IM000001", lambda p: _dicom(p, _noise((40, 56), np.uint16, 4000)), "mask"),
    ("dicom-jpeg-ls", "jls.dcm", _jpeg_ls_dicom, "JPEG-LS"),
    ("dicom-without-image", "plan.dcm", _no_pixels_dicom, "holds no image"),
    ("dicom-header-20000x20000", "big.dcm",
     lambda p: _dicom(p, _noise((2, 2), np.uint16), rows_cols=(20000, 20000), pixel_data=b"\x00" * 8),
     f"more than the {MAX_INPUT_VOXELS}"),
    ("nifti-header-20000x20000", "big.nii", _huge_nifti_header, f"more than the {MAX_INPUT_VOXELS}"),
    ("png-20000x20000", "huge.png", _huge_png, "400000000 pixels"),
]


def _decoder_available(syntax: str) -> bool:
    """Whether pydicom can decode ``syntax`` here; pydicom 2 (MONAI Label's pin) has no decoder registry, so the
    header check cannot tell and decoding reports the missing handlers ("cannot read")."""
    try:
        from pydicom.pixels import get_decoder
    except ImportError:
        return True
    return get_decoder(syntax).is_available


# ------------------------------------------------------------------------------------------------- the cases
@pytest.mark.parametrize("name, writer, outcome", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_file_gives_a_mask_or_one_line(tmp_path, checkpoint, capsys, name, writer, outcome):
    path = writer(tmp_path / name)
    if outcome == "JPEG-LS" and _decoder_available("1.2.840.10008.1.2.4.80"):
        outcome = "cannot read"  # a decoder is installed here: the garbage stream fails to decode instead
    out = tmp_path / "out"
    started = time.perf_counter()
    code, stdout, stderr = _predict([path], out, checkpoint, capsys)
    if outcome == "mask":
        assert code == 0 and not stderr, stderr
        _assert_mask_on_grid(path, out, stdout)
    else:
        _assert_one_line_error(code, stderr, path, outcome)
        assert not (out.exists() and list(out.iterdir())), "an output was written for a refused input"
    if "20000" in name or "huge" in name:
        assert time.perf_counter() - started < 10, "a huge input must be refused from its header, before decoding"


def test_monochrome1_is_inverted_and_colour_dicom_is_one_gray_image(tmp_path):
    pixels = _noise((24, 32), np.uint16, 4000)
    loader = LoadSegmentableImaged("image")
    mono2 = loader({"image": str(_dicom(tmp_path / "m2.dcm", pixels))})["image"]
    mono1 = loader({"image": str(_dicom(tmp_path / "m1.dcm", pixels, "MONOCHROME1"))})["image"]
    torch.testing.assert_close(mono1.as_subclass(torch.Tensor),  # inverted about the maximum, as pydicom inverts
                               (mono2.max() - mono2).as_subclass(torch.Tensor))
    rgb = _noise((24, 32, 3))
    colour = loader({"image": str(_dicom(tmp_path / "rgb.dcm", rgb, "RGB"))})["image"]
    assert colour.shape == (1, 32, 24)  # one gray image (x = columns), not 3 slices
    torch.testing.assert_close(colour[0].as_subclass(torch.Tensor),
                               torch.as_tensor(rgb.astype(np.float32).mean(-1).T))


def test_sagittal_dicom_mask_keeps_its_orientation(tmp_path, checkpoint, capsys):
    """MONAI gives a single non-axial slice a singular affine (and its writer then fails): the loader completes
    the slice normal, and the mask's first two axes are the slice's own row and column directions."""
    path = _dicom(tmp_path / "sag.dcm", _noise((40, 56), np.uint16, 4000), orientation=_SAGITTAL)
    code, stdout, _ = _predict([path], tmp_path / "out", checkpoint, capsys)
    assert code == 0
    affine = nib.load(tmp_path / "out" / "sag_mask.nii.gz").affine
    lps_to_ras = np.array([-1, -1, 1])
    np.testing.assert_allclose(affine[:3, 0], lps_to_ras * np.array(_SAGITTAL[:3]) * 0.6, atol=1e-5)  # columns
    np.testing.assert_allclose(affine[:3, 1], lps_to_ras * np.array(_SAGITTAL[3:]) * 0.8, atol=1e-5)  # rows
    assert abs(np.linalg.det(affine[:3, :3])) > 0.1


def test_a_folder_with_good_and_bad_files_segments_the_good_ones(tmp_path, checkpoint, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = [_picture(folder / "a.png", _noise((30, 40))), _dicom(folder / "b.dcm", _noise((20, 24), np.uint16, 900))]
    bad = [(folder / "c.png", "empty"), (folder / "d.nii.gz", "NaN")]
    bad[0][0].write_bytes(b"")
    _nifti_with_nan(bad[1][0])
    code, stdout, stderr = _predict([folder], tmp_path / "out", checkpoint, capsys)
    assert code == 2
    for path in good:
        _assert_mask_on_grid(path, tmp_path / "out", stdout)
    assert len(stderr) == len(bad), stderr
    for (path, reason), line in zip(bad, stderr):
        assert line.startswith("error: ") and path.name in line and reason in line, line


def test_a_failing_write_leaves_no_file(tmp_path, checkpoint, monkeypatch):
    """A writer that dies half-way (disk full) leaves neither a partial mask nor a temporary file."""
    image = _picture(tmp_path / "x.png", _noise((30, 40)))
    predictor = Predictor(DEFAULT_MODEL, checkpoint, device="cpu")
    prediction = predictor.predict(image, PROMPT)

    def broken_save(self, fp, format=None, **params):
        Path(fp).write_bytes(b"\x89PNG partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"cannot write the mask of .*x\.png.*No space left on device"):
        predictor.write(prediction, out)
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------------------------------ library test data
def _sweep(files: list[Path], tmp_path: Path, checkpoint: Path, capsys, monkeypatch) -> dict[str, list]:
    """One CLI call over ``files`` (one model load); each file's prediction runs under its own deadline.

    Returns the files that got a mask and those refused, after checking that each file ended in exactly one of
    the two, with one error line naming it, within its deadline.
    """
    slow: list[str] = []
    original = Predictor.predict

    def predict_with_deadline(self, path, prompt, **options):
        started = time.perf_counter()
        with deadline(PER_FILE_SECONDS) as state:
            try:
                return original(self, path, prompt, **options)
            finally:
                if state["fired"] or time.perf_counter() - started > PER_FILE_SECONDS:
                    slow.append(str(path))

    monkeypatch.setattr(Predictor, "predict", predict_with_deadline)
    out = tmp_path / "out"
    code, stdout, stderr = _predict(files, out, checkpoint, capsys, seconds=PER_FILE_SECONDS * len(files))
    assert not slow, f"past the {PER_FILE_SECONDS} s deadline: {slow}"
    assert code == (2 if stderr else 0)
    assert not [line for line in stderr if not line.startswith("error: ")], stderr
    masked = [f for f in files if any(line.startswith(f"{f} -> ") for line in stdout)]
    refused = {f: [line for line in stderr if f"{f}:" in line or f"{f} " in line] for f in files}
    problems = []
    for f in files:
        outcomes = (f in masked) + len(refused[f])
        if outcomes != 1:
            problems.append(f"{f.name}: {outcomes} outcomes (mask: {f in masked}, errors: {refused[f]})")
    assert not problems, "\n".join(problems)
    for f in masked:
        _assert_mask_on_grid(f, out, stdout)
    return {"masked": masked, "refused": [refused[f][0] for f in files if refused[f]]}


def test_every_pydicom_test_file(tmp_path, checkpoint, capsys, monkeypatch):
    sources = pydicom_test_files()
    assert len(sources) > 100
    folder = tmp_path / "pydicom"
    folder.mkdir()
    files = []  # copies, numbered: several test files share a name, and their masks must not collide
    for i, source in enumerate(sources):
        files.append(folder / f"{i:03d}_{source.name}")
        shutil.copyfile(source, files[-1])
    result = _sweep(files, tmp_path, checkpoint, capsys, monkeypatch)
    assert len(result["masked"]) >= 60  # gray, colour, multi-frame, compressed (RLE, JPEG, JPEG 2000), no suffix
    reasons = "\n".join(result["refused"])
    for expected in ("holds no image", "no installed decoder", "not an image file", "multi-frame colour"):
        assert expected in reasons


@pytest.mark.slow
def test_every_nibabel_test_file(tmp_path, checkpoint, capsys, monkeypatch):
    data = Path(nib.__file__).parent / "tests" / "data"
    folder = tmp_path / "nibabel"
    shutil.copytree(data, folder, ignore=shutil.ignore_patterns("*.py", "*.m", "*.rst", ".gitignore", "__pycache__"))
    files = sorted(p for p in folder.iterdir() if p.is_file())
    assert len(files) > 60
    result = _sweep(files, tmp_path, checkpoint, capsys, monkeypatch)
    names = {f.name for f in result["masked"]}
    assert {"anatomical.nii", "standard.nii.gz", "0.dcm"} <= names
    reasons = "\n".join(result["refused"])
    assert "MGHImage files are not supported" in reasons and "4-D" in reasons and "NaN" in reasons


# ------------------------------------------------------------------------------------------------ subprocesses
@pytest.mark.slow
def test_cli_subprocess_prints_one_line_per_refused_file(tmp_path, checkpoint):
    """The real command: no traceback, no library warning, one line per refused file, the good file segmented."""
    mr_small = next((f for f in pydicom_test_files() if f.name == "MR_small.dcm"), None)
    assert mr_small is not None, "pydicom's test data has no MR_small.dcm"
    good = Path(shutil.copyfile(mr_small, tmp_path / "MR_small.dcm"))
    bad = [_truncated(tmp_path / "cut.dcm", lambda q: _dicom(q, _noise((64, 80), np.uint16, 4000))),
           _huge_png(tmp_path / "huge.png"),
           _renamed(tmp_path / "scan.png", lambda q: _nifti(q.with_suffix(".nii.gz"), _noise((9, 9, 2), np.float32)))]
    before = _digest([good, *bad])
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "causalclipseg.cli", "predict", str(good), *map(str, bad),
                             "--prompt", PROMPT, "--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "o"),
                             "--device", "cpu"], capture_output=True, text=True, timeout=240)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == len(bad), result.stderr  # nothing else: no warnings, no traceback
    for path, line in zip(bad, lines):
        assert line.startswith("error: ") and path.name in line, line
    assert result.stdout.startswith(f"{good} -> ")
    assert (tmp_path / "o" / "MR_small_mask.nii.gz").is_file() and not _leftovers(tmp_path / "o")
    assert _digest([good, *bad]) == before
    assert time.perf_counter() - started < 200


def _bundle_infer(ckpt: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                           "--ckpt_path", str(ckpt), "--progress", "False", *args], cwd=ROOT / "bundle", env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)


@pytest.mark.slow
def test_bundle_segments_colour_sagittal_and_16bit_inputs(tmp_path, checkpoint):
    inputs = [_dicom(tmp_path / "rgb.dcm", _noise((40, 56, 3)), "RGB"),
              _dicom(tmp_path / "sag.dcm", _noise((40, 56), np.uint16, 4000), orientation=_SAGITTAL),
              _picture(tmp_path / "deep.png", _noise((48, 64), np.uint16, 65535))]
    datalist = tmp_path / "inputs.json"
    datalist.write_text(json.dumps({"testing": [{"image": str(p)} for p in inputs]}))
    out = tmp_path / "out"
    result = _bundle_infer(checkpoint, "--input", str(datalist), "--output_dir", str(out))
    assert result.returncode == 0, result.stdout[-4000:]
    for path in inputs:
        shape, affine = _spatial_grid(path)
        mask = nib.load(out / f"{path.stem}_mask.nii.gz")
        assert mask.shape == shape and len(shape) == 2, path.name  # the RGB DICOM is one 2-D image
        np.testing.assert_allclose(mask.affine, affine, atol=1e-4)
        assert (out / f"{path.stem}_mask.png").is_file()
    assert not _leftovers(out)


@pytest.mark.slow
def test_bundle_refuses_a_nan_volume_with_a_clear_error(tmp_path, checkpoint):
    path = _nifti_with_nan(tmp_path / "nan.nii.gz")
    before = _digest([path])
    result = _bundle_infer(checkpoint, "--input", str(path), "--output_dir", str(tmp_path / "out"))
    assert result.returncode != 0
    assert f"ValueError: cannot segment {path}: it contains NaN or infinite pixel values" in result.stdout, \
        result.stdout[-3000:]
    assert _digest([path]) == before
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_an_input_that_cannot_be_listed_is_one_error_line_and_the_others_run(tmp_path, checkpoint, capsys):
    good = _picture(tmp_path / "a.png", _noise((30, 40)))
    not_a_datalist = tmp_path / "notes.json"
    not_a_datalist.write_text('{"author": "someone"}')
    code, stdout, stderr = _predict([not_a_datalist, tmp_path / "missing.png", good], tmp_path / "out", checkpoint,
                                    capsys)
    assert code == 2
    _assert_mask_on_grid(good, tmp_path / "out", stdout)
    assert len(stderr) == 2 and all(line.startswith("error: ") for line in stderr), stderr
    assert "datalist" in stderr[0] and "notes.json" in stderr[0] and "missing.png" in stderr[1]
