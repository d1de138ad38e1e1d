"""Flip test-time augmentation (``MirrorAveraged``) and where it is offered: the Predictor (``predict --flip-tta``),
the evaluation (``evaluate --flip-tta``) and the prompts' mirrored token ids."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import causalclipseg
from causalclipseg import cli
from causalclipseg.data.prompts import swap_laterality
from causalclipseg.data.transforms import LATERAL_AXIS
from causalclipseg.evaluation.evaluate import evaluate_model, split_loader
from causalclipseg.evaluation.metrics import SegmentationScores
from causalclipseg.inference.predictor import Predictor
from causalclipseg.inference.prompts import ModelTokensd, mirrored_model_tokens, model_tokens
from causalclipseg.inference.tta import MirrorAveraged, mean_probability_logits

from .conftest import tiny_checkpoint_and_picture, write_datalist

PROMPT = "unilateral pulmonary infection, one infected area, lower left lung."


def test_mean_probability_logits_is_the_logit_of_the_mean_probability():
    a, b = torch.randn(2, 1000, dtype=torch.float64) * 4
    expected = torch.logit((torch.sigmoid(a) + torch.sigmoid(b)) / 2)
    torch.testing.assert_close(mean_probability_logits(a, b), expected)
    extreme = mean_probability_logits(torch.tensor([100.0, 90.0, -90.0]), torch.tensor([-100.0, 90.0, -90.0]))
    torch.testing.assert_close(extreme, torch.tensor([0.0, 90.0, -90.0]))  # finite and exact where logit(p) is not


def test_mirror_averaged_mirrors_the_lateral_axis_and_reads_the_mirrored_prompt():
    """A network that is not mirror equivariant (a ramp along the lateral axis, scaled by the prompt): the average
    is the plain prediction with the mirrored one mirrored back, channel 0 as probabilities, other channels as they
    are; flipping the other axis or using the plain prompt twice would give something else."""
    ramp = torch.arange(6.0).view(1, 1, 6, 1)  # along spatial axis LATERAL_AXIS of (B, C, X, Y)
    assert LATERAL_AXIS == 0

    def network(image, text):
        logits = image[:, :1] + text[:, :1].view(-1, 1, 1, 1) * ramp
        return torch.cat([logits, torch.sigmoid(image[:, 1:2]) * ramp / 5], dim=1)

    image = torch.randn(2, 3, 6, 4)
    text, mirrored_text = torch.tensor([[1.0], [2.0]]), torch.tensor([[-1.0], [0.5]])
    out = MirrorAveraged(network)(image, text, mirrored_text)
    plain, back = network(image, text), network(image.flip(2), mirrored_text).flip(2)
    torch.testing.assert_close(out[:, :1], mean_probability_logits(plain[:, :1], back[:, :1]))
    torch.testing.assert_close(out[:, 1:], (plain[:, 1:] + back[:, 1:]) / 2)
    assert not torch.allclose(out, MirrorAveraged(network)(image, text, text))
    wrong_axis = mean_probability_logits(plain[:, :1], network(image.flip(3), mirrored_text).flip(3)[:, :1])
    assert not torch.allclose(out[:, :1], wrong_axis)


def test_mirrored_prompt_tokens():
    model = causalclipseg.create_model(causalclipseg.DEFAULT_MODEL)
    for side in ("patient", "viewer"):
        torch.testing.assert_close(mirrored_model_tokens(model, "Lower LEFT lung", side),
                                   model_tokens(model, "Lower RIGHT lung", side))
    d = ModelTokensd(model, PROMPT, mirrored_key="mirrored_text")({})
    torch.testing.assert_close(d["text"], model_tokens(model, PROMPT)[0])
    torch.testing.assert_close(d["mirrored_text"], model_tokens(model, swap_laterality(PROMPT))[0])
    assert "mirrored_text" not in ModelTokensd(model, PROMPT)({})


def test_predictor_with_flip_tta_is_mirror_equivariant(tmp_path):
    """On a picture that is its own mirror image, flip TTA's prediction for a prompt is the mirror image of its
    prediction for the prompt with its sides swapped (the two views are the same two, in the other order); the
    random model alone is not (it has position cues), so the property is the TTA's doing."""
    files, rng = tiny_checkpoint_and_picture(tmp_path, "unused.png")
    half = (rng.random((72, 44)) * 255).astype(np.uint8)
    picture = tmp_path / "symmetric.png"
    Image.fromarray(np.concatenate([half, half[:, ::-1]], axis=1)).save(picture)  # columns mirrored
    swapped = swap_laterality(PROMPT)
    for flip_tta, equivariant in ((True, True), (False, False)):
        predictor = Predictor(checkpoint=files["ckpt"], device="cpu", flip_tta=flip_tta)
        a = predictor.predict(picture, PROMPT).probability  # (X, Y): columns first
        b = predictor.predict(picture, swapped).probability
        assert a.shape == (88, 72)
        gap = float(np.abs(a - b[::-1]).max())
        assert (gap < 1e-5) if equivariant else (gap > 1e-4), (flip_tta, gap)


