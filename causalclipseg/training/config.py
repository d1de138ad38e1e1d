"""What a training run depends on (:class:`TrainConfig`, recorded as ``train_config.json``) and which of its fields a
resumed run may change. Free of torch, so that ``causalclipseg train --help`` answers at once; the engine is
:mod:`causalclipseg.training.trainer`.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

from ..registry import DEFAULT_MODEL

__all__ = ["RUNTIME_FIELDS", "TrainConfig", "config_changes"]


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as ``train_config.json`` (``RUN_FILE``) in the output folder,
    with ``world_size``."""

    data: str  # dataset root (SGSeg or LViT layout) or a MONAI datalist JSON
    output_dir: str  # checkpoints, best model, TensorBoard logs, history
    model: str = DEFAULT_MODEL  # variant from list_models()
    pretrained: str | None = None  # CLIP weights: open_clip tag or file; None trains from scratch
    init_checkpoint: str | None = None  # CausalCLIPSeg weights to start from (fine-tuning), applied after pretrained
    epochs: int = 30
    batch_size: int = 16  # per process under torch.distributed
    lr: float = 1e-3  # AdamW learning rate of the decoder, causal module and projectors
    encoder_lr_scale: float | None = None  # encoders' lr factor; None: 0.1 with pretrained weights, else 1.0
    weight_decay: float = 1e-4
    warmup_iterations: int = 200  # linear warm-up, then cosine decay to 0
    reversal_max: float = 0.5  # final gradient-reversal coefficient of the min-max game
    game: str = "reversal"  # how the min-max game is played: "reversal" or "uninformative" (model.config.GAMES)
    confounder_weight: float = 1.0  # weight of the confounder loss term
    lambda_dice: float = 0.5  # weight of Dice in the segmentation (and confounder) loss
    lambda_bce: float = 0.5  # weight of BCE in the segmentation (and confounder) loss
    train_split: str = "train"
    val_split: str = "valid"
    val_every: int = 1  # validate every N epochs (best model chosen on per-image Dice)
    checkpoint_every: int = 100  # also save the resumable state every N iterations
    max_train: int | None = None  # use only the first N training records (smoke runs)
    max_val: int | None = None  # use only the first N validation records
    augment: bool = True
    prompt_transform: str = "none"  # "empty" trains (and validates) without text: the text ablation
    prompt_side: str | None = None  # whose left the model learns "left" as: patient or viewer; None: as the data's
    # captions say (the init checkpoint's convention when fine-tuning). Captions are translated to it; the model
    # records it (model.prompt_side), and prediction translates users' prompts to it
    seed: int = 0
    num_workers: int = 0  # DataLoader workers; 0 is fastest on 2 cores with cached data
    cache: bool = True  # cache the deterministic loading transforms in memory
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:1" ...
    amp: bool = True  # mixed precision on CUDA (ignored on the CPU)
    progress: bool = True
    allow_config_change: bool = False  # resume a run whose train_config.json differs; the changes are logged


#: Fields that do not change what a run learns, so a resumed run may change them: where the run is written, how fast
#: and where it runs, how it reports, how often it saves (the per-sample and per-iteration seeding makes the result
#: independent of workers, caching and interruptions). ``device`` lets a run move between GPUs or machines; CPU and
#: CUDA kernels round differently and AMP runs only on CUDA, so such a run continues, it does not replay bit for bit.
RUNTIME_FIELDS = frozenset({"output_dir", "device", "num_workers", "cache", "progress", "checkpoint_every",
                            "allow_config_change"})


def config_changes(saved: dict[str, Any], config: TrainConfig, world_size: int = 1) -> dict[str, tuple[Any, Any]]:
    """How ``config``, run by ``world_size`` processes, differs from a saved run record (``train_config.json``).

    Args:
        saved: the saved record; a field it lacks (written before the field existed) counts as the field's default,
            a missing ``world_size`` as 1.
        config: the config asked for now.
        world_size: processes of the run asked for now (the effective batch and the data shards depend on it).

    Returns:
        ``{field: (saved value, asked value)}`` for every differing field outside :data:`RUNTIME_FIELDS`.
    """
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING} | {"world_size": 1}
    asked = {**asdict(config), "world_size": world_size}
    return {name: (saved.get(name, defaults.get(name)), value) for name, value in asked.items()
            if name not in RUNTIME_FIELDS and saved.get(name, defaults.get(name)) != value}
