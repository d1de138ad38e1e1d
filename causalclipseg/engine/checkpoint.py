"""Atomic writes (weights, masks): a crash never leaves a half-written file in place."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = ["atomic_write", "save_weights"]

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: the mode a plain open() would give new files is 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the temporary name ends like the final one, so writers that pick the format by extension still work
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes), dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0o600: give the file the mode any new file gets
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_weights(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, half: bool = False) -> Path:
    """Save a plain state dict atomically: ``.safetensors`` or a ``torch.save`` file, optionally as float16."""
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in state_dict.items()}
    if str(path).endswith(".safetensors"):
        return atomic_write(path, lambda tmp: save_file(state, tmp))
    return atomic_write(path, lambda tmp: torch.save(state, tmp))