def test_evaluate_with_flip_tta_scores_the_average_of_both_views(tmp_path):
    """``evaluate_model(flip_tta=True)`` on ``split_loader(flip_tta=True)`` scores, image by image, the mean of the
    plain probability and the one made on the mirrored split (``mirror=True``: images, masks and prompts mirrored
    by the pipeline's own flip) mirrored back."""
    datalist = write_datalist(tmp_path, n=6)
    torch.manual_seed(0)
    model = causalclipseg.create_model(causalclipseg.DEFAULT_MODEL).eval()
    device = torch.device("cpu")
    got = evaluate_model(model, split_loader(model, datalist, "valid", batch_size=2, flip_tta=True), device,
                         flip_tta=True)
    expected, plain_scores = SegmentationScores(), SegmentationScores()
    with torch.no_grad():
        for plain, mirrored in zip(split_loader(model, datalist, "valid", batch_size=2),
                                   split_loader(model, datalist, "valid", batch_size=2, mirror=True)):
            p = torch.sigmoid(model(plain["image"], plain["text"]))
            q = torch.sigmoid(model(mirrored["image"], mirrored["text"])).flip(2 + LATERAL_AXIS)
            expected.update((p + q) / 2, plain["label"])
            plain_scores.update(p, plain["label"])
    np.testing.assert_allclose(got.rows, expected.rows, atol=1e-6)
    assert not np.allclose(got.rows, plain_scores.rows)  # the TTA changed the scores
    with pytest.raises(ValueError, match="flip_tta needs batches with 'mirrored_text'"):
        evaluate_model(model, split_loader(model, datalist, "valid"), device, flip_tta=True)


def test_flip_tta_refuses_sagittal_slices_in_one_line(tmp_path, capsys):
    """Mirroring a sagittal slice left-right would flip front and back: flip TTA refuses such a volume, naming it
    (predict: one error line, exit status 2); axial and coronal volumes are mirrored."""
    files, rng = tiny_checkpoint_and_picture(tmp_path, "unused.png")
    volumes = {}
    for plane, spacing in (("axial", (0.8, 0.8, 3.0)), ("coronal", (0.8, 3.0, 0.8)), ("sagittal", (3.0, 0.8, 0.8))):
        volumes[plane] = tmp_path / f"{plane}.nii.gz"
        nib.save(nib.Nifti1Image(rng.random((12, 10, 8)).astype(np.float32), np.diag([*spacing, 1.0])),
                 volumes[plane])
    predictor = Predictor(checkpoint=files["ckpt"], device="cpu", flip_tta=True)
    for plane in ("axial", "coronal"):
        assert predictor.predict(volumes[plane], PROMPT).probability.shape == (12, 10, 8)
    with pytest.raises(ValueError, match=r"sagittal\.nii\.gz is cut in sagittal slices .* segment it without flip"):
        predictor.predict(volumes["sagittal"], PROMPT)
    assert Predictor(checkpoint=files["ckpt"], device="cpu").predict(volumes["sagittal"], PROMPT).mask.shape == (
        12, 10, 8)  # without flip TTA it is segmented
    args = ["predict", str(volumes["sagittal"]), "--prompt", PROMPT, "--checkpoint", str(files["ckpt"]), "--device",
            "cpu", "--flip-tta", "--output-dir", str(tmp_path / "out")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is cut in sagittal slices" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "out" / "sagittal_mask.nii.gz").exists()
