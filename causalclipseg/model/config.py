"""Typed model configuration: one JSON file in ``model_configs/`` parses into :class:`CausalCLIPSegConfig` (or,
with a ``unet`` section, into :class:`UNetBaselineConfig`, the vision-only baseline of the experiments)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = ["GAMES", "ClipConfig", "DecoderConfig", "ProjectorConfig", "CausalConfig", "CausalCLIPSegConfig",
           "UNetBaselineConfig"]


#: How the min-max game between the confounder head and the trunk is played
#: (:meth:`causalclipseg.model.causalclipseg.CausalCLIPSeg.forward_aux`; the trainer's ``game``):
#: ``reversal``: the trunk maximises the head's (bounded) segmentation loss through gradient reversal;
#: ``uninformative``: the trunk drives the head's prediction towards 0.5 (nothing left to find), the head still
#: minimises its segmentation loss; the two objectives reach their players through separate paths.
GAMES = ("reversal", "uninformative")


@dataclass
class ClipConfig:
    """Which open_clip architecture supplies the image and text encoders."""

    name: str | None = None  # open_clip built-in architecture ("RN50", "RN101", "ViT-B-16"); its tags load weights
    model_cfg: dict[str, Any] | None = None  # inline open_clip model config, for variants open_clip does not ship
    context_length: int = 32  # prompt token slots incl. start/end; QaTa captions need 22
    vit_feature_blocks: tuple[int, int] = (3, 7)  # ViT only: blocks (0-based) giving the stride-8 and -16 levels

    def __post_init__(self) -> None:
        if (self.name is None) == (self.model_cfg is None):
            raise ValueError(f"clip needs exactly one of 'name' or 'model_cfg', got name={self.name!r} and "
                             f"model_cfg={'set' if self.model_cfg is not None else None}")
        if self.context_length < 24:
            raise ValueError(f"clip.context_length must be at least 24 (QaTa captions need 22), "
                             f"got {self.context_length}")
        self.vit_feature_blocks = tuple(self.vit_feature_blocks)


@dataclass
class DecoderConfig:
    """Cross-modal decoder: fuses the three levels at stride 16 and conditions them on the prompt."""

    dim: int = 256  # channels of every level after projection, and of the fused map
    sentence_gate: bool = True  # gate the stride-32 level by the sentence vector before fusion (CRIS)
    num_layers: int = 1  # transformer layers with cross-attention to the word tokens; 0 switches them off
    num_heads: int = 8  # attention heads in those layers
    ffn_dim: int = 1024  # feed-forward width in those layers
    dropout: float = 0.1  # dropout in those layers


@dataclass
class ProjectorConfig:
    """Text-to-pixel projector: a per-sample dynamic kernel from the sentence, applied to the visual map."""

    stride: int = 4  # output stride of the logits before bilinear upsampling to the input; 4 or 8
    kernel_size: int = 3  # size of the dynamic kernel
    fine_skip: bool = False  # also merge the image tower's stride-4 level (ResNet towers; needs stride 4)

    def __post_init__(self) -> None:
        if self.stride not in (4, 8):
            raise ValueError(f"projector.stride must be 4 or 8, got {self.stride}")
        if self.fine_skip and self.stride != 4:
            raise ValueError(f"projector.fine_skip merges a stride-4 level, so it needs stride 4, got {self.stride}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"projector.kernel_size must be odd, got {self.kernel_size}")


#: mask generator designs (:class:`causalclipseg.model.causal.MaskGenerator`)
MASK_GENERATORS = ("light", "public")


@dataclass
class CausalConfig:
    """Causal intervention module: per-level soft masks split features into causal and confounding parts."""

    enabled: bool = True  # off: no masks, no confounder branch (the ablation)
    hidden: int = 64  # channels inside each mask generator
    generator: str = "light"  # "light": CoordConv, 1x1 conv; "public": the public code's Masker (CoordConv, 3x3
    # conv-norm-act, CoordConv, 3x3 conv, batch norm; its hidden width is the feature width there: 512 for RN101)

    def __post_init__(self) -> None:
        if self.generator not in MASK_GENERATORS:
            raise ValueError(f"causal.generator must be one of {', '.join(MASK_GENERATORS)}, got {self.generator!r}")


@dataclass
class CausalCLIPSegConfig:
    """Whole-model configuration."""

    clip: ClipConfig
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    causal: CausalConfig = field(default_factory=CausalConfig)
    image_size: int = 224  # training and default inference size; any multiple of 32 runs

    def __post_init__(self) -> None:
        if self.image_size % 32:
            raise ValueError(f"image_size must be divisible by 32, got {self.image_size}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CausalCLIPSegConfig:
        """Build from a parsed JSON config, rejecting unknown keys by name.

        Raises:
            ValueError: on an unknown key or a missing ``clip`` section.
        """
        sections = {"clip": ClipConfig, "decoder": DecoderConfig, "projector": ProjectorConfig,
                    "causal": CausalConfig}
        _check_keys("model config", data, set(sections) | {"image_size"})
        if "clip" not in data:
            raise ValueError("model config needs a 'clip' section")
        kwargs: dict[str, Any] = {}
        for key, section_cls in sections.items():
            if key in data:
                _check_keys(key, data[key], {f.name for f in fields(section_cls)})
                kwargs[key] = section_cls(**data[key])
        if "image_size" in data:
            kwargs["image_size"] = data["image_size"]
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict that :meth:`from_dict` reads back."""
        return asdict(self)


def _check_keys(where: str, data: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; allowed: {sorted(allowed)}")


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
