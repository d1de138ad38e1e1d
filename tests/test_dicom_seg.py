"""DICOM Segmentation objects of the masks of DICOM inputs (``predict --dicom-seg``, the bundle's ``dicom_seg``).

Each test writes its own small DICOM inputs (a radiograph stored mirrored, the same one unmirrored, a CT series whose
file names, Instance Numbers and positions are in three different orders) and uses a random tiny checkpoint; the
Segmentation is read back with highdicom and pydicom and its frames mapped onto the source instances' pixel grid by
their own geometry, then compared with the NIfTI mask written for the same input. With random weights the
probabilities cluster, so thresholds are their median (each mask is then neither empty nor full). Every test name
says ``dicom``: CI reruns these with pydicom 3 (and highdicom 0.23+) after the pydicom 2 run (highdicom 0.22).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from causalclipseg import DEFAULT_MODEL, __version__, cli
from causalclipseg.inference.predictor import Predictor
from causalclipseg.io.dicom_seg import SEGMENT_DESCRIPTION_MAX, SEGMENT_LABEL_MAX, dicom_segmentation
from causalclipseg.io.reader import SOURCE_FILES_KEY
from causalclipseg.io.writers import SaveMaskd

from .conftest import tiny_checkpoint_and_picture, write_dicom_image, write_windowed_dx

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
PROMPT = "bilateral pulmonary infection, two infected areas, lower left lung and lower right lung."
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
#: the series' files in name order, with their Instance Numbers (MONAI stacks by these) and slice indices along z
INSTANCE_NUMBERS = (3, 1, 4, 2)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """A random tiny checkpoint, a PNG picture, the DX radiograph made from it stored as is and mirrored (with
    Patient Orientation saying so: displayed alike), a NIfTI volume, and a CT series; the median probability of
    each DICOM input under :data:`PROMPT`."""
    from pydicom.uid import generate_uid

    root = tmp_path_factory.mktemp("dicom_seg")
    files, rng = tiny_checkpoint_and_picture(root, "picture.png")
    files["dx"] = write_windowed_dx(files["png"], root / "dx.dcm")
    files["mirrored"] = write_windowed_dx(files["png"], root / "mirrored.dcm", mirrored=True, monochrome1=True)
    files["nii"] = root / "volume.nii.gz"
    nib.save(nib.Nifti1Image(rng.random((40, 36, 3)).astype(np.float32), np.diag([0.8, 0.8, 2.0, 1.0])),
             files["nii"])
    files["series"] = root / "ct_series"
    files["series"].mkdir()
    uid, frame_of_reference = generate_uid(), generate_uid()
    for name, number in enumerate(INSTANCE_NUMBERS):  # names, Instance Numbers and positions in different orders
        write_dicom_image(files["series"] / f"s{name}.dcm", rng.integers(0, 2000, (48, 56)), "CT", uid,
                          InstanceNumber=number, ImagePositionPatient=[10.0, -20.0, -2.5 * number],
                          ImageOrientationPatient=[-1, 0, 0, 0, 1, 0], PixelSpacing=[0.7, 0.9], SliceThickness=2.5,
                          FrameOfReferenceUID=frame_of_reference, SpecificCharacterSet="ISO_IR 192",
                          PatientName="Müller^Jürgen")
    predictor = Predictor(DEFAULT_MODEL, files["ckpt"], device="cpu")
    files["thresholds"] = {k: float(np.median(predictor.predict(files[k], PROMPT).probability))
                           for k in ("dx", "mirrored", "series")}
    return files


def _predict(inputs: dict, kind: str, out: Path, *args: str) -> int:
    """``causalclipseg predict <input> --dicom-seg`` at the input's median threshold; its exit status."""
    return cli.main(["predict", str(inputs[kind]), "--prompt", PROMPT, "--checkpoint", str(inputs["ckpt"]), "--device",
                     "cpu", "--output-dir", str(out), "--threshold", repr(inputs["thresholds"][kind]), "--dicom-seg",
                     *args])


def _sources(path: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in ([path] if path.is_file() else sorted(path.glob("*.dcm")))]


