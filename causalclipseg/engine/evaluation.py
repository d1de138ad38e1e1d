"""Run a model over a loader and score it under both metric protocols."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..metrics import SegmentationScores

__all__ = ["evaluate_model"]


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
        a filled :class:`~causalclipseg.metrics.SegmentationScores` (per-image rows named by file).
    """
    model.eval()
    scores = SegmentationScores()
    for batch in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
        logits = model(batch["image"].to(device), batch["text"].to(device))
        scores.update(torch.sigmoid(logits).float().cpu(), batch["label"], names=_names(batch, len(logits)))
    return scores
