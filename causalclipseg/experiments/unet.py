"""Vision-only baseline: a MONAI U-Net behind the CausalCLIPSeg interface, so that training, evaluation,
prediction and the benchmarks run it unchanged. The prompt is tokenised (same data path) and ignored."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import UNet
from torch import nn

from ..model.causalclipseg import CausalCLIPSegOutput, PromptSideRecord
from ..model.config import UNetBaselineConfig
from ..tokenizer import PromptTokenizer

__all__ = ["TextFreeUNet"]


class TextFreeUNet(PromptSideRecord, nn.Module):
    """MONAI ``UNet`` with CausalCLIPSeg's ``forward(image, text)`` / ``forward_aux`` / ``tokenize`` surface."""

    def __init__(self, config: UNetBaselineConfig) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = PromptTokenizer(config.context_length)
        self.unet = UNet(spatial_dims=2, in_channels=3, out_channels=1, channels=config.channels,
                         strides=config.strides, num_res_units=config.num_res_units, dropout=config.dropout)
        self._init_prompt_side()  # recorded like CausalCLIPSeg's, though the text is ignored

    def tokenize(self, prompts: str | Sequence[str], allow_empty: bool = False) -> torch.Tensor:
        """Token ids, as :meth:`CausalCLIPSeg.tokenize` (validated, then unused by the network)."""
        return self.tokenizer(prompts, allow_empty=allow_empty)

    def encoder_modules(self) -> list[nn.Module]:
        """No pretrained encoders: every parameter trains at the full learning rate."""
        return []

    def forward(self, image: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1|3, H, W) with H, W multiples of 16 -> logits (B, 1, H, W); ``text`` is ignored."""
        if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] not in (1, 3):
            raise ValueError(f"image must be a (B, 1|3, H, W) tensor, got {getattr(image, 'shape', type(image))}")
        return self.unet(image.as_subclass(torch.Tensor).expand(-1, 3, -1, -1))

    def forward_aux(self, image: torch.Tensor, text: torch.Tensor | None = None, reversal: float = 1.0,
                    game: str = "reversal") -> CausalCLIPSegOutput:
        """The prediction alone: no confounder branch, no masks."""
        return CausalCLIPSegOutput(self(image, text), None, [])