def _frames(seg_file: Path, sources: list[pydicom.Dataset]) -> np.ndarray:
    """The Segmentation's frames of segment 1, one per source instance in ``sources``' order: (N, rows, columns)."""
    seg = hd.seg.segread(str(seg_file))
    pixels = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in sources], segment_numbers=[1])
    return np.asarray(pixels)[..., 0]


def _slice_index(affine: np.ndarray, ds: pydicom.Dataset) -> int:
    """Which slice of a mask with this voxel-to-RAS ``affine`` holds the DICOM instance ``ds`` (by its position)."""
    ras = np.asarray(ds.ImagePositionPatient, dtype=float) * [-1, -1, 1]  # LPS -> RAS
    i, j, k = np.linalg.solve(affine[:3, :3], ras - affine[:3, 3])
    assert abs(i) < 1e-3 and abs(j) < 1e-3 and abs(k - round(k)) < 1e-3, (i, j, k)
    return int(round(k))


def _check_segmentation(seg_file: Path, sources: list[pydicom.Dataset], prompt: str = PROMPT) -> pydicom.Dataset:
    """What every Segmentation written here must say: its class, its sources, its one segment and its algorithm."""
    seg = pydicom.dcmread(seg_file)
    assert seg.SOPClassUID == SEGMENTATION_STORAGE and seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID and seg.PatientName == sources[0].PatientName
    assert seg.SeriesInstanceUID != sources[0].SeriesInstanceUID
    referenced = {item.ReferencedSOPInstanceUID for series in seg.ReferencedSeriesSequence
                  for item in series.ReferencedInstanceSequence}
    assert referenced == {ds.SOPInstanceUID for ds in sources}
    assert int(seg.NumberOfFrames) == len(sources)  # one frame per source instance, empty or not
    (segment,) = seg.SegmentSequence
    assert segment.SegmentNumber == 1 and segment.SegmentAlgorithmType == "AUTOMATIC"
    label = prompt if len(prompt) <= SEGMENT_LABEL_MAX else prompt[:SEGMENT_LABEL_MAX - 3].rstrip() + "..."
    assert segment.SegmentLabel == label  # a Long String: at most 64 characters
    assert segment.SegmentDescription == prompt[:SEGMENT_DESCRIPTION_MAX]
    category, = segment.SegmentedPropertyCategoryCodeSequence
    kind, = segment.SegmentedPropertyTypeCodeSequence
    assert (category.CodeValue, category.CodingSchemeDesignator) == ("49755003", "SCT")  # morphologically abnormal
    assert (kind.CodeValue, kind.CodingSchemeDesignator, kind.CodeMeaning) == ("52988006", "SCT", "Lesion")
    algorithm, = segment.SegmentationAlgorithmIdentificationSequence
    assert algorithm.AlgorithmName == "causalclipseg" and algorithm.AlgorithmVersion == __version__
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # artificial intelligence
    return seg


# ----------------------------------------------------------------------------------------------------------- tests
def test_predict_dicom_seg_of_a_series_lies_on_each_source_instance(inputs, tmp_path):
    assert _predict(inputs, "series", tmp_path) == 0
    sources = _sources(inputs["series"])
    seg = _check_segmentation(tmp_path / "ct_series_seg.dcm", sources)
    assert str(seg.PatientName) == "Müller^Jürgen" and seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    mask_file = nib.load(tmp_path / "ct_series_mask.nii.gz")
    mask = np.asarray(mask_file.dataobj)
    assert mask.shape == (56, 48, 4) and 0 < mask.mean() < 1
    frames = _frames(tmp_path / "ct_series_seg.dcm", sources)
    slices = [_slice_index(mask_file.affine, ds) for ds in sources]
    assert slices == [n - 1 for n in INSTANCE_NUMBERS]  # by position: the files' own order is another
    for ds, frame, k in zip(sources, frames, slices):
        assert frame.shape == (ds.Rows, ds.Columns)
        np.testing.assert_array_equal(frame, mask[:, :, k].T, err_msg=f"instance {ds.InstanceNumber}")


