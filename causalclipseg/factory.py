"""One front door: ``create_model(name, pretrained=..., checkpoint=...)`` and ``list_models()``.

Architecture comes from a JSON file per variant in ``model_configs/`` (registered in :mod:`causalclipseg.registry`,
re-exported here); weights are separate: CLIP weights through open_clip (a tag such as ``openai`` or a local file)
and CausalCLIPSeg weights from a state-dict file (``.pt``/``.pth`` read with ``weights_only=True``, or
``.safetensors``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import open_clip
import torch
from safetensors.torch import load_file

from .model.causalclipseg import CausalCLIPSeg
from .model.config import CausalCLIPSegConfig, UNetBaselineConfig
from .registry import DEFAULT_CHECKPOINT, DEFAULT_MODEL, add_model_config, get_model_config, list_models

if TYPE_CHECKING:  # the U-Net baseline is an experiment tool: imported only when a config asks for it
    from .experiments.unet import TextFreeUNet

logger = logging.getLogger(__name__)

#: The record of a training run beside its ``best_model.pt``: its settings, the variant (``model``) among them.
RUN_FILE = "train_config.json"

__all__ = ["create_model", "list_models", "add_model_config", "get_model_config", "load_state_dict",
           "checkpoint_prompt_side", "resolve_device", "RUN_FILE",
           "DEFAULT_MODEL", "DEFAULT_CHECKPOINT"]

def _build_clip(config: CausalCLIPSegConfig, pretrained: str | None) -> torch.nn.Module:
    """An open_clip CLIP with random weights, or weights from an open_clip tag or a local file."""
    clip_cfg = config.clip
    model_cfg = clip_cfg.model_cfg if clip_cfg.model_cfg is not None else open_clip.get_model_config(clip_cfg.name)
    if model_cfg is None:
        raise ValueError(f"open_clip has no architecture {clip_cfg.name!r}")
    clip = open_clip.CLIP(**model_cfg)
    if pretrained is None:
        return clip
    if os.path.isfile(pretrained):
        path = pretrained
    else:
        tag_cfg = open_clip.get_pretrained_cfg(clip_cfg.name, pretrained) if clip_cfg.name else {}
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(clip_cfg.name) if clip_cfg.name else []
            raise ValueError(f"pretrained={pretrained!r} is neither a file nor an open_clip tag of "
                             f"{clip_cfg.name or 'this inline architecture'} (tags: {tags})")
        path = open_clip.download_pretrained(tag_cfg)  # needs network access on first use
    open_clip.load_checkpoint(clip, path, weights_only=True)
    logger.info("loaded CLIP weights from %s", path)
    return clip


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict safely: safetensors, or ``torch.load(weights_only=True)``.

    A training checkpoint (a dict with a ``model`` entry) is accepted too.

    Raises:
        FileNotFoundError: if the file is missing.
        ValueError: if the file is not a readable state dict (corrupt, or a pickle with code in it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch/safetensors raise many types; all mean "unreadable"
        raise ValueError(f"cannot read checkpoint {path}: {type(err).__name__}: {str(err).splitlines()[0]}") from err
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} does not hold a state dict of tensors")
    return state


def checkpoint_prompt_side(path: str | os.PathLike) -> str:
    """Whose left a checkpoint's model learned "left" as (``patient`` or ``viewer``), without building the model;
    checkpoints from before the record existed are ``viewer`` (see ``CausalCLIPSeg.prompt_side``).

    Raises:
        FileNotFoundError, ValueError: as :func:`load_state_dict`.
    """
    flag = load_state_dict(path).get("viewer_side_prompts")
    return "viewer" if flag is None or bool(flag) else "patient"


def _load_checkpoint(model: torch.nn.Module, path: str | os.PathLike, name: str) -> None:
    state = load_state_dict(path)
    own = model.state_dict()
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    missing, unexpected = [], sorted(set(state) - set(own))
    if not mismatched and not unexpected:
        missing = sorted(model.load_state_dict(state, strict=False).missing_keys)  # after the model's own hooks
    if missing or unexpected or mismatched:
        def first(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        problems = [f"{label} keys: {first(keys)}" for label, keys in
                    (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched)) if keys]
        trained = _trained_variant(Path(path))
        hint = (f"its run trained model {trained[0]!r} ({trained[1]} beside it)" if trained and trained[0] != name
                else "is it for another variant?")
        raise ValueError(f"checkpoint {path} does not fit model {name!r} ({hint}): " + "; ".join(problems))


def _trained_variant(path: Path) -> tuple[str, str] | None:
    """The variant a checkpoint was trained as, and the file that says so: its run's record beside it (a training
    run's :data:`RUN_FILE`, or the ``<stem>_metrics.json`` that ``scripts/ship_model.py`` writes beside shipped
    weights); ``None`` when neither is there or readable. The state dict itself does not record it."""
    for record, keys in ((path.parent / RUN_FILE, ("model",)),
                         (path.with_name(f"{path.stem}_metrics.json"), ("training", "model"))):
        try:
            value = json.loads(record.read_text(encoding="utf-8"))
            for key in keys:
                value = value[key]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(value, str):
            return value, record.name
    return None


def create_model(name: str = DEFAULT_MODEL, pretrained: str | None = None,
                 checkpoint: str | os.PathLike | None = None) -> CausalCLIPSeg | TextFreeUNet:
    """Build a CausalCLIPSeg variant (or the vision-only ``unet`` baseline) and load its weights.

    Args:
        name: a variant from :func:`list_models`.
        pretrained: CLIP encoder weights: ``None`` (random), an open_clip tag of the variant's CLIP
            architecture (downloaded by open_clip), or a path to an open_clip CLIP state dict.
        checkpoint: a CausalCLIPSeg state dict (all weights, applied after ``pretrained``).

    Returns:
        the model, in eval mode, on the CPU.

    Raises:
        ValueError: for an unknown name, an unknown tag, or a checkpoint that does not fit.
        FileNotFoundError: for a missing checkpoint file.
    """
    config = get_model_config(name)
    if isinstance(config, UNetBaselineConfig):
        from .experiments.unet import TextFreeUNet

        if pretrained is not None:
            raise ValueError(f"model {name!r} is the vision-only U-Net baseline: it has no CLIP encoders, so "
                             f"pretrained={pretrained!r} cannot apply")
        model = TextFreeUNet(config)
    else:
        model = CausalCLIPSeg(config, _build_clip(config, pretrained))
    if checkpoint is not None:
        _load_checkpoint(model, checkpoint, name)
    return model.eval()


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when present, else CPU; anything else is parsed by ``torch.device``.

    Raises:
        ValueError: for an unparsable name or a CUDA device on a machine without one.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device {device!r} is not a valid torch device ({err})") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here; use 'cpu' or 'auto'")
    return dev


