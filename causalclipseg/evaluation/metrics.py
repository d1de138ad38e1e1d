"""Dice and IoU under both protocols of the text-guided segmentation literature, always named (docs/metrics.md).

``per_image``
    Dice and IoU computed on each image at threshold 0.5, then averaged over images. The protocol of LViT,
    CausalCLIPSeg and RecLMIS; their published QaTa-COV19 numbers use it.
``dataset_level``
    Intersections, prediction and label areas summed over the whole set, then one Dice and one IoU. The protocol
    of GuideDecoder (torchmetrics); it weighs large lesions more and reads 5-6 points higher on QaTa.

Empty masks (per image): when both the prediction and the ground truth are empty the image scores Dice = IoU = 1
(a correct "nothing here"); when only one of them is empty it scores 0. This is MONAI's ``compute_dice`` /
``compute_iou`` with ``ignore_empty=False``, which computes the per-image values here. The same rule applies to
the dataset level when the whole set is empty. Every QaTa-COV19 image has a lesion, so the rule only matters for
other data.

Predictions are binarised as ``pred > threshold`` (0.5 by default, as LViT does); labels as ``label > 0.5``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.metrics import compute_dice, compute_iou

__all__ = [
    "PROTOCOLS",
    "ProtocolScores",
    "ScoreInterval",
    "ScoresSummary",
    "SegmentationScores",
    "dataset_level_scores",
]

#: Protocol names, in the order they are reported.
PROTOCOLS = ("per_image", "dataset_level")

_CSV_COLUMNS = ("name", "intersection", "pred_sum", "label_sum", "dice", "iou")


def dataset_level_scores(intersection: np.ndarray, pred_sum: np.ndarray, label_sum: np.ndarray) -> tuple[float, float]:
    """Dice and IoU from per-image areas summed over the set (1.0 each when nothing is predicted nor labelled).

    Args:
        intersection: per-image foreground pixels shared by prediction and label, ``(N,)``.
        pred_sum: per-image predicted foreground pixels, ``(N,)``.
        label_sum: per-image labelled foreground pixels, ``(N,)``.
    """
    inter, pred, label = float(np.sum(intersection)), float(np.sum(pred_sum)), float(np.sum(label_sum))
    total, union = pred + label, pred + label - inter
    dice = 2.0 * inter / total if total > 0 else 1.0
    iou = inter / union if union > 0 else 1.0
    return dice, iou


@dataclass(frozen=True)
class ScoreInterval:
    """A score and its bootstrap confidence interval."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class ProtocolScores:
    """Dice and IoU under one protocol."""

    dice: ScoreInterval
    iou: ScoreInterval


@dataclass(frozen=True)
class ScoresSummary:
    """Both protocols over a set of images, with bootstrap intervals (images resampled with replacement).

    Attributes:
        n_images: images scored.
        per_image: mean of per-image Dice and IoU.
        dataset_level: Dice and IoU of the areas summed over the set.
        confidence: interval coverage, e.g. 0.95.
        n_resamples: bootstrap resamples.
        seed: bootstrap seed.
        threshold: prediction threshold.
    """

    n_images: int
    per_image: ProtocolScores
    dataset_level: ProtocolScores
    confidence: float
    n_resamples: int
    seed: int
    threshold: float

    def to_dict(self) -> dict[str, float]:
        """Flat ``{"per_image/dice": ..., "per_image/dice_low": ..., ...}`` for logs and JSON."""
        out: dict[str, float] = {"n_images": self.n_images}
        for protocol in PROTOCOLS:
            for metric, interval in asdict(getattr(self, protocol)).items():
                out[f"{protocol}/{metric}"] = interval["value"]
                out[f"{protocol}/{metric}_low"] = interval["low"]
                out[f"{protocol}/{metric}_high"] = interval["high"]
        return out

    def __str__(self) -> str:
        pct = round(100 * self.confidence)
        parts = [f"{p} Dice {getattr(self, p).dice.value:.4f} [{getattr(self, p).dice.low:.4f}, "
                 f"{getattr(self, p).dice.high:.4f}] IoU {getattr(self, p).iou.value:.4f} "
                 f"[{getattr(self, p).iou.low:.4f}, {getattr(self, p).iou.high:.4f}]" for p in PROTOCOLS]
        return f"{self.n_images} images, {pct}% bootstrap intervals: " + "; ".join(parts)


