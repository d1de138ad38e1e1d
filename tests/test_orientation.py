"""One display orientation into the model: the same picture or volume, however its file orders the voxels, gives
the same mask in patient (world) space, and the mask comes back on the input's exact grid."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from causalclipseg.inference.predictor import Predictor
from causalclipseg.io.orientation import (
    GEOMETRY_KEY,
    DisplayOrientation,
    DisplayOrientationd,
    display_axcodes,
    patient_orientation_affine,
    slice_axis,
)
from causalclipseg.io.reader import LoadSegmentableImaged

from .conftest import write_windowed_dx

# ------------------------------------------------------------------------------------------------ the geometry


@pytest.mark.parametrize(("affine", "shape", "codes"), [
    (np.diag([-1.0, -1, 1, 1]), (8, 6, 1), "LPS"),  # a picture as Slicer's PNG reader places it: axial
    (np.diag([1.0, 1, 1, 1]), (8, 6, 5), "LPS"),  # isotropic RAS volume: axial slices
    (np.diag([0.7, 0.7, 5.0, 1]), (8, 6, 5), "LPS"),  # thick axial slices
    (np.array([[0.7, 0, 0, 0], [0, 0, 5.0, 0], [0, 0.7, 0, 0], [0, 0, 0, 1]]), (8, 6, 5), "LIA"),  # thick coronal
    (np.array([[0, 0, 5.0, 0], [0.7, 0, 0, 0], [0, 0.7, 0, 0], [0, 0, 0, 1]]), (8, 6, 5), "PIL"),  # thick sagittal
])
def test_display_codes_follow_the_acquisition_plane_as_slicer_shows_it(affine, shape, codes):
    assert display_axcodes(affine, shape) == codes


def test_slice_axis_is_the_widest_spacing_or_head_feet_on_ties():
    permuted = np.array([[0, 1.0, 0, 0], [0, 0, 1.0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])  # voxel axis 0 is S-I
    assert slice_axis(permuted, (4, 5, 6)) == 0
    assert slice_axis(np.diag([1.0, 3.0, 1.0, 1]), (4, 5, 6)) == 1
    assert slice_axis(np.diag([1.0, 3.0, 1.0, 1]), (4, 5, 1)) == 2  # one slice: its own plane


@pytest.mark.parametrize(("codes", "expected"), [(("L", "F"), "LIP"), (("R", "F"), "RIA"), (("F", "L"), "IL"),
                                                  (("A", "F"), "AIL"), (("LF", "FR"), "LIP")])
def test_patient_orientation_gives_the_radiograph_axes(codes, expected):
    affine = patient_orientation_affine(codes)
    assert "".join(nib.aff2axcodes(affine))[: len(expected)] == expected


@pytest.mark.parametrize("codes", [(), ("L",), ("A", "P"), ("X", "F"), (None, "F")])
def test_patient_orientation_without_two_directions_is_unknown(codes):
    assert patient_orientation_affine(codes) is None


def _oriented(data: np.ndarray, affine: np.ndarray, ornt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same image with its voxels in another order: nibabel's reorientation, the affine kept in step."""
    return (nib.orientations.apply_orientation(data, ornt),
            affine @ nib.orientations.inv_ornt_aff(ornt, data.shape))


@pytest.mark.parametrize("ornt", [[[0, 1], [1, 1], [2, 1]], [[0, -1], [1, -1], [2, 1]], [[2, 1], [0, -1], [1, 1]],
                                  [[1, -1], [2, -1], [0, -1]]])
def test_display_orientation_inverts_exactly(ornt):
    rng = np.random.default_rng(0)
    base = rng.random((5, 6, 7)).astype(np.float32)
    data, affine = _oriented(base, np.diag([0.8, 0.8, 2.5, 1.0]), np.array(ornt, dtype=float))
    img = MetaTensor(torch.from_numpy(data.copy())[None], affine=torch.from_numpy(affine))
    img.meta[GEOMETRY_KEY] = "affine"
    transform = DisplayOrientation()
    shown = transform(img)
    assert "".join(nib.aff2axcodes(shown.affine.numpy())) == "LPS"
    back = transform.inverse(shown)
    assert torch.equal(back.as_tensor(), img.as_tensor())
    np.testing.assert_allclose(back.affine.numpy(), affine)


