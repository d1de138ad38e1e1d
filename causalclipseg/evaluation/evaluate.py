"""Run a model over a loader and score it under both metric protocols; measure what the causal masks do."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .metrics import SegmentationScores

__all__ = ["CausalStatistics", "causal_statistics", "evaluate_model"]


def _names(batch: dict, size: int) -> list[str]:
    """File names of a batch's images, from MONAI's metadata when present."""
    meta = getattr(batch["image"], "meta", {})
    files = meta.get("filename_or_obj") if isinstance(meta, dict) else None
    return [Path(str(f)).name for f in files] if files is not None else [""] * size


@torch.no_grad()
def evaluate_model(model: nn.Module, loader: DataLoader, device: torch.device,
                   progress: bool = False) -> SegmentationScores:
    """Score ``model`` (``forward(image, text) -> logits``) on batches with ``image``, ``text`` and ``label``.

    Returns:
        a filled :class:`~causalclipseg.evaluation.metrics.SegmentationScores` (per-image rows named by file).
    """
    model.eval()
    scores = SegmentationScores()
    for batch in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
        logits = model(batch["image"].to(device), batch["text"].to(device))
        scores.update(torch.sigmoid(logits).float().cpu(), batch["label"], names=_names(batch, len(logits)))
    return scores


@dataclass
class CausalStatistics:
    """What the causal intervention's masks do on a dataset (issue: does the min-max game separate lesion from
    context?). Masks are averaged over their channels and brought to the label's size per level, then over levels.

    Attributes:
        mask_mean: mean of the causal masks (1 passes everything to the causal side, 0.5 is undecided).
        lesion_kept: mean mask value over lesion pixels.
        background_kept: mean mask value over background pixels.
        lesion_to_background: ``lesion_kept / background_kept``; above 1 the masks keep lesion more than context.
        confounder_dice: per-image Dice of the confounder head's prediction (near chance when the game works:
            nothing left in the confounding parts to find the lesion with).
        confounder_dataset_dice: the same, dataset-level.
    """

    mask_mean: float
    lesion_kept: float
    background_kept: float
    lesion_to_background: float
    confounder_dice: float
    confounder_dataset_dice: float

    def to_dict(self) -> dict[str, float]:
        """Plain dict with ``causal/`` keys, for JSON summaries beside the Dice scores."""
        return {f"causal/{k}": v for k, v in asdict(self).items()}


@torch.no_grad()
def causal_statistics(model: nn.Module, loader: DataLoader, device: torch.device,
                      progress: bool = False) -> CausalStatistics | None:
    """:class:`CausalStatistics` of ``model`` (``forward_aux``) on batches with ``image``, ``text`` and ``label``;
    ``None`` for a model without the causal module."""
    model.eval()
    # sums and counts: all mask values, mask values over lesion pixels, over background pixels
    totals = torch.zeros(6, dtype=torch.float64)
    scores = SegmentationScores()
    for batch in tqdm(loader, desc="causal masks", disable=not progress, leave=False):
        output = model.forward_aux(batch["image"].to(device), batch["text"].to(device), reversal=0.0)
        if output.confounder_logits is None:
            return None
        label = batch["label"].float()  # (B, 1, H, W)
        per_level = [F.interpolate(m.float().mean(1, keepdim=True), size=label.shape[-2:], mode="bilinear",
                                   align_corners=False).cpu() for m in output.masks]  # [(B, 1, H, W)]
        mask = torch.stack(per_level).mean(0)  # (B, 1, H, W)
        lesion = label > 0.5
        totals += torch.tensor([sum(float(m.float().sum()) for m in output.masks),
                                sum(m.numel() for m in output.masks),
                                float(mask[lesion].sum()), float(lesion.sum()),
                                float(mask[~lesion].sum()), float((~lesion).sum())], dtype=torch.float64)
        scores.update(torch.sigmoid(output.confounder_logits).float().cpu(), label)
    if not len(scores):
        raise ValueError("causal_statistics needs at least one batch")
    mask_mean, lesion_kept, background_kept = (float(totals[i] / max(1.0, float(totals[i + 1]))) for i in (0, 2, 4))
    summary = scores.summary(n_resamples=0)
    return CausalStatistics(mask_mean=mask_mean, lesion_kept=lesion_kept, background_kept=background_kept,
                            lesion_to_background=lesion_kept / max(background_kept, 1e-12),
                            confounder_dice=summary.per_image.dice.value,
                            confounder_dataset_dice=summary.dataset_level.dice.value)
