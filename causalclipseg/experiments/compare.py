"""Side-by-side comparison on the same data and budget: CausalCLIPSeg, without the causal module, trained and
validated without text, a vision-only MONAI U-Net of similar cost, and variants of the min-max game
(``causalclipseg compare``).

Every arm is one :func:`~causalclipseg.training.trainer.train` run with the same data, epochs, batch size,
learning rate, schedule, augmentation and seed; only the model or the prompt differs. Each run keeps its best
epoch by validation per-image Dice, exactly as a normal training run does, and its validation summary (both
protocols, bootstrap 95% intervals) is the arm's result, with two measurements of its best model on the same
validation records (``<run>/extra_metrics.json``, computed once): the per-image Dice on mirrored images with the
prompts' sides swapped (``mirrored/per_image/dice``: equal to the plain one for a model that learned its flip
augmentation), and what the causal masks do (``causal/...``, :class:`~causalclipseg.evaluation.evaluate.
CausalStatistics`). Runs live in ``<output_dir>/<arm>_seed<N>`` and resume, so an interrupted comparison continues
where it stopped.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import DataLoader

from ..evaluation.evaluate import causal_statistics, evaluate_model, split_loader
from ..factory import resolve_device
from ..inference.predictor import load_trained_model
from ..training.trainer import TrainConfig, train
from .arms import ARMS, Arm

__all__ = ["ARMS", "Arm", "compare", "format_table"]


_METRICS = ("per_image/dice", "per_image/iou", "dataset_level/dice", "dataset_level/iou")
#: measured on each run's best model (``_extra_metrics``); the causal ones only for arms with the causal module
_EXTRA = ("mirrored/per_image/dice", "causal/mask_mean", "causal/lesion_to_background", "causal/confounder_dice")


def _arm_config(base: TrainConfig, name: str, seed: int) -> TrainConfig:
    arm = ARMS[name]
    return replace(base, output_dir=str(Path(base.output_dir) / f"{name}_seed{seed}"), model=arm.model,
                   prompt_transform=arm.prompt_transform, seed=seed, game=arm.game)


def _history(out: Path) -> list[dict[str, Any]]:
    """A run's validations, one per line of its ``history.jsonl`` (none before its first)."""
    history = out / "history.jsonl"
    return [json.loads(line) for line in history.read_text().splitlines() if line.strip()] if history.exists() else []


def _finished(cfg: TrainConfig) -> bool:
    """Whether the run in ``cfg.output_dir`` has trained all its epochs: the trainer validates after the last
    epoch, so its history then ends at ``cfg.epochs`` (and its first validation wrote ``best_metrics.json``)."""
    history = _history(Path(cfg.output_dir))
    return bool(history) and history[-1]["epoch"] >= cfg.epochs


def _train_seconds(out: Path) -> float:
    """A run's training and validation time over all its processes: its last validation's ``seconds``, when every
    validation recorded them. A run that predates that record, in part or in whole (resumed from a checkpoint without
    the clock, whose ``seconds`` then count only the processes after it), has ``train_seconds.json``, written when a
    ``compare`` process finished it or rebuilt from its logs.

    Raises:
        ValueError: if neither holds the run's time.
    """
    history = _history(out)
    if history and all("seconds" in line for line in history):
        return float(history[-1]["seconds"])
    legacy = out / "train_seconds.json"
    if not legacy.exists():
        raise ValueError(f"{out / 'history.jsonl'} does not record the seconds of every epoch (a run resumed from a "
                         f"checkpoint without the clock) and there is no {legacy}: write its time there as "
                         f"{{\"seconds\": ...}}")
    return float(json.loads(legacy.read_text())["seconds"])


def _run_arm(base: TrainConfig, name: str, seed: int, train_runs: bool = True) -> dict[str, Any]:
    arm = ARMS[name]
    cfg = _arm_config(base, name, seed)
    out = Path(cfg.output_dir)
    # without train_runs, a finished run (checked by compare) is read back
    best = train(cfg) if train_runs else json.loads((out / "best_metrics.json").read_text())
    seconds = _train_seconds(out)
    return {"arm": name, "seed": seed, "model": arm.model, "prompt_transform": arm.prompt_transform,
            "game": arm.game, **best, "train_seconds": round(seconds, 1), **_extra_metrics(cfg, best["epoch"])}


