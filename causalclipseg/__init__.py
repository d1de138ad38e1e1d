"""causalclipseg: text-prompted lesion segmentation with CausalCLIPSeg."""

from .factory import DEFAULT_MODEL, add_model_config, create_model, get_model_config, list_models
from .model.causalclipseg import CausalCLIPSeg, CausalCLIPSegOutput
from .model.config import CausalCLIPSegConfig
from .tokenizer import PromptTokenizer
from .version import __version__

__all__ = ["CausalCLIPSeg", "CausalCLIPSegConfig", "CausalCLIPSegOutput", "PromptTokenizer", "DEFAULT_MODEL",
           "add_model_config", "create_model", "get_model_config", "list_models", "__version__"]