class SegmentationScores:
    """Accumulates per-image rows over batches and summarises them under both protocols.

    Rows hold, per image, the intersection, predicted and labelled areas (pixels) and the per-image Dice and IoU;
    both protocols and their bootstrap intervals follow from them without keeping any mask.

    Args:
        threshold: predictions above it are foreground; binary predictions pass unchanged.

    Images may carry a group (``groups`` of :meth:`update`, e.g. the caption's infection extent); :meth:`summary`
    then scores one group as it scores the whole set.

    Example:
        >>> scores = SegmentationScores()
        >>> scores.update(torch.sigmoid(logits), batch["label"], names=batch["name"])  # doctest: +SKIP
        >>> print(scores.summary())  # doctest: +SKIP
    """

    def __init__(self, threshold: float = 0.5) -> None:
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1) for probabilities, got {threshold}")
        self.threshold = float(threshold)
        self.reset()

    def reset(self) -> None:
        """Forget all rows."""
        self._rows: list[np.ndarray] = []  # each (B, 5): intersection, pred_sum, label_sum, dice, iou
        self._names: list[str | None] = []
        self._groups: list[str | None] = []

    def __len__(self) -> int:
        return len(self._names)

    def update(self, pred: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray,
               names: Sequence[str] | None = None, groups: Sequence[str] | None = None) -> np.ndarray:
        """Score one batch.

        Args:
            pred: probabilities in [0, 1] or binary predictions, ``(B, 1, H, W)`` (or more spatial axes).
            label: ground truth in {0, 1}, same shape.
            names: one name per image (file names), written by :meth:`to_csv`.
            groups: one group per image, for :meth:`summary` of a group and :meth:`to_csv`.

        Returns:
            the batch's per-image Dice, ``(B,)``.

        Raises:
            ValueError: if shapes differ, have no channel axis of size 1, or ``names`` or ``groups`` has the wrong
                length.
        """
        pred_t, label_t = torch.as_tensor(pred).detach(), torch.as_tensor(label).detach()
        if pred_t.shape != label_t.shape:
            raise ValueError(f"pred and label must have the same shape, got {tuple(pred_t.shape)} and "
                             f"{tuple(label_t.shape)}")
        if pred_t.ndim < 3 or pred_t.shape[1] != 1:
            raise ValueError(f"pred must be (B, 1, H, W) with one channel, got shape {tuple(pred_t.shape)}")
        for what, given in (("name", names), ("group", groups)):
            if given is not None and len(given) != pred_t.shape[0]:
                raise ValueError(f"{what}s must hold one {what} per image ({pred_t.shape[0]}), got {len(given)}")
        pred_b = (pred_t.float() > self.threshold).float()
        label_b = (label_t.float() > 0.5).float()
        spatial = tuple(range(1, pred_b.ndim))
        intersection = (pred_b * label_b).sum(dim=spatial)
        pred_sum, label_sum = pred_b.sum(dim=spatial), label_b.sum(dim=spatial)
        dice = compute_dice(pred_b, label_b, include_background=True, ignore_empty=False)[:, 0]
        iou = compute_iou(pred_b, label_b, include_background=True, ignore_empty=False)[:, 0]
        rows = torch.stack([intersection, pred_sum, label_sum, dice, iou], dim=1).cpu().double().numpy()
        self._rows.append(rows)
        self._names += list(names) if names is not None else [None] * len(rows)
        self._groups += [str(g) for g in groups] if groups is not None else [None] * len(rows)
        return rows[:, 3].copy()

    @property
    def rows(self) -> np.ndarray:
        """Per-image rows ``(N, 5)``: intersection, pred_sum, label_sum, dice, iou."""
        return np.concatenate(self._rows, axis=0) if self._rows else np.zeros((0, 5))

    @property
    def groups(self) -> list[str]:
        """The groups given to :meth:`update`, in the order first seen."""
        return list(dict.fromkeys(g for g in self._groups if g is not None))

    def summary(self, n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95,
                group: str | None = None) -> ScoresSummary:
        """Both protocols with percentile bootstrap intervals (images resampled with replacement).

        Args:
            n_resamples: bootstrap resamples; 0 gives intervals equal to the value.
            seed: seed of the resampling, for reproducible intervals.
            confidence: interval coverage.
            group: score only the images of this group (see :attr:`groups`); ``None``: all.

        Raises:
            ValueError: if nothing was scored (in ``group``), ``n_resamples`` is negative or ``confidence`` not in
                (0, 1).
        """
        rows = self.rows
        if group is not None:
            rows = rows[np.array([g == group for g in self._groups], dtype=bool)] if len(rows) else rows
            if len(rows) == 0:
                raise ValueError(f"no images scored in group {group!r} (groups: {', '.join(self.groups) or 'none'})")
        if len(rows) == 0:
            raise ValueError("no images scored: call update() before summary()")
        if n_resamples < 0:
            raise ValueError(f"n_resamples must be >= 0, got {n_resamples}")
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        n = len(rows)
        per_image = rows[:, 3].mean(), rows[:, 4].mean()
        dataset = dataset_level_scores(rows[:, 0], rows[:, 1], rows[:, 2])
        boot = np.empty((n_resamples, 4))
        rng = np.random.default_rng(seed)
        chunk = max(1, 2_000_000 // n)  # bound memory: chunk x n indices at a time
        for start in range(0, n_resamples, chunk):
            stop = min(n_resamples, start + chunk)
            sums = rows[rng.integers(0, n, size=(stop - start, n))].sum(axis=1)  # (k, 5) column sums per resample
            inter, pred, label = sums[:, 0], sums[:, 1], sums[:, 2]
            total, union = pred + label, pred + label - inter
            with np.errstate(divide="ignore", invalid="ignore"):
                boot[start:stop, 0] = sums[:, 3] / n
                boot[start:stop, 1] = sums[:, 4] / n
                boot[start:stop, 2] = np.where(total > 0, 2.0 * inter / total, 1.0)
                boot[start:stop, 3] = np.where(union > 0, inter / union, 1.0)
        alpha = (1.0 - confidence) / 2.0
        values = (*per_image, *dataset)
        if n_resamples:
            lows, highs = np.quantile(boot, alpha, axis=0), np.quantile(boot, 1.0 - alpha, axis=0)
        else:
            lows, highs = values, values
        intervals = [ScoreInterval(float(v), float(lo), float(hi)) for v, lo, hi in zip(values, lows, highs)]
        return ScoresSummary(
            n_images=n,
            per_image=ProtocolScores(dice=intervals[0], iou=intervals[1]),
            dataset_level=ProtocolScores(dice=intervals[2], iou=intervals[3]),
            confidence=confidence,
            n_resamples=n_resamples,
            seed=seed,
            threshold=self.threshold,
        )

    def to_csv(self, path: str | os.PathLike, names: Sequence[str] | None = None) -> None:
        """Write the per-image rows: ``name, intersection, pred_sum, label_sum, dice, iou``, and ``group`` where
        groups were given.

        Args:
            path: the CSV file (overwritten).
            names: one name per scored image; default the names given to :meth:`update`, else the row index.

        Raises:
            ValueError: if ``names`` does not hold one name per scored image.
        """
        rows = self.rows
        if names is None:
            names = [name if name is not None else str(i) for i, name in enumerate(self._names)]
        elif len(names) != len(rows):
            raise ValueError(f"names must hold one name per scored image ({len(rows)}), got {len(names)}")
        grouped = bool(self.groups)
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(_CSV_COLUMNS + (("group",) if grouped else ()))
            for name, row, group in zip(names, rows, self._groups):
                cells = [name, int(row[0]), int(row[1]), int(row[2]), f"{row[3]:.6f}", f"{row[4]:.6f}"]
                writer.writerow(cells + ([group or ""] if grouped else []))
