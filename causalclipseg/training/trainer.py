"""Training engine: the min-max step on ignite, validation, atomic checkpoints and exact resume.

One training step (``_TrainStep``): ``model.forward_aux`` with the gradient-reversal coefficient of the
current iteration, :class:`~causalclipseg.training.losses.CausalSegLoss`, one backward pass, one optimiser and
scheduler step (AMP on CUDA). The coefficient follows the DANN ramp ``r_max * (2 / (1 + exp(-10 p)) - 1)``
over training progress ``p``, so the confounder head learns before the trunk starts to fight it.

Resume: the whole state (model, optimiser, scheduler, AMP scaler, ignite trainer state, RNG states,
best score) is written atomically every ``checkpoint_every`` iterations and at every epoch end. ignite's
``DeterministicEngine`` reseeds the data order per epoch and fast-forwards to the saved iteration, the
augmentation is seeded per (epoch, sample), and the global torch RNG (dropout) is reseeded per iteration.
So a run killed at any point and resumed from its last checkpoint, mid-epoch or at an epoch end, ends
bit-identical to an uninterrupted one on the CPU (tested with SIGKILL).
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.engine.deterministic import DeterministicEngine
from ignite.handlers import Checkpoint, DiskSaver, ProgressBar
from monai.data import CacheDataset, DataLoader
from torch.utils.data.distributed import DistributedSampler
from torch.utils.tensorboard import SummaryWriter

from ..data.datasets import dataset_prompt_side, read_dataset
from ..data.pipelines import get_train_transforms, get_val_transforms
from ..data.prompts import check_prompt_side
from ..evaluation.evaluate import evaluate_model
from ..factory import create_model, resolve_device
from ..model.causalclipseg import GAMES
from .checkpoint import save_weights
from .losses import CausalSegLoss

logger = logging.getLogger(__name__)

__all__ = ["TrainConfig", "train", "reversal_coefficient", "param_groups"]


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as ``train_config.json`` in the output folder."""

    data: str  # dataset root (SGSeg or LViT layout) or a MONAI datalist JSON
    output_dir: str  # checkpoints, best model, TensorBoard logs, history
    model: str = "tiny"  # variant from list_models()
    pretrained: str | None = None  # CLIP weights: open_clip tag or file; None trains from scratch
    init_checkpoint: str | None = None  # CausalCLIPSeg weights to start from (fine-tuning), applied after pretrained
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3  # AdamW learning rate of the decoder, causal module and projectors
    encoder_lr_scale: float | None = None  # encoders' lr factor; None: 0.1 with pretrained weights, else 1.0
    weight_decay: float = 1e-4
    warmup_iterations: int = 200  # linear warm-up, then cosine decay to 0
    reversal_max: float = 0.5  # final gradient-reversal coefficient of the min-max game
    game: str = "reversal"  # how the min-max game is played: "reversal" or "uninformative" (model.causalclipseg.GAMES)
    confounder_weight: float = 1.0  # weight of the confounder loss term
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


def reversal_coefficient(progress: float, maximum: float) -> float:
    """DANN ramp from 0 to ``maximum`` over training progress in [0, 1]."""
    return maximum * (2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0)


class _TrainerState:
    """The trainer's state for checkpoints, with its RNG states as tensors so that ``weights_only`` loading works.

    ignite's ``DeterministicEngine`` stores ``[python, torch, numpy]`` RNG states; the Python and NumPy
    ones are converted to int64 tensors here and back on load.
    """

    def __init__(self, trainer: Engine) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        state = dict(self.trainer.state_dict())
        (py_version, py_keys, py_gauss), torch_state, np_state = state.pop("rng_states")
        state["rng"] = {"python_version": py_version, "python_keys": torch.tensor(py_keys, dtype=torch.int64),
                        "python_gauss": py_gauss, "torch": torch_state,
                        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2])}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        rng = state.pop("rng")
        state["rng_states"] = [
            (int(rng["python_version"]), tuple(int(k) for k in rng["python_keys"]), rng["python_gauss"]),
            rng["torch"],
            ("MT19937", rng["numpy_keys"].numpy().astype(np.uint32), int(rng["numpy_pos"]), 0, 0.0),
        ]
        self.trainer.load_state_dict(state)