def _extra_metrics(cfg: TrainConfig, epoch: int) -> dict[str, float]:
    """Mirrored-input per-image Dice and causal-mask statistics of a run's best model on its validation records,
    cached in ``<run>/extra_metrics.json`` for that best epoch."""
    out = Path(cfg.output_dir)
    cache = out / "extra_metrics.json"
    if cache.exists() and json.loads(cache.read_text()).get("epoch") == epoch:
        return {k: v for k, v in json.loads(cache.read_text()).items() if k != "epoch"}
    model = load_trained_model(cfg.model, out / "best_model.pt", device=cfg.device)
    device = resolve_device(cfg.device)

    def loader(mirror: bool) -> DataLoader:
        return split_loader(model, cfg.data, cfg.val_split, cfg.batch_size, cfg.max_val, cfg.prompt_transform,
                            mirror=mirror, num_workers=cfg.num_workers)

    mirrored = evaluate_model(model, loader(True), device).summary(n_resamples=0)
    extra = {"mirrored/per_image/dice": mirrored.per_image.dice.value,
             "mirrored/dataset_level/dice": mirrored.dataset_level.dice.value}
    causal = causal_statistics(model, loader(False), device)
    extra.update(causal.to_dict() if causal is not None else {})
    cache.write_text(json.dumps({"epoch": epoch, **extra}, indent=2))
    return extra


def compare(base: TrainConfig, arms: list[str], seeds: list[int], train_runs: bool = True) -> dict[str, Any]:
    """Train and validate every arm for every seed; write ``comparison.json`` and ``comparison.md``.

    Args:
        base: the shared settings (data, epochs, batch size, lr, ...); its ``model``, ``prompt_transform``
            and ``seed`` are set per arm and seed, its ``output_dir`` is the comparison's folder.
        arms: names from :data:`ARMS`.
        seeds: one run per arm and seed.
        train_runs: if false, only tabulate: every run must have finished ``base.epochs`` epochs already (e.g.
            trained by other processes), and none is trained or resumed.

    Returns:
        ``{"settings": ..., "runs": [...], "summary": {arm: {metric: {"mean", "std", "n"}}}}``.

    Raises:
        ValueError: for an unknown arm or no seeds; without ``train_runs``, if a run has not finished (all such
            runs named).
    """
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise ValueError(f"arms must be a non-empty selection of {sorted(ARMS)}, got {arms}")
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    if not train_runs:
        unfinished = [f"{arm}_seed{seed}" for arm in arms for seed in seeds
                      if not _finished(_arm_config(base, arm, seed))]
        if unfinished:
            raise ValueError(f"not finished ({base.epochs} epochs) in {base.output_dir}: {', '.join(unfinished)}; "
                             "train them first (compare without --no-train)")
    out = Path(base.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [_run_arm(base, arm, seed, train_runs) for arm in arms for seed in seeds]
    summary = {}
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm]
        measured = [m for m in (*_METRICS, *_EXTRA, "train_seconds") if all(m in r for r in mine)]
        summary[arm] = {m: {"mean": float(np.mean([r[m] for r in mine])),
                            "std": float(np.std([r[m] for r in mine], ddof=1)) if len(mine) > 1 else 0.0,
                            "n": len(mine)} for m in measured}
    settings = {k: v for k, v in asdict(base).items() if k not in ("model", "prompt_transform", "seed")}
    result = {"settings": settings, "seeds": seeds, "runs": runs, "summary": summary}
    (out / "comparison.json").write_text(json.dumps(result, indent=2))
    (out / "comparison.md").write_text(format_table(result) + "\n")
    return result


def format_table(result: dict[str, Any]) -> str:
    """Markdown table: one row per arm; a single seed shows the value with its bootstrap 95% interval,
    several seeds show mean +/- std over seeds; then the best models' mirrored Dice and causal-mask measurements
    (- for arms without the causal module)."""
    several = len(result["seeds"]) > 1
    header = ("| arm | per-image Dice | per-image IoU | dataset-level Dice | dataset-level IoU "
              "| mirrored per-image Dice | mask mean | lesion/background kept | confounder Dice | best epoch "
              "| train time |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for arm, stats in result["summary"].items():
        mine = [r for r in result["runs"] if r["arm"] == arm]
        if several:
            cells = [f"{stats[m]['mean']:.4f} +/- {stats[m]['std']:.4f}" for m in _METRICS]
        else:
            r = mine[0]
            cells = [f"{r[m]:.4f} [{r[m + '_low']:.4f}, {r[m + '_high']:.4f}]" for m in _METRICS]
        for m in _EXTRA:
            if m not in stats:
                cells.append("-")
            else:
                cells.append(f"{stats[m]['mean']:.4f}" + (f" +/- {stats[m]['std']:.4f}" if several else ""))
        epochs = ", ".join(str(r["epoch"]) for r in mine)
        minutes = stats["train_seconds"]["mean"] / 60
        rows.append(f"| {ARMS[arm].label} | " + " | ".join(cells) + f" | {epochs} | {minutes:.1f} min |")
    return "\n".join([header, *rows])
