"""causalclipseg: text-prompted lesion segmentation with CausalCLIPSeg.

The names below load on first use (PEP 562), so ``import causalclipseg`` and the command line do not pay for torch,
open_clip and MONAI before they need them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .registry import DEFAULT_MODEL, add_model_config, get_model_config, list_models
from .version import __version__

if TYPE_CHECKING:
    from .factory import create_model
    from .model.causalclipseg import CausalCLIPSeg, CausalCLIPSegOutput
    from .model.config import CausalCLIPSegConfig
    from .tokenizer import PromptTokenizer

__all__ = ["CausalCLIPSeg", "CausalCLIPSegConfig", "CausalCLIPSegOutput", "PromptTokenizer", "DEFAULT_MODEL",
           "add_model_config", "create_model", "get_model_config", "list_models", "__version__"]

_LAZY = {"create_model": ".factory", "CausalCLIPSeg": ".model.causalclipseg",
         "CausalCLIPSegOutput": ".model.causalclipseg", "CausalCLIPSegConfig": ".model.config",
         "PromptTokenizer": ".tokenizer"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
