"""Dice and IoU under both protocols against numbers computed by hand on small masks; empty-mask convention;
bootstrap intervals; the per-image CSV."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from causalclipseg.evaluation.metrics import PROTOCOLS, SegmentationScores, dataset_level_scores


def _mask(*pixels: tuple[int, int], size: int = 4) -> torch.Tensor:
    m = torch.zeros(1, size, size)
    for r, c in pixels:
        m[0, r, c] = 1.0
    return m


def _hand_made() -> tuple[torch.Tensor, torch.Tensor]:
    """Four 4x4 images (B, 1, 4, 4).

    A: pred 4 px, label 4 px, overlap 2 -> Dice 2*2/8 = 0.5,     IoU 2/6 = 1/3
    B: pred 8 px, label 4 px, overlap 4 -> Dice 2*4/12 = 2/3,    IoU 4/8 = 1/2
    C: both empty                       -> Dice 1,               IoU 1      (the convention)
    D: pred 2 px, label empty           -> Dice 0,               IoU 0
    Dataset level: I = 6, P = 14, L = 8 -> Dice 12/22 = 6/11,    IoU 6/(22-6) = 3/8
    """
    pred_a, label_a = _mask((0, 0), (0, 1), (1, 0), (1, 1)), _mask((0, 0), (0, 1), (2, 2), (3, 3))
    pred_b = _mask(*[(r, c) for r in range(2) for c in range(4)])
    label_b = _mask((0, 0), (0, 1), (1, 2), (1, 3))
    pred_c, label_c = _mask(), _mask()
    pred_d, label_d = _mask((3, 3), (2, 3)), _mask()
    return torch.stack([pred_a, pred_b, pred_c, pred_d]), torch.stack([label_a, label_b, label_c, label_d])


PER_IMAGE_DICE = (0.5 + 2 / 3 + 1 + 0) / 4
PER_IMAGE_IOU = (1 / 3 + 1 / 2 + 1 + 0) / 4
DATASET_DICE = 6 / 11
DATASET_IOU = 3 / 8


def test_both_protocols_match_hand_computed_values():
    pred, label = _hand_made()
    scores = SegmentationScores()
    dice = scores.update(pred, label, names=["a", "b", "c", "d"])
    np.testing.assert_allclose(dice, [0.5, 2 / 3, 1.0, 0.0])
    np.testing.assert_allclose(scores.rows, [[2, 4, 4, 0.5, 1 / 3], [4, 8, 4, 2 / 3, 0.5], [0, 0, 0, 1, 1],
                                             [0, 2, 0, 0, 0]])
    summary = scores.summary(n_resamples=200, seed=0)
    assert summary.n_images == 4 and PROTOCOLS == ("per_image", "dataset_level")
    assert summary.per_image.dice.value == pytest.approx(PER_IMAGE_DICE)
    assert summary.per_image.iou.value == pytest.approx(PER_IMAGE_IOU)
    assert summary.dataset_level.dice.value == pytest.approx(DATASET_DICE)
    assert summary.dataset_level.iou.value == pytest.approx(DATASET_IOU)
    flat = summary.to_dict()
    assert flat["per_image/dice"] == pytest.approx(0.5416667, abs=1e-6)
    assert flat["dataset_level/iou"] == pytest.approx(0.375)
    assert "per_image Dice 0.5417" in str(summary) and "dataset_level Dice 0.5455" in str(summary)


def test_probabilities_thresholded_strictly_above_half_and_batches_accumulate():
    pred, label = _hand_made()
    probabilities = pred * 0.7 + (1 - pred) * torch.tensor([0.0, 0.3, 0.5])[torch.randint(0, 3, pred.shape)]
    split_scores = SegmentationScores()
    split_scores.update(probabilities[:1], label[:1])
    split_scores.update(probabilities[1:].numpy(), label[1:].numpy())
    np.testing.assert_allclose(split_scores.rows[:, 3], [0.5, 2 / 3, 1.0, 0.0])  # 0.5 is background
    assert split_scores.summary(0).dataset_level.dice.value == pytest.approx(DATASET_DICE)
    # labels stored as 0/255 are binarised too
    assert SegmentationScores().update(pred, label * 255).tolist() == pytest.approx([0.5, 2 / 3, 1.0, 0.0])


def test_dataset_level_helper_and_empty_set_convention():
    dice, iou = dataset_level_scores(np.array([2, 4]), np.array([4, 8]), np.array([4, 4]))  # I 6, P 12, L 8
    assert (dice, iou) == pytest.approx((12 / 20, 6 / 14))
    assert dataset_level_scores(np.zeros(3), np.zeros(3), np.zeros(3)) == (1.0, 1.0)


def test_bootstrap_interval_contains_value_and_is_seeded():
    rng = np.random.default_rng(1)
    label = torch.from_numpy(rng.random((30, 1, 8, 8)) > 0.5).float()
    pred = torch.from_numpy(rng.random((30, 1, 8, 8))).float()
    scores = SegmentationScores()
    scores.update(pred, label)
    a, b, c = scores.summary(seed=7), scores.summary(seed=7), scores.summary(seed=8)
    assert a == b and a.n_resamples == 1000 and a.confidence == 0.95
    assert a.per_image.dice.low != c.per_image.dice.low
    for protocol in PROTOCOLS:
        for metric in ("dice", "iou"):
            interval = getattr(getattr(a, protocol), metric)
            assert interval.low < interval.value < interval.high
            assert interval.high - interval.low < 0.2
    per_image = scores.rows[:, 3]
    assert per_image.min() <= a.per_image.dice.low and a.per_image.dice.high <= per_image.max()
    # identical images: every resample gives the same value
    same = SegmentationScores()
    same.update(pred[:1].repeat(5, 1, 1, 1), label[:1].repeat(5, 1, 1, 1))
    s = same.summary(n_resamples=50)
    assert s.per_image.dice.low == pytest.approx(s.per_image.dice.value) == pytest.approx(s.per_image.dice.high)
    none = scores.summary(n_resamples=0)
    assert none.dataset_level.iou.low == none.dataset_level.iou.value == none.dataset_level.iou.high


def test_to_csv_writes_per_image_rows(tmp_path):
    pred, label = _hand_made()
    scores = SegmentationScores()
    scores.update(pred[:2], label[:2], names=["a.png", "b.png"])
    scores.update(pred[2:], label[2:])
    scores.to_csv(tmp_path / "default.csv")
    with open(tmp_path / "default.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["name", "intersection", "pred_sum", "label_sum", "dice", "iou"]
    assert rows[1] == ["a.png", "2", "4", "4", "0.500000", "0.333333"]
    assert [r[0] for r in rows[1:]] == ["a.png", "b.png", "2", "3"]
    assert rows[4] == ["3", "0", "2", "0", "0.000000", "0.000000"]
    scores.to_csv(tmp_path / "named.csv", names=["w", "x", "y", "z"])
    with open(tmp_path / "named.csv", newline="") as f:
        assert [r[0] for r in csv.reader(f)][1:] == ["w", "x", "y", "z"]
    with pytest.raises(ValueError, match=r"names must hold one name per scored image \(4\), got 2"):
        scores.to_csv(tmp_path / "bad.csv", names=["w", "x"])


def test_input_validation():
    scores = SegmentationScores()
    with pytest.raises(ValueError, match="no images scored"):
        scores.summary()
    with pytest.raises(ValueError, match=r"same shape, got \(2, 1, 4, 4\) and \(2, 1, 4, 3\)"):
        scores.update(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 3))
    with pytest.raises(ValueError, match=r"one channel, got shape \(2, 3, 4, 4\)"):
        scores.update(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"one name per image \(2\), got 1"):
        scores.update(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), names=["a"])
    with pytest.raises(ValueError, match="threshold must be in"):
        SegmentationScores(threshold=1.5)
    scores.update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="confidence must be in"):
        scores.summary(confidence=95)
    assert len(scores) == 1
    scores.reset()
    assert len(scores) == 0


def test_a_group_is_scored_as_its_images_alone(tmp_path):
    """``summary(group=...)`` equals the summary of a scorer fed only that group's images; the CSV says each image's
    group; groups must match the batch."""
    pred, label = _hand_made()
    scores, alone = SegmentationScores(), SegmentationScores()
    groups = ["unilateral", "bilateral", "unilateral", "unstated"]
    scores.update(pred[:2], label[:2], names=["a", "b"], groups=groups[:2])
    scores.update(pred[2:], label[2:], names=["c", "d"], groups=groups[2:])
    assert scores.groups == ["unilateral", "bilateral", "unstated"]
    alone.update(pred[[0, 2]], label[[0, 2]])
    assert scores.summary(n_resamples=40, group="unilateral") == alone.summary(n_resamples=40)
    assert scores.summary(n_resamples=0, group="bilateral").n_images == 1
    assert scores.summary(n_resamples=0).n_images == 4  # all, whatever their group
    with pytest.raises(ValueError, match=r"no images scored in group .both. \(groups: unilateral, bilateral, unstated"):
        scores.summary(group="both")
    with pytest.raises(ValueError, match=r"groups must hold one group per image \(2\), got 1"):
        scores.update(pred[:2], label[:2], groups=["unilateral"])
    scores.to_csv(tmp_path / "rows.csv")
    with open(tmp_path / "rows.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][-1] == "group" and [r[-1] for r in rows[1:]] == groups