def test_pictures_and_unknown_orientations_are_taken_as_stored_and_still_invert():
    img = MetaTensor(torch.arange(12.0).reshape(1, 3, 4), affine=torch.diag(torch.tensor([1.0, 1, 1, 1])))
    for geometry in ("picture", "unknown"):
        img.meta[GEOMETRY_KEY] = geometry
        transform = DisplayOrientationd("image")
        shown = transform({"image": img})
        assert torch.equal(shown["image"].as_tensor(), img.as_tensor())
        assert torch.equal(transform.inverse(shown)["image"].as_tensor(), img.as_tensor())


# --------------------------------------------------------------------------- the shipped model, lateralized prompts
#: a QaTa-COV19 valid X-ray with a unilateral caption; patient's side = the caption's word swapped (viewer -> patient)
def _unilateral_case(qata_root: Path) -> tuple[Path, np.ndarray, str]:
    annotation = json.loads((qata_root / "prompts" / "annotation.json").read_text())["valid"]
    entry = next(a for a in annotation if a["pulmonary_infection"] == 1 and "lower left lung" in a["caption"])
    name = entry["image_path"][len("mask_"):]
    mask = np.array(Image.open(qata_root / "images" / "valid" / "masks" / entry["image_path"])) > 0
    prompt = "infection in the lower right lung"  # the caption's "left" is the viewer's: the patient's right
    return qata_root / "images" / "valid" / "images" / name, mask, prompt


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor(device="cpu")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def test_xray_as_png_nifti_and_nrrd_with_mirrored_voxels_gives_one_mask(tmp_path, qata_root, predictor):
    png, truth, prompt = _unilateral_case(qata_root)
    picture = np.array(Image.open(png)).astype(np.float32)  # (rows, columns), standard display
    reference = predictor.predict(png, prompt).mask.T > 0  # (rows, columns)
    assert _dice(reference, truth) > 0.6, "the patient's right, worded as a clinician would, is found"
    assert reference[:, :112].sum() > 0.7 * reference.sum(), "the patient's right lung is on the image's left"

    x = picture.T  # MONAI's axis order: x = columns (towards the patient's left), y = rows (towards the feet)
    # NIfTI placed as Slicer's PNG reader places a picture (axial, x -> L, y -> P), and mirrored with its affine
    nib.save(nib.Nifti1Image(x[:, :, None], np.diag([-1.0, -1, 1, 1])), tmp_path / "display.nii.gz")
    nib.save(nib.Nifti1Image(x[::-1, :, None].copy(), np.diag([1.0, -1, 1, 1])), tmp_path / "mirrored.nii.gz")
    # NRRD in LPS space (x -> L is +x): mirrored data with a mirrored direction
    nrrd.write(str(tmp_path / "mirrored.nrrd"), x[::-1, :, None].copy(),
               {"space": "left-posterior-superior", "space directions": [[-1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]],
                "space origin": [0.0, 0, 0]})
    for name, mirrored in (("display.nii.gz", False), ("mirrored.nii.gz", True), ("mirrored.nrrd", True)):
        mask = predictor.predict(tmp_path / name, prompt).mask
        assert mask.shape[:2] == x.shape, name  # the input's own grid
        mask = mask.reshape(x.shape)
        in_display = (mask[::-1] if mirrored else mask).T > 0
        assert _dice(in_display, reference) > 0.99, name


def _world_voxels(mask: np.ndarray, affine: np.ndarray) -> set[tuple[float, ...]]:
    ijk = np.argwhere(mask > 0)
    xyz = nib.affines.apply_affine(affine, ijk)
    return {tuple(p) for p in np.round(xyz, 3)}


