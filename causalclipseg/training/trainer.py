"""Training engine: the min-max step on ignite, validation, atomic checkpoints, exact resume, one process or many.

:class:`Trainer` is the one trainer behind every front door: ``causalclipseg train`` (:func:`train`), the bundle's
``configs/train.json`` (and ``multi_gpu_train.json`` under torchrun) and MONAI Label's train task.

One training step: :class:`MinMaxForward` (``model.forward_aux``) with the gradient-reversal coefficient of the
current iteration, :class:`~causalclipseg.training.losses.CausalSegLoss`, one backward pass, one optimiser and
scheduler step (AMP on CUDA). The coefficient follows the DANN ramp ``r_max * (2 / (1 + exp(-10 p)) - 1)`` over
training progress ``p``, so the confounder head learns before the trunk starts to fight it.

Validation: every ``val_every`` epochs, and after the last one, under both metric protocols with the package's
evaluation (:func:`~causalclipseg.evaluation.evaluate.evaluate_model`, whose
:class:`~causalclipseg.evaluation.metrics.SegmentationScores` holds the one empty-mask rule); the best per-image
Dice is kept as ``best_model.pt``.

Resume: the whole state (model, optimiser, scheduler, AMP scaler, ignite trainer state, RNG states, best score) is
written atomically every ``checkpoint_every`` iterations and at every epoch end, after that epoch's validation.
ignite's ``DeterministicEngine`` reseeds the data order per epoch and fast-forwards to the saved iteration, the
augmentation is seeded per (epoch, sample), and the global torch RNG (dropout) is reseeded per iteration. So a run
killed at any point and resumed from its last checkpoint, mid-epoch or at an epoch end, ends bit-identical to an
uninterrupted one on the CPU (tested with SIGKILL). ``train_config.json`` records the run; resuming it with a config
that differs in a field that changes what is learned is refused (one line naming the fields), unless
``allow_config_change`` is set; the fields in :data:`RUNTIME_FIELDS` may change freely.

Several processes: when ``torch.distributed`` is initialised before the :class:`Trainer` is built (torchrun, as
``multi_gpu_train.json`` does), the min-max forward runs through ``DistributedDataParallel``, which synchronises
gradients only through ``forward`` (hence :class:`MinMaxForward`); each process trains on its shard of every epoch
(a ``DistributedSampler`` of the world size and rank, still reseeded per (seed, epoch)) with ``batch_size`` samples
per step, so the effective batch is ``world_size * batch_size``; only rank 0 validates, checkpoints and logs, and
barriers hold the others meanwhile. A CUDA device without an index means the process's ``LOCAL_RANK``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.engine.deterministic import DeterministicEngine
from ignite.handlers import Checkpoint, DiskSaver, ProgressBar
from monai.data import CacheDataset, DataLoader
from monai.inferers import SimpleInferer
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler
from torch.utils.tensorboard import SummaryWriter

from ..data.datasets import dataset_prompt_side, read_dataset
from ..data.pipelines import get_train_transforms, get_val_transforms
from ..data.prompts import check_prompt_side
from ..evaluation.evaluate import evaluate_model
from ..factory import RUN_FILE, create_model, resolve_device
from ..io.writers import atomic_write
from ..model.causalclipseg import CausalCLIPSegOutput
from ..model.config import GAMES
from .checkpoint import save_weights
from .config import RUNTIME_FIELDS, TrainConfig, config_changes
from .losses import CausalSegLoss

logger = logging.getLogger(__name__)

__all__ = ["RUNTIME_FIELDS", "MinMaxForward", "TrainConfig", "Trainer", "config_changes", "param_groups",
           "reversal_coefficient", "train"]


def _describe(values: dict[str, Any]) -> str:
    return ", ".join(f"{name} {json.dumps(value)}" for name, value in values.items())


def reversal_coefficient(progress: float, maximum: float) -> float:
    """DANN ramp from 0 to ``maximum`` over training progress in [0, 1]."""
    return maximum * (2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0)


def param_groups(model: nn.Module, lr: float, encoder_scale: float, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: the model's ``encoder_modules()`` at ``lr * encoder_scale``, the rest at ``lr``."""
    encoder_ids = {id(p) for module in model.encoder_modules() for p in module.parameters()}
    encoders = [p for p in model.parameters() if id(p) in encoder_ids]
    rest = [p for p in model.parameters() if id(p) not in encoder_ids]
    return [{"params": encoders, "lr": lr * encoder_scale, "weight_decay": weight_decay},
            {"params": rest, "lr": lr, "weight_decay": weight_decay}]