def test_predict_dicom_seg_of_a_mirrored_dx_lies_on_its_stored_pixels(inputs, tmp_path):
    """The DX stored mirrored (Patient Orientation ``R\\F``, MONOCHROME1) is displayed like the plain one, so the
    model sees one image; each Segmentation lies on its own file's stored pixels: mirror images of each other, each
    equal to its NIfTI mask."""
    frames = {}
    for kind in ("dx", "mirrored"):
        assert _predict(inputs, kind, tmp_path) == 0
        sources = _sources(inputs[kind])
        _check_segmentation(tmp_path / f"{kind}_seg.dcm", sources)
        (frame,) = _frames(tmp_path / f"{kind}_seg.dcm", sources)
        mask = np.asarray(nib.load(tmp_path / f"{kind}_mask.nii.gz").dataobj).squeeze()  # (X, Y): columns, rows
        assert frame.shape == (72, 88) and 0 < frame.mean() < 1
        np.testing.assert_array_equal(frame, mask.T)
        frames[kind] = frame
    np.testing.assert_array_equal(frames["mirrored"], frames["dx"][:, ::-1])


def test_predict_dicom_seg_refuses_other_inputs_in_one_line_each(inputs, tmp_path, capsys):
    rc = cli.main(["predict", str(inputs["png"]), str(inputs["nii"]), str(inputs["dx"]), "--prompt", PROMPT,
                   "--checkpoint", str(inputs["ckpt"]), "--device", "cpu", "--output-dir", str(tmp_path),
                   "--dicom-seg"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 2, err
    rule = "a DICOM Segmentation is written for DICOM inputs only (a DICOM file or a folder holding one DICOM series)"
    assert err[0] == f"error: {inputs['png']} is a PNG picture, not DICOM: {rule}"
    assert err[1].startswith(f"error: {inputs['nii']} is a NIfTI image, not DICOM: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dx_mask.nii.gz", "dx_overlay.png", "dx_seg.dcm"]


def test_predict_dicom_seg_keeps_an_existing_file_unless_overwrite(inputs, tmp_path, capsys):
    existing = tmp_path / "dx_seg.dcm"
    existing.write_bytes(b"the user's file")
    rc = cli.main(["predict", str(inputs["dx"]), "--prompt", PROMPT, "--checkpoint", str(inputs["ckpt"]), "--device",
                   "cpu", "--output-dir", str(tmp_path), "--dicom-seg"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == f"error: {inputs['dx']}: output {existing} exists; pass --overwrite to replace it"
    assert existing.read_bytes() == b"the user's file" and sorted(tmp_path.iterdir()) == [existing]
    assert _predict(inputs, "dx", tmp_path, "--overwrite") == 0
    _check_segmentation(existing, _sources(inputs["dx"]))


def test_dicom_seg_labels_long_and_non_latin_prompts_within_their_value_representations(inputs, tmp_path):
    """Segment Label is a Long String (64 characters, no backslash), Segment Description a Short Text (1024): the
    prompt is cut to fit, whatever its script, and reads back as written (UTF-8)."""
    prompt = "左下肺感染, " + "lower left lung \\ consolidation " * 40  # 1288 characters, a backslash
    mask = np.zeros((88, 72), np.uint8)
    mask[10:30, 20:50] = 1
    meta = {"filename_or_obj": str(inputs["dx"]), SOURCE_FILES_KEY: [str(inputs["dx"])]}
    target = tmp_path / "seg.dcm"
    dicom_segmentation(mask, meta, prompt, {"model": "tiny"}).save_as(target)
    seg = pydicom.dcmread(target)
    segment = seg.SegmentSequence[0]
    assert seg.SpecificCharacterSet == "ISO_IR 192"
    assert len(segment.SegmentLabel) == SEGMENT_LABEL_MAX and segment.SegmentLabel.startswith("左下肺感染, lower left")
    assert "\\" not in segment.SegmentLabel and segment.SegmentLabel.endswith("...")
    assert len(segment.SegmentDescription) == SEGMENT_DESCRIPTION_MAX and segment.SegmentDescription.startswith(
        "左下肺感染, lower left lung \\ consolidation")
    (frame,) = _frames(target, _sources(inputs["dx"]))
    np.testing.assert_array_equal(frame, mask.T)
    with pytest.raises(ValueError, match=r"the mask \(88, 72, 2\) does not hold one slice per source file"):
        dicom_segmentation(np.zeros((88, 72, 2), np.uint8), meta, prompt)
    with pytest.raises(ValueError, match="no source files recorded"):
        dicom_segmentation(mask, {"filename_or_obj": str(inputs["png"])}, prompt)


def test_bundle_writer_refuses_dicom_seg_of_other_inputs_before_writing(inputs, tmp_path):
    from causalclipseg.inference.predictor import inference_preprocessing

    image = inference_preprocessing()({"image": str(inputs["png"])})["image"]
    writer = SaveMaskd("pred", tmp_path, suffixes=[".nii.gz", ".png"], dicom_seg=True, prompt=PROMPT)
    with pytest.raises(ValueError, match=f"{inputs['png']} is a PNG picture, not DICOM: a DICOM Segmentation"):
        writer({"pred": (image > image.mean()).float()})
    assert not any(tmp_path.iterdir())


def test_bundle_dicom_seg_knob_is_off_by_default_and_documented():
    config = json.loads((BUNDLE / "configs" / "inference.json").read_text())
    assert config["dicom_seg"] is False and config["explain"] is False
    assert config["writer"]["dicom_seg"] == "@dicom_seg" and config["writer"]["maps"] == "@explanation_maps"
    docs = (BUNDLE / "docs" / "README.md").read_text()
    assert "--dicom_seg True" in docs and "--explain True" in docs


@pytest.mark.slow
def test_bundle_dicom_seg_and_explain_write_what_predict_writes_for_dicom(inputs, tmp_path):
    """The bundle's ``dicom_seg`` and ``explain`` knobs, on a DX and a series: the files of ``predict --dicom-seg
    --explain``, with the same values (the Segmentations' frames, the float maps and the masks); the mask is the
    probability map thresholded. The shipped variant has no causal module: neither writes a causal mask (the one
    of a model with it: ``test_explain.py``). (The bundle's masks on pictures and NIfTI volumes are ``predict``'s too:
    ``test_bundle.py``; the maps go through the same writer.)"""
    kinds = ("mirrored", "series")
    threshold = float(np.mean([inputs["thresholds"][k] for k in kinds]))
    assert cli.main(["predict", *(str(inputs[k]) for k in kinds), "--prompt", PROMPT, "--checkpoint",
                     str(inputs["ckpt"]), "--device", "cpu", "--output-dir", str(tmp_path / "predict"), "--threshold",
                     repr(threshold), "--dicom-seg", "--explain"]) == 0
    datalist = tmp_path / "inputs.json"
    datalist.write_text(json.dumps({"testing": [{"image": str(inputs[k])} for k in kinds]}))
    result = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                             "--ckpt_path", str(inputs["ckpt"]), "--progress", "False", "--input", str(datalist),
                             "--output_dir", str(tmp_path / "bundle"), "--prompt", PROMPT, "--threshold",
                             repr(threshold), "--dicom_seg", "True", "--explain", "True"], cwd=BUNDLE, timeout=300,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    for kind in kinds:
        name = inputs[kind].name.split(".")[0]
        assert not list(tmp_path.glob(f"*/{name}_causal_mask.nii.gz"))
        for suffix in ("mask", "probability"):
            ours = nib.load(tmp_path / "bundle" / f"{name}_{suffix}.nii.gz")
            theirs = nib.load(tmp_path / "predict" / f"{name}_{suffix}.nii.gz")
            assert ours.get_data_dtype() == theirs.get_data_dtype(), (kind, suffix)
            np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-6)
            np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj), err_msg=suffix)
        mask, probability = (np.asarray(nib.load(tmp_path / "bundle" / f"{name}_{suffix}.nii.gz").dataobj)
                             for suffix in ("mask", "probability"))
        assert probability.dtype == np.float32 and 0 < mask.mean() < 1
        np.testing.assert_array_equal(mask, (probability >= threshold).astype(mask.dtype), err_msg=kind)
        sources = _sources(inputs[kind])
        ours = _frames(tmp_path / "bundle" / f"{name}_seg.dcm", sources)
        _check_segmentation(tmp_path / "bundle" / f"{name}_seg.dcm", sources)
        assert 0 < ours.mean() < 1, kind
        np.testing.assert_array_equal(ours, _frames(tmp_path / "predict" / f"{name}_seg.dcm", sources), err_msg=kind)
