"""Vision-only baseline: a MONAI U-Net behind the CausalCLIPSeg interface, so that training, evaluation,
prediction and the benchmarks run it unchanged. The prompt is tokenised (same data path) and ignored."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from monai.networks.nets import UNet
from torch import nn

from ..tokenizer import PromptTokenizer
from .causalclipseg import CausalCLIPSegOutput, PromptSideRecord

__all__ = ["UNetBaselineConfig", "TextFreeUNet"]


@dataclass
class UNetBaselineConfig:
    """MONAI ``UNet`` arguments (2-D, 3 input channels as CLIP gets, 1 output logit channel)."""

    channels: tuple[int, ...] = (24, 48, 96, 192, 384)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = 1
    dropout: float = 0.0
    image_size: int = 224  # training and default inference size
    context_length: int = 32  # prompts are tokenised like CausalCLIPSeg's (and ignored)

    def __post_init__(self) -> None:
        self.channels, self.strides = tuple(self.channels), tuple(self.strides)
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError(f"unet needs one stride per level below the first: {len(self.channels)} channels "
                             f"need {len(self.channels) - 1} strides, got {len(self.strides)}")
        if self.image_size % 32:
            raise ValueError(f"image_size must be divisible by 32, got {self.image_size}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetBaselineConfig:
        """Build from ``{"unet": {...}, "image_size": ..., "context_length": ...}``, rejecting unknown keys.

        Raises:
            ValueError: on an unknown key.
        """
        allowed_top = {"unet", "image_size", "context_length"}
        allowed_unet = {f.name for f in fields(cls)} - {"image_size", "context_length"}
        for where, section, allowed in (("model config", data, allowed_top), ("unet", data["unet"], allowed_unet)):
            unknown = sorted(set(section) - allowed)
            if unknown:
                raise ValueError(f"unknown key(s) {unknown} in {where}; allowed: {sorted(allowed)}")
        return cls(**data["unet"], **{k: data[k] for k in ("image_size", "context_length") if k in data})

    def to_dict(self) -> dict[str, Any]:
        """Plain dict that :meth:`from_dict` reads back."""
        data = asdict(self)
        return {"unet": {k: v for k, v in data.items() if k not in ("image_size", "context_length")},
                "image_size": data["image_size"], "context_length": data["context_length"]}


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