class MinMaxForward(nn.Module):
    """The min-max forward as a module's ``forward``: what the training step calls, and what
    ``DistributedDataParallel`` wraps (it synchronises the gradients of what runs through ``forward`` only, and the
    model's own ``forward`` returns the causal logits alone). It shares the model's weights.

    Args:
        model: a :class:`~causalclipseg.model.causalclipseg.CausalCLIPSeg` (or a model with its ``forward_aux``).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, text: torch.Tensor, reversal: float, game: str) -> CausalCLIPSegOutput:
        """image (B, 3, S, S) preprocessed, text (B, L) token ids -> ``model.forward_aux(image, text, reversal, game)``
        (causal and confounder logits (B, 1, S, S), causal masks)."""
        return self.model.forward_aux(image, text, reversal=reversal, game=game)


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


class _Clock:
    """Wall-clock seconds a run has spent training and validating, over all its processes (checkpointed, so a
    resumed run counts on; what a killed process did after its last checkpoint is not counted, as it is redone)."""

    def __init__(self) -> None:
        self.before = 0.0  # seconds of the earlier processes, up to the checkpoint this one resumed from
        self.started: float | None = None

    def start(self) -> None:
        self.started = time.perf_counter()

    def seconds(self) -> float:
        return self.before + (time.perf_counter() - self.started if self.started is not None else 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds()}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # before start(): the run resumes, then starts it
        self.before = float(state["seconds"])


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


def _process_device(name: str, distributed: bool) -> torch.device:
    """The device of this process: ``name`` resolved; under torch.distributed a CUDA device without an index is the
    process's ``LOCAL_RANK`` (made current, as NCCL needs)."""
    device = resolve_device(name)
    if distributed and device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


