"""Every front door reads inputs alike: the CLI and the bundle share the input policy (a DICOM series folder is one
volume), the display orientation and the patient's side, and so give the same masks with the shipped model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from causalclipseg import cli
from causalclipseg.io.inputs import list_inputs

from .conftest import save_dicom, write_windowed_dx

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"


def _series(folder: Path, picture: np.ndarray, slices: int = 2) -> Path:
    """An axial CT series of ``slices`` copies of ``picture`` (rows, columns), rows towards the patient's back."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir()
    series_uid, study_uid = generate_uid(), generate_uid()
    for k in range(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "CT", series_uid, study_uid
        ds.PatientID, ds.InstanceNumber = "anon", k + 1
        # columns run towards the patient's right (LPS -x): the picture is stored mirrored, as a viewer must undo
        ds.ImageOrientationPatient, ds.ImagePositionPatient = [-1, 0, 0, 0, 1, 0], [0, 0, 2.0 * k]
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 2.0
        ds.Rows, ds.Columns = picture.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(picture[:, ::-1]).astype(np.uint16).tobytes()
        save_dicom(ds, folder / f"slice{k}.dcm")
    return folder


def _case(qata_root: Path) -> tuple[Path, str, str]:
    entries = json.loads((qata_root / "prompts" / "annotation.json").read_text())["valid"]
    entry = next(a for a in entries if a["pulmonary_infection"] == 1 and "lower left lung" in a["caption"])
    image = qata_root / "images" / "valid" / "images" / entry["image_path"][len("mask_"):]
    return image, entry["caption"], entry["caption"].replace("left", "right")  # viewer's words, patient's words


def _masks(folder: Path) -> dict[str, nib.Nifti1Image]:
    return {p.name: nib.load(p) for p in sorted(folder.glob("*_mask.nii.gz"))}


@pytest.mark.slow
def test_cli_and_bundle_give_the_same_masks_for_mirrored_dicom_volumes_and_a_series(tmp_path, qata_root, capsys):
    png, caption, clinician = _case(qata_root)
    picture = np.array(Image.open(png))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    dx = write_windowed_dx(png, inputs / "dx.dcm", mirrored=True)
    x = picture.T.astype(np.float32)  # x -> the patient's left, y -> feet
    volume = np.stack([x, x], axis=-1)  # axial, display orientation: x -> L, y -> P, z -> S
    permuted = nib.orientations.apply_orientation(volume, np.array([[1, -1], [2, 1], [0, 1]], dtype=float))
    affine = np.diag([-1.0, -1, 2, 1]) @ nib.orientations.inv_ornt_aff(
        np.array([[1, -1], [2, 1], [0, 1]], dtype=float), volume.shape)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(permuted), affine), inputs / "vol.nii.gz")
    series = _series(inputs / "series", picture)
    assert list_inputs([dx, series]) == [dx, series]  # one volume for the series folder

    assert cli.main(["predict", str(dx), str(inputs / "vol.nii.gz"), str(series), "--prompt", clinician,
                     "--output-dir", str(tmp_path / "cli")]) == 0
    cli_masks = _masks(tmp_path / "cli")
    assert sorted(cli_masks) == ["dx_mask.nii.gz", "series_mask.nii.gz", "vol_mask.nii.gz"]
    assert cli_masks["series_mask.nii.gz"].shape[:3] == (*picture.shape[::-1], 2)

    datalist = tmp_path / "inputs.json"
    datalist.write_text(json.dumps({"testing": [{"image": str(p)} for p in (dx, inputs / "vol.nii.gz", series)]}))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for name, prompt_args in (("patient", ["--prompt", clinician]),
                              ("viewer", ["--prompt", caption, "--prompt_side", "viewer"])):
        result = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                                 "configs/inference.json", "--input", str(datalist), "--output_dir",
                                 str(tmp_path / name), "--progress", "False", *prompt_args], cwd=BUNDLE, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:]
        bundle_masks = _masks(tmp_path / name)
        assert sorted(bundle_masks) == sorted(cli_masks), name
        for file, image in cli_masks.items():
            ours = bundle_masks[file]
            np.testing.assert_allclose(ours.affine, image.affine, atol=1e-5, err_msg=f"{name} {file}")
            a, b = np.asarray(ours.dataobj).squeeze(), np.asarray(image.dataobj).squeeze()
            assert a.shape == b.shape and np.array_equal(a > 0, b > 0), f"{name} {file}"
    # the mirrored radiograph's mask, brought to display, lies on the image's left: the patient's right
    dx_mask = np.asarray(cli_masks["dx_mask.nii.gz"].dataobj).squeeze()[::-1].T  # (rows, columns) as displayed
    assert dx_mask.sum() > 0 and dx_mask[:, : picture.shape[1] // 2].sum() > 0.7 * dx_mask.sum()


def test_bundle_declares_the_patients_side_as_its_default():
    config = json.loads((BUNDLE / "configs" / "inference.json").read_text())
    assert config["prompt_side"] == "patient"
    (tokens,) = [t for t in config["preprocessing"]["transforms"] if t["_target_"].endswith(".ModelTokensd")]
    assert tokens["prompt_side"] == "@prompt_side" and tokens["prompt"] == "@prompt_text"
    docs = (BUNDLE / "docs" / "README.md").read_text()
    assert "patient's" in docs and "prompt_side" in docs


@pytest.mark.slow
def test_bundle_warns_when_a_side_cannot_be_checked(tmp_path, qata_root):
    png, _, clinician = _case(qata_root)
    image = nib.Nifti1Image(np.array(Image.open(png)).T.astype(np.float32)[..., None], np.eye(4))
    image.set_qform(None, code=0)
    image.set_sform(None, code=0)
    nib.save(image, tmp_path / "bare.nii")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                             "--input", str(tmp_path / "bare.nii"), "--output_dir", str(tmp_path / "out"),
                             "--progress", "False", "--prompt", clinician], cwd=BUNDLE, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "does not record its orientation" in result.stdout
    assert (tmp_path / "out" / "bare_mask.nii.gz").is_file()