class _Best:
    """Best validation score so far (checkpointed, so a resumed run keeps selecting correctly)."""

    def __init__(self) -> None:
        self.dice = -1.0
        self.epoch = 0

    def state_dict(self) -> dict[str, Any]:
        return {"dice": self.dice, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dice, self.epoch = float(state["dice"]), int(state["epoch"])


def param_groups(model: torch.nn.Module, lr: float, encoder_scale: float, weight_decay: float) -> list[dict]:
    encoder_ids = {id(p) for module in model.encoder_modules() for p in module.parameters()}
    encoders = [p for p in model.parameters() if id(p) in encoder_ids]
    rest = [p for p in model.parameters() if id(p) not in encoder_ids]
    return [{"params": encoders, "lr": lr * encoder_scale, "weight_decay": weight_decay},
            {"params": rest, "lr": lr, "weight_decay": weight_decay}]


class _SeededCacheDataset(CacheDataset):
    """CacheDataset whose random transforms are seeded per (seed, epoch, sample).

    MONAI's random transforms keep their own generators, which ignite's per-epoch reseeding does not reach,
    and a run resumed mid-epoch skips the samples already seen without drawing their augmentations. Seeding
    each sample from its index makes the augmentation of every (epoch, sample) independent of what came
    before it, so an interrupted and resumed run trains on exactly the same data as an uninterrupted one.
    """

    def __init__(self, *args: Any, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seed = seed
        self.epoch = 0  # set by the trainer at every epoch start

    def _transform(self, index: int) -> Any:
        self.transform.set_random_state(seed=(self.seed * 1_000_003 + self.epoch * 100_003 + index) % 2**32)
        return super()._transform(index)


def _loaders(cfg: TrainConfig, context_length: int, image_size: int,
             prompt_side: str) -> tuple[DataLoader, DataLoader]:
    train_records = read_dataset(cfg.data, cfg.train_split, prompt_side=prompt_side)[: cfg.max_train]
    val_records = read_dataset(cfg.data, cfg.val_split, prompt_side=prompt_side)[: cfg.max_val]
    if not train_records or not val_records:
        raise ValueError(f"dataset {cfg.data} has {len(train_records)} {cfg.train_split!r} and "
                         f"{len(val_records)} {cfg.val_split!r} records; both must be non-empty")
    train_tf = get_train_transforms(image_size, context_length, cfg.augment, cfg.prompt_transform)
    val_tf = get_val_transforms(image_size, context_length, cfg.prompt_transform)

    def dataset(records: list[dict], transform) -> _SeededCacheDataset:
        return _SeededCacheDataset(records, transform, seed=cfg.seed, cache_rate=1.0 if cfg.cache else 0.0,
                                   num_workers=None, progress=cfg.progress)

    train_set = dataset(train_records, train_tf)
    # shuffled by (seed, epoch) alone, through set_epoch, so a run resumed mid-epoch sees the same order; a
    # sampler drawing from the global RNG would depend on when that RNG was last restored or reseeded
    sampler = DistributedSampler(train_set, num_replicas=1, rank=0, shuffle=True, seed=cfg.seed)
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler,
                              drop_last=len(train_records) > cfg.batch_size, num_workers=cfg.num_workers)
    val_loader = DataLoader(dataset(val_records, val_tf), batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    return train_loader, val_loader


class _TrainStep:
    """ignite process function: one min-max step."""

    def __init__(self, model, loss_fn, optimizer, scheduler, scaler, device, amp, reversal_max, total_iterations,
                 game="reversal"):
        self.model, self.loss_fn, self.optimizer, self.scheduler = model, loss_fn, optimizer, scheduler
        self.scaler, self.device, self.amp = scaler, device, amp
        self.reversal_max, self.total, self.game = reversal_max, total_iterations, game

    def __call__(self, engine: Engine, batch: dict[str, Any]) -> dict[str, float]:
        self.model.train()
        image = batch["image"].to(self.device).contiguous(memory_format=torch.channels_last)
        text, label = batch["text"].to(self.device), batch["label"].to(self.device)
        reversal = reversal_coefficient(engine.state.iteration / self.total, self.reversal_max)
        with torch.autocast(self.device.type, enabled=self.amp):
            output = self.model.forward_aux(image, text, reversal=reversal, game=self.game)
            terms = self.loss_fn(output, label)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms.total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        masks = output.masks
        mask_mean = float(torch.stack([m.detach().float().mean() for m in masks]).mean()) if masks else 1.0
        return {"loss": float(terms.total.detach()), "seg": float(terms.segmentation),
                "conf": float(terms.confounder), "uninformative": float(terms.uninformative), "mask_mean": mask_mean,
                "reversal": reversal}


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume) a model; returns the best validation summary.

    Writes into ``cfg.output_dir``: ``checkpoints/last_*.pt`` (the resumable state), ``best_model.pt``
    (a plain state dict of the best epoch), ``best_metrics.json``, ``history.jsonl`` (one line per
    validation), ``tensorboard/`` and ``train_config.json``.

    Raises:
        ValueError: for an unusable configuration, dataset or device.
    """
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / "train_config.json"
    if config_file.exists() and json.loads(config_file.read_text())["model"] != cfg.model:
        raise ValueError(f"output_dir {out} holds a run of another model; choose a new output_dir")
    config_file.write_text(json.dumps(asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    device = resolve_device(cfg.device)
    amp = cfg.amp and device.type == "cuda"

    model = create_model(cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.init_checkpoint).to(device)
    model = model.to(memory_format=torch.channels_last)
    if cfg.prompt_side is not None:
        model.prompt_side = check_prompt_side(cfg.prompt_side)
    elif cfg.init_checkpoint is None:
        model.prompt_side = dataset_prompt_side(cfg.data)
    logger.info("the model learns prompts naming the %s's side", model.prompt_side)
    train_loader, val_loader = _loaders(cfg, model.tokenizer.context_length, model.config.image_size,
                                        model.prompt_side)
    encoder_scale = cfg.encoder_lr_scale if cfg.encoder_lr_scale is not None else (0.1 if cfg.pretrained else 1.0)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.lr, encoder_scale, cfg.weight_decay))
    total = cfg.epochs * len(train_loader)

    def lr_factor(it: int) -> float:
        if it < cfg.warmup_iterations:
            return (it + 1) / cfg.warmup_iterations
        progress = (it - cfg.warmup_iterations) / max(1, total - cfg.warmup_iterations)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    loss_fn = CausalSegLoss(confounder_weight=cfg.confounder_weight)
    if cfg.game not in GAMES:
        raise ValueError(f"game must be one of {', '.join(GAMES)}, got {cfg.game!r}")
    trainer = DeterministicEngine(_TrainStep(model, loss_fn, optimizer, scheduler, scaler, device, amp,
                                             cfg.reversal_max, total, cfg.game))
    best = _Best()
    to_save = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler,
               "trainer": _TrainerState(trainer), "best": best}
    saver = Checkpoint(to_save, DiskSaver(out / "checkpoints", require_empty=False), filename_prefix="last",
                       n_saved=1, global_step_transform=lambda e, _: e.state.iteration,
                       include_self=True)  # its own state too, so a resumed run deletes the superseded file
    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=cfg.checkpoint_every) | Events.EPOCH_COMPLETED, saver)

    writer = SummaryWriter(str(out / "tensorboard"))

    @trainer.on(Events.GET_BATCH_STARTED)  # not EPOCH_STARTED: a run resumed mid-epoch does not fire it
    def _seed_epoch(engine: Engine) -> None:
        epoch = engine.state.iteration // len(train_loader) + 1  # the epoch of the batch about to be drawn
        train_loader.dataset.epoch = epoch
        train_loader.sampler.set_epoch(epoch)

    @trainer.on(Events.ITERATION_STARTED)
    def _seed_iteration(engine: Engine) -> None:
        # dropout draws depend on the iteration alone, not on how many iterations this process has run
        torch.manual_seed(cfg.seed * 1_000_003 + engine.state.iteration)

    @trainer.on(Events.ITERATION_COMPLETED(every=10))
    def _log_iteration(engine: Engine) -> None:
        for key, value in engine.state.output.items():
            writer.add_scalar(f"train/{key}", value, engine.state.iteration)
        writer.add_scalar("train/lr", optimizer.param_groups[1]["lr"], engine.state.iteration)

    def _final_epoch_unvalidated(engine: Engine, _: int) -> bool:
        return engine.state.epoch == cfg.epochs and cfg.epochs % cfg.val_every != 0

    validation_epochs = Events.EPOCH_COMPLETED(every=cfg.val_every)
    @trainer.on(validation_epochs | Events.EPOCH_COMPLETED(event_filter=_final_epoch_unvalidated))
    def _validate(engine: Engine) -> None:
        summary = evaluate_model(model, val_loader, device).summary()
        dice = summary.per_image.dice.value
        record = {"epoch": engine.state.epoch, "iteration": engine.state.iteration, **summary.to_dict()}
        with open(out / "history.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for key in ("per_image/dice", "per_image/iou", "dataset_level/dice", "dataset_level/iou"):
            writer.add_scalar(f"val/{key}", record[key], engine.state.epoch)
        logger.info("epoch %d: validation per-image Dice %.4f (best %.4f)", engine.state.epoch, dice, best.dice)
        if dice > best.dice:
            best.dice, best.epoch = dice, engine.state.epoch
            save_weights(model.state_dict(), out / "best_model.pt")
            (out / "best_metrics.json").write_text(json.dumps(record, indent=2))

    if cfg.progress:
        ProgressBar(persist=False).attach(trainer, output_transform=lambda o: {"loss": o["loss"], "seg": o["seg"]})

    last = sorted((out / "checkpoints").glob("last_*.pt"), key=lambda p: p.stat().st_mtime)
    if last:
        try:
            state = torch.load(last[-1], map_location=device, weights_only=True)
            Checkpoint.load_objects({**to_save, "checkpointer": saver}, state)
        except Exception as err:  # noqa: BLE001 - torch and ignite raise many types; all mean "cannot resume"
            raise ValueError(f"cannot resume from checkpoint {last[-1]} ({type(err).__name__}: "
                             f"{str(err).strip().splitlines()[0] if str(err).strip() else 'unreadable'}); "
                             "move it away to start this run over") from err
        logger.info("resumed from %s at epoch %d, iteration %d", last[-1], trainer.state.epoch,
                    trainer.state.iteration)
    if trainer.state.iteration >= total:  # ignite would start a finished run over; a finished run stays finished
        logger.info("the run in %s is complete (%d epochs); nothing to train", out, cfg.epochs)
    else:
        trainer.run(train_loader, max_epochs=cfg.epochs)
    writer.close()
    return json.loads((out / "best_metrics.json").read_text())
