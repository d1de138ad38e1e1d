"""Small building blocks defined once: conv-norm-act, CoordConv, gradient reversal, 2-D position encoding."""

from __future__ import annotations

import math

import torch
from monai.networks.blocks import Convolution
from torch import nn

__all__ = ["conv_norm_act", "CoordConv", "grad_reverse", "grad_scale", "sine_position_encoding"]


def conv_norm_act(in_channels: int, out_channels: int, kernel_size: int = 3) -> Convolution:
    """2-D convolution, batch norm, ReLU (MONAI's ``Convolution`` block)."""
    return Convolution(2, in_channels, out_channels, kernel_size=kernel_size, act="RELU", norm="BATCH", bias=False)


def _coordinates(x: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) normalised x and y coordinates in [-1, 1] for a (B, C, H, W) tensor."""
    b, _, h, w = x.shape
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
    return torch.stack([grid_x, grid_y]).expand(b, 2, h, w)


class CoordConv(nn.Module):
    """Conv-norm-act that also sees the pixel coordinates (Liu et al. 2018), as CRIS uses for location words."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = conv_norm_act(in_channels + 2, out_channels, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, out_channels, H, W)."""
        return self.conv(torch.cat([x, _coordinates(x)], dim=1))


class _GradientScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, coeff: float) -> torch.Tensor:  # noqa: D102
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        return ctx.coeff * grad, None


def grad_reverse(x: torch.Tensor, coeff: float) -> torch.Tensor:
    """Identity forward; multiplies the gradient by ``-coeff`` backward (Ganin & Lempitsky 2015).

    Raises:
        ValueError: if ``coeff`` is negative.
    """
    if coeff < 0:
        raise ValueError(f"gradient-reversal coeff must be >= 0, got {coeff}")
    return _GradientScale.apply(x, -float(coeff))


def grad_scale(x: torch.Tensor, coeff: float) -> torch.Tensor:
    """Identity forward; multiplies the gradient by ``coeff`` (>= 0) backward: a term's strength on what lies before.

    Raises:
        ValueError: if ``coeff`` is negative.
    """
    if coeff < 0:
        raise ValueError(f"gradient scale coeff must be >= 0, got {coeff}")
    return _GradientScale.apply(x, float(coeff))


def sine_position_encoding(h: int, w: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(H*W, dim) fixed 2-D sine/cosine position encoding (DETR), half the channels for y, half for x."""
    if dim % 4:
        raise ValueError(f"position-encoding dim must be divisible by 4, got {dim}")
    quarter = dim // 4
    freqs = torch.exp(torch.arange(quarter, device=device, dtype=torch.float32) * (-math.log(10000.0) / quarter))
    ys = torch.arange(h, device=device, dtype=torch.float32)[:, None] * freqs  # (H, dim/4)
    xs = torch.arange(w, device=device, dtype=torch.float32)[:, None] * freqs  # (W, dim/4)
    enc_y = torch.cat([ys.sin(), ys.cos()], dim=1)[:, None, :].expand(h, w, 2 * quarter)
    enc_x = torch.cat([xs.sin(), xs.cos()], dim=1)[None, :, :].expand(h, w, 2 * quarter)
    return torch.cat([enc_y, enc_x], dim=2).reshape(h * w, dim).to(dtype)  # (H*W, dim)
