"""The registry of model variants: a JSON config per variant (``model_configs/``, and any registered with
:func:`add_model_config`), and the variant we ship. Free of torch and open_clip, so that the command line parses and
answers ``--help`` and argument errors at once; :mod:`causalclipseg.factory` builds the models.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

from .model.config import CausalCLIPSegConfig, UNetBaselineConfig

__all__ = ["add_model_config", "get_model_config", "list_models", "DEFAULT_MODEL", "DEFAULT_CHECKPOINT"]

_CONFIG_DIR = Path(__file__).parent / "model_configs"
_CONFIGS: dict[str, dict[str, Any]] = {}

# The variant we train and ship: the tiny model without the causal module, which segments QaTa-COV19 better than
# with it at the same budget (README, "Does the causal intervention pay?").
DEFAULT_MODEL = "tiny-nocausal"
DEFAULT_CHECKPOINT = Path(__file__).parent / "weights" / "causalclipseg_qata.pt"  # DEFAULT_MODEL's weights


def add_model_config(path: str | os.PathLike) -> None:
    """Register a JSON config file, or every ``*.json`` in a folder, under its file stem.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if a file is not a valid model config.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model config path not found: {path}")
    for file in sorted(path.glob("*.json")) if path.is_dir() else [path]:
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError(f"a model config is a JSON object, got {type(data).__name__}")
            _parse_config(data)
        except (OSError, UnicodeDecodeError, TypeError, ValueError) as err:
            raise ValueError(f"invalid model config {file}: {err}") from err
        _CONFIGS[file.stem] = data


def _parse_config(data: dict[str, Any]) -> CausalCLIPSegConfig | UNetBaselineConfig:
    """A config with a ``unet`` section is the vision-only baseline; anything else is CausalCLIPSeg."""
    if "unet" in data:
        return UNetBaselineConfig.from_dict(data)
    return CausalCLIPSegConfig.from_dict(data)


def list_models() -> list[str]:
    """Names of the registered variants."""
    return sorted(_CONFIGS)


def get_model_config(name: str) -> CausalCLIPSegConfig | UNetBaselineConfig:
    """Parsed config of a registered variant.

    Raises:
        ValueError: for an unknown name, listing the closest valid names.
    """
    if name not in _CONFIGS:
        close = difflib.get_close_matches(name, list(_CONFIGS), n=3, cutoff=0.3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (available: {', '.join(list_models())})")
    return _parse_config(_CONFIGS[name])


add_model_config(_CONFIG_DIR)
