"""Prompt edits, tokenisation, the lateral flip (axis convention proven on an asymmetric picture), the train / val /
inference pipelines' output contract, and PNG / DICOM / NIfTI inputs agreeing."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import CacheDataset
from monai.transforms import Compose, RandomizableTrait, SaveImage
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

from causalclipseg.data.pipelines import (
    SlicePreprocessing,
    get_load_transforms,
    get_train_transforms,
    get_val_transforms,
)
from causalclipseg.data.prompts import PROMPT_TRANSFORMS, get_prompt_transform, swap_laterality
from causalclipseg.data.transforms import Grayscale2D, RandLateralFlipd, TokenizeText, TokenizeTextd
from causalclipseg.io.reader import LoadSegmentableImaged

from .conftest import save_dicom

PROMPT = "bilateral pulmonary infection, two infected areas, lower left lung and upper right lung."


def _picture() -> np.ndarray:
    """(rows, cols) = (H, W) = (40, 60) uint8, asymmetric: a bright block at the viewer's top-left."""
    picture = np.full((40, 60), 30, np.uint8)
    picture[4:14, 2:12] = 255  # top-left, as a viewer sees it
    picture[30:36, 40:44] = 120
    return picture


def _record(tmp_path: Path, picture: np.ndarray | None = None, mask: np.ndarray | None = None) -> dict[str, str]:
    picture = _picture() if picture is None else picture
    mask = (picture == 255).astype(np.uint8) * 255 if mask is None else mask
    Image.fromarray(picture).save(tmp_path / "img.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return {"image": str(tmp_path / "img.png"), "label": str(tmp_path / "mask.png"), "prompt": PROMPT}


# --- prompts -------------------------------------------------------------------------------------------------------

def test_swap_laterality_whole_words_case_preserving():
    assert swap_laterality("lower left lung and upper right lung") == "lower right lung and upper left lung"
    assert swap_laterality("Left lung, RIGHT lung, Right-sided") == "Right lung, LEFT lung, Left-sided"
    assert swap_laterality("bright leftover, rightwards") == "bright leftover, rightwards"
    assert swap_laterality(swap_laterality(PROMPT)) == PROMPT
    with pytest.raises(TypeError, match="prompt must be a str, got int"):
        swap_laterality(3)


def test_prompt_transform_registry():
    assert set(PROMPT_TRANSFORMS) == {"none", "swap", "empty"}
    assert get_prompt_transform("none")(PROMPT) == PROMPT
    assert get_prompt_transform("swap")("left") == "right"
    assert get_prompt_transform("empty")(PROMPT) == ""
    with pytest.raises(ValueError, match=r"prompt_transform must be one of \['empty', 'none', 'swap'\], got 'flip'"):
        get_prompt_transform("flip")


# --- tokenisation --------------------------------------------------------------------------------------------------

def test_tokenize_text_and_dict_version():
    tokens = TokenizeText(context_length=16)("left lung")
    assert tokens.shape == (16,) and tokens.dtype == torch.int64
    assert tokens[0] == 49406 and tokens[3] == 49407 and tokens[4:].eq(0).all()  # <sot> left lung <eot> 0...
    out = TokenizeTextd("prompt", output_key="text", context_length=16)({"prompt": "left lung"})
    assert torch.equal(out["text"], tokens) and out["prompt"] == "left lung"
    with pytest.raises(ValueError, match="prompt must contain text"):
        TokenizeText()("  ")
    assert TokenizeText(allow_empty=True)("")[:2].tolist() == [49406, 49407]
    with pytest.raises(ValueError, match="context_length must be at least 3, got 2"):
        TokenizeText(context_length=2)


# --- lateral flip and the axis convention --------------------------------------------------------------------------

def test_lateral_flip_mirrors_the_picture_as_a_viewer_sees_it(tmp_path):
    record = _record(tmp_path)
    load = Compose(get_load_transforms(image_size=40))  # any size: the block's side is what matters
    loaded = load(record)
    flipped = RandLateralFlipd(prob=1.0)(loaded)
    assert flipped["prompt"] == ("bilateral pulmonary infection, two infected areas, "
                                 "lower right lung and upper left lung.")

    # MONAI's loading convention: (C, X, Y), X = columns. Back to the viewer's (rows, cols) by transposing.
    before = loaded["image"][0].numpy().T
    after = flipped["image"][0].numpy().T
    np.testing.assert_allclose(after, np.fliplr(before))
    cols_bright_before = np.where(before.max(axis=0) > 0.9)[0]
    cols_bright_after = np.where(after.max(axis=0) > 0.9)[0]
    assert cols_bright_before.max() < 20 and cols_bright_after.min() > 20  # left third -> right third
    rows_bright = np.where(after.max(axis=1) > 0.9)[0]
    assert rows_bright.max() < 20  # still at the top: a left-right mirror, not an up-down one
    np.testing.assert_array_equal(flipped["label"][0].numpy().T, np.fliplr(loaded["label"][0].numpy().T))

    # Round trip through MONAI's writer and PIL: the viewer sees the block at the top-RIGHT of the saved picture.
    SaveImage(output_dir=tmp_path, output_ext=".png", output_postfix="flipped", separate_folder=False,
              writer="PILWriter", scale=255, resample=False)(flipped["image"])
    saved = np.asarray(Image.open(tmp_path / "img_flipped.png"))
    assert saved.shape == (40, 40)
    assert saved[:20, 20:].max() == 255 and saved[:20, :20].max() < 200


def test_lateral_flip_draws_once_per_sample_and_inverts(tmp_path):
    loaded = Compose(get_load_transforms(image_size=32))(_record(tmp_path))
    flip = RandLateralFlipd(prob=0.5).set_random_state(seed=0)
    outcomes = []
    for _ in range(40):
        out = flip(loaded)
        image_flipped = not torch.equal(out["image"], loaded["image"])
        label_flipped = not torch.equal(out["label"], loaded["label"])
        prompt_swapped = out["prompt"] != PROMPT
        assert image_flipped == label_flipped == prompt_swapped
        outcomes.append(image_flipped)
    assert 5 < sum(outcomes) < 35
    always = RandLateralFlipd(prob=1.0)  # MONAI inverts only with the instance that applied the transform
    flipped = always(loaded)
    restored = always.inverse(flipped)
    assert torch.equal(restored["image"], loaded["image"]) and restored["prompt"] == PROMPT
    untouched = RandLateralFlipd(prob=0.0)(loaded)
    assert torch.equal(untouched["image"], loaded["image"]) and untouched["prompt"] == PROMPT
    with pytest.raises(ValueError, match="prob must be in"):
        RandLateralFlipd(prob=1.5)


# --- pipelines -----------------------------------------------------------------------------------------------------

def _check_contract(out: dict, size: int, context_length: int) -> None:
    assert out["image"].shape == (3, size, size) and out["image"].dtype == torch.float32
    assert out["label"].shape == (1, size, size) and out["label"].dtype == torch.float32
    assert set(out["label"].unique().tolist()) <= {0.0, 1.0}
    assert out["text"].shape == (context_length,) and out["text"].dtype == torch.int64
    assert isinstance(out["prompt"], str)


def test_val_transforms_contract_and_normalisation(tmp_path):
    out = get_val_transforms(image_size=40, context_length=24)(_record(tmp_path))
    _check_contract(out, 40, 24)
    # the brightest pixel (255) is 1.0 after min-max scaling, then CLIP-normalised per channel
    mean, std = torch.tensor(OPENAI_DATASET_MEAN), torch.tensor(OPENAI_DATASET_STD)
    torch.testing.assert_close(out["image"].amax(dim=(1, 2)), (1.0 - mean) / std)
    torch.testing.assert_close(out["image"].amin(dim=(1, 2)), (0.0 - mean) / std)
    assert out["label"].sum() > 0 and out["prompt"] == PROMPT
    swapped = get_val_transforms(40, 24, prompt_transform="swap")(_record(tmp_path))
    assert swapped["prompt"] == swap_laterality(PROMPT) and not torch.equal(swapped["text"], out["text"])
    torch.testing.assert_close(swapped["image"], out["image"])  # the image is not flipped
    empty = get_val_transforms(40, 24, prompt_transform="empty")(_record(tmp_path))
    assert empty["prompt"] == "" and empty["text"][:3].tolist() == [49406, 49407, 0]
    with pytest.raises(ValueError, match="prompt_transform must be one of"):
        get_val_transforms(prompt_transform="mirror")


def test_resize_rgb_and_mask_colours(tmp_path):
    """A non-square RGB picture and a mask with two foreground grey levels (> 0 is foreground)."""
    rgb = np.stack([_picture()] * 3, axis=-1)
    mask = np.zeros((40, 60), np.uint8)
    mask[4:14, 2:12] = 1
    mask[20:30, 30:50] = 200
    out = get_val_transforms(image_size=32, context_length=32)(_record(tmp_path, rgb, mask))
    _check_contract(out, 32, 32)
    assert out["label"].mean() == pytest.approx((100 + 200) / 2400, abs=0.03)


def test_train_transforms_contract_reproducible_and_cacheable(tmp_path):
    record = _record(tmp_path)
    train = get_train_transforms(image_size=48, context_length=32)
    outs = [train(record) for _ in range(6)]
    for out in outs:
        _check_contract(out, 48, 32)
        assert out["label"].sum() > 0
        assert out["prompt"] in (PROMPT, swap_laterality(PROMPT))
    first_random = next(i for i, t in enumerate(train.transforms) if isinstance(t, RandomizableTrait))
    assert first_random == len(get_load_transforms(48)) and isinstance(train.transforms[first_random],
                                                                       RandLateralFlipd)
    a = get_train_transforms(48).set_random_state(seed=3)(record)
    b = get_train_transforms(48).set_random_state(seed=3)(record)
    torch.testing.assert_close(a["image"], b["image"])
    dataset = CacheDataset([record, record], transform=train, cache_rate=1.0, progress=False)
    _check_contract(dataset[1], 48, 32)
    no_aug = get_train_transforms(48, augment=False)(record)
    torch.testing.assert_close(no_aug["image"], get_val_transforms(48)(record)["image"])
    with pytest.raises(ValueError, match="image_size must be at least 1, got 0"):
        get_train_transforms(image_size=0)
    with pytest.raises(TypeError, match="image_size must be an int, got float"):
        get_val_transforms(image_size=22.5)


def test_inference_png_dicom_nifti_agree(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    picture = _picture()
    Image.fromarray(picture).save(tmp_path / "x.png")
    # NIfTI stores (X, Y) = (cols, rows): the transposed picture, as a single-slice volume (X, Y, 1)
    nib.save(nib.Nifti1Image(picture.T[..., None].astype(np.float32), np.eye(4)), tmp_path / "x.nii.gz")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", "anon"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows, ds.Columns = picture.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (picture.astype(np.uint16) * 16).tobytes()  # 12-bit range
    save_dicom(ds, tmp_path / "x.dcm")
    assert pydicom.dcmread(tmp_path / "x.dcm").pixel_array.shape == (40, 60)

    load, preprocess = LoadSegmentableImaged("image"), SlicePreprocessing(32)  # what predict and the bundle do
    outs = {}
    for ext in ("png", "dcm", "nii.gz"):
        image = load({"image": str(tmp_path / f"x.{ext}")})["image"]
        image = image[..., 0] if image.ndim == 4 else image  # the NIfTI is a single-slice volume (1, X, Y, 1)
        assert image.shape == (1, 60, 40), ext  # (C, X, Y): x = the picture's columns
        outs[ext] = preprocess(image[None])[0]
        assert outs[ext].shape == (3, 32, 32)
    torch.testing.assert_close(outs["dcm"], outs["png"])
    torch.testing.assert_close(outs["nii.gz"], outs["png"])


def test_grayscale2d_rejects_volumes():
    with pytest.raises(ValueError, match=r"must be channel-first 2-D \(C, X, Y\), got shape \(1, 4, 4, 3\)"):
        Grayscale2D()(torch.zeros(1, 4, 4, 3))
    assert Grayscale2D("max")(torch.tensor([[[0.0, 2.0]], [[3.0, 1.0]], [[0.0, 0.0]]])).tolist() == [[[3.0, 2.0]]]