def test_volume_in_ras_lps_and_oblique_voxel_order_gives_one_mask_in_world_space(tmp_path, qata_root, predictor):
    png, _, prompt = _unilateral_case(qata_root)
    picture = np.array(Image.open(png)).astype(np.float32)
    display = np.stack([picture.T, picture.T], axis=-1)  # (X, Y, 2) in display orientation: x -> L, y -> P
    tilt = np.eye(4)
    angle = np.deg2rad(12)
    tilt[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]  # oblique about S-I
    lps = tilt @ np.array([[-1.0, 0, 0, 10], [0, -1.0, 0, 20], [0, 0, 1.0, -5], [0, 0, 0, 1]])
    variants = {"lps": (display, lps)}
    variants["ras"] = _oriented(display, lps, np.array([[0, -1], [1, -1], [2, 1]], dtype=float))
    variants["permuted"] = _oriented(display, lps, np.array([[2, -1], [0, 1], [1, -1]], dtype=float))
    assert "".join(nib.aff2axcodes(variants["ras"][1])) == "RAS"
    worlds = {}
    for name, (data, affine) in variants.items():
        path = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), path)
        prediction = predictor.predict(path, prompt)
        assert prediction.mask.shape == data.shape, name  # the input's exact grid
        worlds[name] = _world_voxels(prediction.mask, affine)
    assert worlds["lps"], "a lesion is found"
    assert worlds["ras"] == worlds["lps"] and worlds["permuted"] == worlds["lps"]
    # the patient's right: world x (R) positive side of the slice centre, whatever the voxel order
    centre = nib.affines.apply_affine(lps, (np.array(display.shape) - 1) / 2)
    right = np.array([p[0] for p in worlds["lps"]]) > centre[0]
    assert right.mean() > 0.7


def test_unknown_orientation_with_a_side_in_the_prompt_warns(tmp_path, qata_root, predictor, caplog):
    png, _, prompt = _unilateral_case(qata_root)
    picture = np.array(Image.open(png)).astype(np.float32).T[:, :, None]
    image = nib.Nifti1Image(picture, np.eye(4))
    image.set_qform(None, code=0)
    image.set_sform(None, code=0)
    nib.save(image, tmp_path / "bare.nii")
    loaded = LoadSegmentableImaged("image")({"image": str(tmp_path / "bare.nii")})["image"]
    assert loaded.meta[GEOMETRY_KEY] == "unknown"
    with caplog.at_level(logging.WARNING, logger="causalclipseg"):
        predictor.predict(tmp_path / "bare.nii", prompt)
    assert any("does not record its orientation" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="causalclipseg"):
        predictor.predict(tmp_path / "bare.nii", "bilateral pulmonary infection")  # no side named: no warning
    assert not any("orientation" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------- DICOM X-rays
def test_xray_as_windowed_dicom_mirrored_or_not_gives_the_pictures_mask(tmp_path, qata_root, predictor):
    """A 12-bit windowed DX with a burned-in label, stored as displayed (L\\F) or mirrored (R\\F), MONOCHROME2 or 1:
    shown as a viewer shows it and oriented by Patient Orientation, its mask is the PNG's (issue: Dice >= 0.95)."""
    png, _, prompt = _unilateral_case(qata_root)
    reference = predictor.predict(png, prompt).mask.T > 0  # (rows, columns)
    for mirrored, monochrome1 in ((False, False), (True, False), (True, True)):
        dcm = write_windowed_dx(png, tmp_path / f"dx_{mirrored}_{monochrome1}.dcm", mirrored=mirrored,
                                monochrome1=monochrome1)
        mask = predictor.predict(dcm, prompt).mask.T > 0  # the stored grid: (rows, columns)
        assert mask.shape == reference.shape
        in_display = mask[:, ::-1] if mirrored else mask
        assert _dice(in_display, reference) >= 0.95, (mirrored, monochrome1)
