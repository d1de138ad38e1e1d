"""Score a model on a dataset split under both metric protocols; measure what the causal masks do.

The one home of evaluation: ``causalclipseg evaluate``, validation during training, the bundle's ``evaluate.json``,
the comparison arms and MONAI Label's held-out check all score through :func:`evaluate_model` (and read a split
through :func:`split_loader`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.data import DataLoader, Dataset
from torch import nn
from tqdm import tqdm

from ..data.datasets import read_dataset
from ..data.pipelines import get_val_transforms
from ..data.prompts import infection_extent
from ..factory import DEFAULT_MODEL
from ..inference.predictor import load_trained_model
from ..inference.tta import MirrorAveraged
from ..io.writers import atomic_write
from .metrics import SegmentationScores

__all__ = ["CausalStatistics", "causal_statistics", "evaluate_checkpoint", "evaluate_model", "split_loader"]

logger = logging.getLogger(__name__)


def split_loader(model: nn.Module, data: str | os.PathLike, split: str, batch_size: int = 16,
                 max_images: int | None = None, prompt_transform: str = "none", mirror: bool = False,
                 num_workers: int = 0, flip_tta: bool = False) -> DataLoader:
    """A dataset split's records for ``model``: captions read in the convention the model learned, images through
    the validation transforms of training (with a prompt transform, or mirrored with their prompts' sides swapped;
    with ``flip_tta`` also the mirrored prompts' token ids that :func:`evaluate_model` then needs).
    Each record carries its caption's ``extent`` (:func:`~causalclipseg.data.prompts.infection_extent`, read before
    any prompt transform), by which :func:`evaluate_model` groups its scores.

    Raises:
        FileNotFoundError: if the dataset is missing.
        ValueError: for an unusable dataset, a split without records or an unknown prompt transform.
    """
    records = [{**record, "extent": infection_extent(record["prompt"])}
               for record in read_dataset(data, split, prompt_side=model.prompt_side)[:max_images]]
    if not records:
        raise ValueError(f"dataset {data} has no {split!r} records to evaluate")
    transforms = get_val_transforms(model.config.image_size, model.tokenizer.context_length, prompt_transform,
                                    mirror=mirror, mirrored_text=flip_tta)
    return DataLoader(Dataset(records, transforms), batch_size=batch_size, num_workers=num_workers)


def _names(batch: dict, size: int) -> list[str]:
    """File names of a batch's images, from MONAI's metadata when present."""
    meta = getattr(batch["image"], "meta", {})
    files = meta.get("filename_or_obj") if isinstance(meta, dict) else None
    return [Path(str(f)).name for f in files] if files is not None else [""] * size


@torch.no_grad()
def evaluate_model(model: nn.Module, loader: DataLoader, device: torch.device,
                   progress: bool = False, flip_tta: bool = False) -> SegmentationScores:
    """Score ``model`` (``forward(image, text) -> logits``) on batches with ``image``, ``text`` and ``label``.

    With ``flip_tta`` each prediction is averaged with the one on the mirrored image under the mirrored prompt
    (:class:`~causalclipseg.inference.tta.MirrorAveraged`), whose token ids the batches then hold as
    ``mirrored_text`` (:func:`split_loader` with ``flip_tta``).

    Returns:
        a filled :class:`~causalclipseg.evaluation.metrics.SegmentationScores` (per-image rows named by file, grouped
        by the batches' ``extent`` where they have one, as :func:`split_loader`'s do).

    Raises:
        ValueError: with ``flip_tta``, for batches without ``mirrored_text``.
    """
    model.eval()
    network, text_keys = (MirrorAveraged(model), ("text", "mirrored_text")) if flip_tta else (model, ("text",))
    scores = SegmentationScores()
    for batch in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
        if not set(text_keys) <= set(batch):
            raise ValueError("flip_tta needs batches with 'mirrored_text' (split_loader(..., flip_tta=True) makes "
                             "them)")
        logits = network(batch["image"].to(device), *(batch[key].to(device) for key in text_keys))
        scores.update(torch.sigmoid(logits).float().cpu(), batch["label"], names=_names(batch, len(logits)),
                      groups=batch.get("extent"))
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


def evaluate_checkpoint(checkpoint: str | os.PathLike, dataset_dir: str | os.PathLike, split: str = "test",
                        output_dir: str | os.PathLike | None = None, model_name: str = DEFAULT_MODEL,
                        batch_size: int = 16, max_images: int | None = None, device: str | torch.device = "auto",
                        num_workers: int = 0, n_resamples: int = 1000, flip_tta: bool = False) -> dict[str, float]:
    """Score weights on a dataset split under both metric protocols with the package's evaluation: ``evaluate.json``'s
    ``run``, and MONAI Label's comparison of served and fine-tuned weights on held-out pairs.

    The split is read by :func:`split_loader`, and :func:`~causalclipseg.evaluation.evaluate.evaluate_model` scores them
    (:class:`~causalclipseg.evaluation.metrics.SegmentationScores`: threshold 0.5, the one empty-mask rule). The
    summary is logged; with ``output_dir``, ``metrics.json`` (both protocols, bootstrap intervals) and the per-image
    ``scores.csv`` are written there.

    Args:
        checkpoint: CausalCLIPSeg weights (``models/model.pt``, a run's ``best_model.pt``).
        dataset_dir: a dataset root or a MONAI datalist JSON (any layout :func:`~causalclipseg.data.datasets.
            read_dataset` reads).
        split: ``train``, ``valid`` or ``test``.
        output_dir: where to write the files; ``None`` to only log.
        model_name: the weights' variant.
        batch_size: images per forward pass.
        max_images: score only the first N images.
        device: ``auto``, ``cpu``, ``cuda`` ... or a ``torch.device``.
        num_workers: data-loader worker processes.
        n_resamples: bootstrap resamples for the intervals (0: none).
        flip_tta: average each prediction with the one on the mirrored image under the mirrored prompt
            (:class:`~causalclipseg.inference.tta.MirrorAveraged`).

    Returns:
        the flat summary (``per_image/dice``, ``dataset_level/dice``, ... and ``n_images``).

    Raises:
        FileNotFoundError: if the checkpoint or the dataset is missing.
        ValueError: for an unusable checkpoint, device or dataset, or a split without records.
    """
    model = load_trained_model(model_name, checkpoint, device=str(device))
    loader = split_loader(model, dataset_dir, split, batch_size, max_images, num_workers=num_workers,
                          flip_tta=flip_tta)
    scores = evaluate_model(model, loader, next(model.parameters()).device, flip_tta=flip_tta)
    summary = scores.summary(n_resamples=n_resamples)
    logger.info("evaluation of %s on the %s split of %s: %s", checkpoint, split, dataset_dir, summary)
    if output_dir is not None:
        out = Path(output_dir)
        atomic_write(out / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(summary.to_dict(), indent=2)))
        atomic_write(out / "scores.csv", scores.to_csv)
    return summary.to_dict()