class Trainer(DeterministicEngine):
    """One training run of a :class:`TrainConfig`, as an ignite engine (like MONAI's ``SupervisedTrainer``): the
    model, data, optimiser, schedules, handlers and checkpoints are built here; :meth:`run` resumes what
    ``output_dir`` holds and trains. See the module docstring for the step, validation, resume and processes.

    Building it reads ``output_dir`` (to refuse a changed config early) and writes nothing but the checkpoint folder;
    :meth:`run` writes the rest. For the bundle's train-workflow properties it exposes :attr:`network` (the model
    trained), :attr:`train_dataset`, :attr:`inferer` (through which the step calls the min-max forward) and the
    run's ``max_epochs``.

    Args:
        config: the run.
        max_epochs: replaces ``config.epochs`` when given (the name MONAI's trainers, and tools setting a bundle's
            ``max_epochs`` property, use).

    Raises:
        ValueError: for an unusable configuration, dataset or device, or when ``output_dir`` holds a run with another
            config and ``allow_config_change`` is not set.
    """

    def __init__(self, config: TrainConfig, max_epochs: int | None = None) -> None:
        cfg = config if max_epochs is None else replace(config, epochs=max_epochs)
        if cfg.game not in GAMES:
            raise ValueError(f"game must be one of {', '.join(GAMES)}, got {cfg.game!r}")
        for name in ("epochs", "batch_size", "val_every", "checkpoint_every"):
            if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(cfg, name)!r}")
        loss_function = CausalSegLoss(cfg.lambda_dice, cfg.lambda_bce, cfg.confounder_weight)  # checks its weights
        self.config = cfg
        distributed = dist.is_available() and dist.is_initialized()
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        self.output_dir = Path(cfg.output_dir)
        self._check_run_record()  # before anything slow is built
        super().__init__(self._train_step)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        self.device = _process_device(cfg.device, distributed)
        self.amp = cfg.amp and self.device.type == "cuda"

        model = create_model(cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.init_checkpoint).to(self.device)
        model = model.to(memory_format=torch.channels_last)
        if cfg.prompt_side is not None:
            model.prompt_side = check_prompt_side(cfg.prompt_side)
        elif cfg.init_checkpoint is None:
            model.prompt_side = dataset_prompt_side(cfg.data)
        logger.info("the model learns prompts naming the %s's side", model.prompt_side)
        self.network = model
        self.train_loader, self.val_loader = self._loaders(model.tokenizer.context_length, model.config.image_size,
                                                           model.prompt_side)
        encoder_scale = cfg.encoder_lr_scale if cfg.encoder_lr_scale is not None else (0.1 if cfg.pretrained else 1.0)
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.lr, encoder_scale, cfg.weight_decay))
        self.total_iterations = total = cfg.epochs * len(self.train_loader)

        def lr_factor(it: int) -> float:  # a plain function: LambdaLR's state dict then holds no callable's state
            if it < cfg.warmup_iterations:
                return (it + 1) / cfg.warmup_iterations
            progress = (it - cfg.warmup_iterations) / max(1, total - cfg.warmup_iterations)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        self.loss_function = loss_function
        self.inferer = SimpleInferer()
        step = MinMaxForward(model)
        self.step_network = step if not distributed else DistributedDataParallel(
            step, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.best = _Best()
        self.clock = _Clock()
        self.writer: SummaryWriter | None = None  # opened by run() on rank 0
        self.to_save = {"model": model, "optimizer": self.optimizer, "scheduler": self.lr_scheduler,
                        "scaler": self.scaler, "trainer": _TrainerState(self), "best": self.best,
                        "clock": self.clock}
        self.checkpointer = Checkpoint(
            self.to_save, DiskSaver(self.output_dir / "checkpoints", require_empty=False), filename_prefix="last",
            n_saved=1, global_step_transform=lambda e, _: e.state.iteration,
            include_self=True)  # its own state too, so a resumed run deletes the superseded file
        self._attach_handlers()

    @property
    def train_dataset(self) -> CacheDataset:
        """The training records with their transforms (all of them; each process samples its shard)."""
        return self.train_loader.dataset

    # ------------------------------------------------------------------------------------------------- setup
    def _check_run_record(self) -> None:
        """Refuse (or, with ``allow_config_change``, log) a config that differs from the run in ``output_dir``.

        Raises:
            ValueError: if the run record is unreadable, or differs and ``allow_config_change`` is not set.
        """
        record = self.output_dir / RUN_FILE
        if not record.is_file():
            return
        try:
            saved = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"output_dir {self.output_dir} holds an unreadable {RUN_FILE} ({err}); move it away to "
                             "continue the run with this config, or choose a new output_dir") from err
        changes = config_changes(saved, self.config, self.world_size)
        if not changes:
            return
        before = _describe({name: old for name, (old, _) in changes.items()})
        after = _describe({name: new for name, (_, new) in changes.items()})
        if not self.config.allow_config_change:
            raise ValueError(f"output_dir {self.output_dir} holds a run with {before}; this call asks {after}: pass "
                             "--allow-config-change (allow_config_change) to continue it with the new values, or "
                             "choose a new output_dir")
        logger.warning("output_dir %s: continuing the run with %s instead of %s (allow_config_change)",
                       self.output_dir, after, before)

    def _loaders(self, context_length: int, image_size: int, prompt_side: str) -> tuple[DataLoader, DataLoader | None]:
        """The training loader (this process's shard) and, on rank 0, the validation loader.

        Raises:
            ValueError: if a split is empty or the dataset cannot be read (:func:`read_dataset`).
        """
        cfg = self.config
        train_records = read_dataset(cfg.data, cfg.train_split, prompt_side=prompt_side)[: cfg.max_train]
        val_records = read_dataset(cfg.data, cfg.val_split, prompt_side=prompt_side)[: cfg.max_val]
        if not train_records or not val_records:
            raise ValueError(f"dataset {cfg.data} has {len(train_records)} {cfg.train_split!r} and "
                             f"{len(val_records)} {cfg.val_split!r} records; both must be non-empty")
        train_tf = get_train_transforms(image_size, context_length, cfg.augment, cfg.prompt_transform)
        val_tf = get_val_transforms(image_size, context_length, cfg.prompt_transform)

        def dataset(records: list[dict], transform) -> _SeededCacheDataset:
            return _SeededCacheDataset(records, transform, seed=cfg.seed, cache_rate=1.0 if cfg.cache else 0.0,
                                       num_workers=None, progress=cfg.progress and self.rank == 0)

        train_set = dataset(train_records, train_tf)
        # shuffled by (seed, epoch) alone, through set_epoch, so a run resumed mid-epoch sees the same order; a
        # sampler drawing from the global RNG would depend on when that RNG was last restored or reseeded
        sampler = DistributedSampler(train_set, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                     seed=cfg.seed)
        train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler,
                                  drop_last=len(sampler) > cfg.batch_size, num_workers=cfg.num_workers)
        if self.rank > 0:
            return train_loader, None
        val_loader = DataLoader(dataset(val_records, val_tf), batch_size=cfg.batch_size, num_workers=cfg.num_workers)
        return train_loader, val_loader

    def _attach_handlers(self) -> None:
        cfg = self.config
        self.add_event_handler(Events.GET_BATCH_STARTED, self._seed_epoch)  # EPOCH_STARTED misses resumed epochs
        self.add_event_handler(Events.ITERATION_STARTED, self._seed_iteration)

        def final_epoch_unvalidated(engine: Engine, _: int) -> bool:
            return engine.state.epoch == cfg.epochs and cfg.epochs % cfg.val_every != 0

        # validation before the epoch-end checkpoint, so that the checkpoint holds the best score it found
        self.add_event_handler(Events.EPOCH_COMPLETED(every=cfg.val_every)
                               | Events.EPOCH_COMPLETED(event_filter=final_epoch_unvalidated), self._validate)
        if self.rank > 0:
            return
        self.add_event_handler(Events.ITERATION_COMPLETED(every=cfg.checkpoint_every) | Events.EPOCH_COMPLETED,
                               self.checkpointer)
        self.add_event_handler(Events.ITERATION_COMPLETED(every=10), self._log_iteration)
        if cfg.progress:
            ProgressBar(persist=False).attach(self, output_transform=lambda o: {"loss": o["loss"], "seg": o["seg"]})

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    # ---------------------------------------------------------------------------------------------- handlers
    def _seed_epoch(self, engine: Engine) -> None:
        epoch = engine.state.iteration // len(self.train_loader) + 1  # the epoch of the batch about to be drawn
        self.train_loader.dataset.epoch = epoch
        self.train_loader.sampler.set_epoch(epoch)

    def _seed_iteration(self, engine: Engine) -> None:
        # dropout draws depend on the iteration (and the process) alone, not on how many iterations this process ran
        torch.manual_seed((self.config.seed * 1_000_003 + engine.state.iteration) * self.world_size + self.rank)

    def _train_step(self, engine: Engine, batch: dict[str, Any]) -> dict[str, float]:
        """ignite process function: one min-max step."""
        self.step_network.train()
        image = batch["image"].to(self.device).contiguous(memory_format=torch.channels_last)
        text, label = batch["text"].to(self.device), batch["label"].to(self.device)
        reversal = reversal_coefficient(engine.state.iteration / self.total_iterations, self.config.reversal_max)
        with torch.autocast(self.device.type, enabled=self.amp):
            output = self.inferer(image, self.step_network, text, reversal=reversal, game=self.config.game)
            terms = self.loss_function(output, label)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms.total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        masks = output.masks
        mask_mean = float(torch.stack([m.detach().float().mean() for m in masks]).mean()) if masks else 1.0
        return {"loss": float(terms.total.detach()), "seg": float(terms.segmentation),
                "conf": float(terms.confounder), "uninformative": float(terms.uninformative), "mask_mean": mask_mean,
                "reversal": reversal}

    def _log_iteration(self, engine: Engine) -> None:
        for key, value in engine.state.output.items():
            self.writer.add_scalar(f"train/{key}", value, engine.state.iteration)
        self.writer.add_scalar("train/lr", self.optimizer.param_groups[1]["lr"], engine.state.iteration)

    def _validate(self, engine: Engine) -> None:
        """Rank 0 scores the model on the validation split and keeps the best; the other processes wait."""
        if self.rank == 0:
            out = self.output_dir
            summary = evaluate_model(self.network, self.val_loader, self.device).summary()
            dice = summary.per_image.dice.value
            record = {"epoch": engine.state.epoch, "iteration": engine.state.iteration,
                      "seconds": round(self.clock.seconds(), 1), **summary.to_dict()}
            history = out / "history.jsonl"  # one line per validated epoch, also when a resumed run validates again
            lines = [line for line in (history.read_text().splitlines() if history.exists() else [])
                     if json.loads(line)["epoch"] < record["epoch"]] + [json.dumps(record)]
            atomic_write(history, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
            for key in ("per_image/dice", "per_image/iou", "dataset_level/dice", "dataset_level/iou"):
                self.writer.add_scalar(f"val/{key}", record[key], engine.state.epoch)
            logger.info("epoch %d: validation per-image Dice %.4f (best %.4f)", engine.state.epoch, dice,
                        max(dice, self.best.dice))
            if dice > self.best.dice:
                self.best.dice, self.best.epoch = dice, engine.state.epoch
                save_weights(self.network.state_dict(), out / "best_model.pt")
                atomic_write(out / "best_metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))
        self._barrier()

    # --------------------------------------------------------------------------------------------------- run
    def _resume(self) -> None:
        """Load the last checkpoint of ``output_dir``, if any (every process loads the same file).

        Raises:
            ValueError: if it cannot be loaded.
        """
        last = sorted((self.output_dir / "checkpoints").glob("last_*.pt"), key=lambda p: p.stat().st_mtime)
        if last:
            try:
                state = torch.load(last[-1], map_location=self.device, weights_only=True)
                objects = {**self.to_save, "checkpointer": self.checkpointer}
                if "clock" not in state:  # saved before runs timed themselves: this run counts from here
                    del objects["clock"]
                Checkpoint.load_objects(objects, state)
            except Exception as err:  # noqa: BLE001 - torch and ignite raise many types; all mean "cannot resume"
                raise ValueError(f"cannot resume from checkpoint {last[-1]} ({type(err).__name__}: "
                                 f"{str(err).strip().splitlines()[0] if str(err).strip() else 'unreadable'}); "
                                 "move it away to start this run over") from err
            logger.info("resumed from %s at epoch %d, iteration %d", last[-1], self.state.epoch, self.state.iteration)
        self._barrier()  # no process trains (nor rank 0 replaces the file) before every process has loaded it

    def run(self) -> dict[str, Any]:  # type: ignore[override]  # MONAI's workflows run their own data, too
        """Train, or resume the run in ``output_dir``; returns the best validation record.

        Writes into ``output_dir`` (rank 0): ``checkpoints/last_*.pt`` (the resumable state), ``best_model.pt`` (a
        plain state dict of the best epoch), ``best_metrics.json``, ``history.jsonl`` (one line per validation, with
        ``seconds``: the run's training and validation time so far, over all its processes),
        ``tensorboard/`` and ``train_config.json`` (the config, and ``world_size``).

        Raises:
            ValueError: if the last checkpoint cannot be resumed.
        """
        out = self.output_dir
        self._barrier()  # every process compared its config with the saved one before rank 0 replaces it
        if self.rank == 0:
            record = json.dumps({**asdict(self.config), "world_size": self.world_size}, indent=2)
            atomic_write(out / RUN_FILE, lambda tmp: Path(tmp).write_text(record))
            self.writer = SummaryWriter(str(out / "tensorboard"))
        self._resume()
        self.clock.start()
        if self.state.iteration >= self.total_iterations:  # ignite would start a finished run over
            logger.info("the run in %s is complete (%d epochs); nothing to train", out, self.config.epochs)
        else:
            super().run(self.train_loader, max_epochs=self.config.epochs)
        if self.writer is not None:
            self.writer.close()
        self._barrier()  # rank 0's last validation is on disk
        return json.loads((out / "best_metrics.json").read_text())


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume) a run: ``Trainer(cfg).run()``; returns the best validation record.

    Raises:
        ValueError: for an unusable configuration, dataset or device, a config that differs from the run in
            ``output_dir`` (without ``allow_config_change``), or a checkpoint that cannot be resumed.
    """
    return Trainer(cfg).run()
