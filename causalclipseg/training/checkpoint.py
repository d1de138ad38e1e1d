"""Weight files: a plain state dict saved atomically, as ``.safetensors`` or a ``torch.save`` file."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..io.writers import atomic_write

__all__ = ["save_weights"]


def save_weights(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, half: bool = False) -> Path:
    """Save a plain state dict atomically: ``.safetensors`` or a ``torch.save`` file, optionally as float16."""
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in state_dict.items()}
    if str(path).endswith(".safetensors"):
        return atomic_write(path, lambda tmp: save_file(state, tmp))
    return atomic_write(path, lambda tmp: torch.save(state, tmp))
