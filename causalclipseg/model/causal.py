"""Causal intervention module (CausalCLIPSeg, Chen et al., MICCAI 2024).

A small generator per level predicts a soft mask ``m`` with the feature's shape. The causal part
``f * m`` feeds the main prediction; the confounding part ``f * (1 - m)``, the complement of what the
mask keeps ("self-annotated" confounders), feeds a confounder prediction. The adversarial game that
makes the split meaningful is wired in :class:`~causalclipseg.model.causalclipseg.CausalCLIPSeg`
(gradient reversal) and scored in :mod:`causalclipseg.training.losses`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .layers import CoordConv, conv_norm_act

__all__ = ["MaskGenerator", "CausalIntervention", "InterventionOutput"]


class MaskGenerator(nn.Module):
    """A soft mask in (0, 1) with the input's shape: a body, an output convolution, a sigmoid.

    ``light``: CoordConv (3x3) to ``hidden`` channels, then a 1x1 conv (the tiny model's: about 0.17 M parameters
    per level at 64 channels). ``public``: the public CausalCLIPSeg code's ``Masker``: CoordConv, 3x3 conv-norm-act,
    CoordConv (each to ``hidden``), a 3x3 conv back to the input's channels and batch norm (about 9 M parameters per
    level at 512 channels, its RN101 size).

    Args:
        channels: the feature's channels (the mask has as many).
        hidden: channels inside.
        design: ``light`` or ``public``.
    """

    def __init__(self, channels: int, hidden: int, design: str = "light") -> None:
        super().__init__()
        if design == "public":
            self.body = nn.Sequential(CoordConv(channels, hidden), conv_norm_act(hidden, hidden, 3),
                                      CoordConv(hidden, hidden))
            self.out = nn.Sequential(nn.Conv2d(hidden, channels, kernel_size=3, padding=1), nn.BatchNorm2d(channels))
            return
        self.body = CoordConv(channels, hidden, kernel_size=3)
        self.out = nn.Conv2d(hidden, channels, kernel_size=1)
        nn.init.zeros_(self.out.bias)  # masks start near 0.5: no side is favoured before training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> mask (B, C, H, W) in (0, 1)."""
        return torch.sigmoid(self.out(self.body(x)))


@dataclass
class InterventionOutput:
    """Causal and confounding parts of every level, and the masks that split them."""

    causal: list[torch.Tensor]  # f * m per level
    confounding: list[torch.Tensor]  # f * (1 - m) per level
    masks: list[torch.Tensor]  # m per level, (B, C, H, W)


class CausalIntervention(nn.Module):
    """One mask generator per level."""

    def __init__(self, channels: Sequence[int], hidden: int, design: str = "light") -> None:
        super().__init__()
        self.generators = nn.ModuleList(MaskGenerator(c, hidden, design) for c in channels)

    def forward(self, levels: Sequence[torch.Tensor]) -> InterventionOutput:
        """levels: [(B, C_i, H_i, W_i)] -> :class:`InterventionOutput` with tensors of the same shapes."""
        masks = [gen(x) for gen, x in zip(self.generators, levels)]
        return InterventionOutput(
            causal=[x * m for x, m in zip(levels, masks)],
            confounding=[x * (1 - m) for x, m in zip(levels, masks)],
            masks=masks,
        )
