"""Cross-modal decoder and text-to-pixel projector.

The decoder brings the three levels to stride 16, fuses them and conditions the fused map on the
prompt twice (each switchable): a sentence gate on the coarsest level (CRIS) and transformer layers
whose pixels cross-attend to the word tokens. The projector turns the sentence into a per-sample
kernel that is convolved with the visual map: this is where text meets every pixel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .encoders import TextFeatures
from .layers import CoordConv, conv_norm_act, sine_position_encoding

__all__ = ["LevelNeck", "CrossModalDecoder", "TextPixelProjector"]


class LevelNeck(nn.Module):
    """1x1 conv-norm-act per level, bringing every level to ``dim`` channels (strides unchanged)."""

    def __init__(self, in_channels: Sequence[int], dim: int) -> None:
        super().__init__()
        self.proj = nn.ModuleList(conv_norm_act(c, dim, kernel_size=1) for c in in_channels)

    def forward(self, levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """levels: [(B, c_i, H_i, W_i)] -> [(B, dim, H_i, W_i)]."""
        return [proj(x) for proj, x in zip(self.proj, levels)]


class _NoConditioning(nn.Module):
    """A switched-off conditioning step: returns the visual input unchanged."""

    def forward(self, x: torch.Tensor, text: TextFeatures) -> torch.Tensor:
        return x


class SentenceGate(nn.Module):
    """Multiplies a map channel-wise by a projection of the sentence vector."""

    def __init__(self, text_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(text_dim, dim)

    def forward(self, x: torch.Tensor, text: TextFeatures) -> torch.Tensor:
        """x: (B, dim, H, W), text.sentence: (B, D) -> (B, dim, H, W)."""
        return x * self.proj(text.sentence)[:, :, None, None]


class WordCrossAttention(nn.Module):
    """Transformer decoder layers: pixels self-attend, then cross-attend to the word tokens (padding masked)."""

    def __init__(self, dim: int, text_dim: int, num_layers: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.words = nn.Linear(text_dim, dim)
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(dim, num_heads, ffn_dim, dropout, batch_first=True, norm_first=True)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, text: TextFeatures) -> torch.Tensor:
        """x: (B, dim, H, W), text.words: (B, L, D) -> (B, dim, H, W)."""
        b, c, h, w = x.shape
        pixels = x.flatten(2).transpose(1, 2)  # (B, HW, dim)
        pixels = pixels + sine_position_encoding(h, w, c, x.device, x.dtype)
        words = self.words(text.words)  # (B, L, dim)
        for layer in self.layers:
            pixels = layer(pixels, words, memory_key_padding_mask=text.pad_mask)
        return self.norm(pixels).transpose(1, 2).reshape(b, c, h, w)  # (B, dim, H, W)


class CrossModalDecoder(nn.Module):
    """Fuses levels at strides 8/16/32 into one stride-16 map conditioned on the prompt.

    Args:
        dim: channels of each level and of the output.
        text_dim: width of the text features.
        sentence_gate: gate the stride-32 level by the sentence vector.
        num_layers: word cross-attention layers (0 switches them off).
        num_heads, ffn_dim, dropout: settings of those layers.
    """

    def __init__(self, dim: int, text_dim: int, sentence_gate: bool, num_layers: int, num_heads: int,
                 ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.gate = SentenceGate(text_dim, dim) if sentence_gate else _NoConditioning()
        self.fuse = conv_norm_act(3 * dim, dim, kernel_size=3)
        self.coord = CoordConv(dim, dim, kernel_size=3)
        self.cross = (WordCrossAttention(dim, text_dim, num_layers, num_heads, ffn_dim, dropout)
                      if num_layers > 0 else _NoConditioning())

    def forward(self, levels: Sequence[torch.Tensor], text: TextFeatures) -> torch.Tensor:
        """levels: [(B, dim, H/8, W/8), (B, dim, H/16, W/16), (B, dim, H/32, W/32)] -> (B, dim, H/16, W/16)."""
        f3, f4, f5 = levels
        f5 = F.interpolate(self.gate(f5, text), size=f4.shape[-2:], mode="bilinear", align_corners=False)
        fused = self.fuse(torch.cat([F.avg_pool2d(f3, 2), f4, f5], dim=1))
        return self.cross(self.coord(fused), text)


class TextPixelProjector(nn.Module):
    """Upsamples the fused map (with a stride-8 skip, and optionally a stride-4 one) and applies a
    sentence-generated dynamic kernel.

    The public CausalCLIPSeg code runs this at full resolution with 256 channels (about 118 GFLOPs per
    224 px image); here it runs at stride 4 or 8 and the logits are upsampled bilinearly by the model.

    Args:
        dim: channels of the fused map and of the skip.
        text_dim: width of the sentence vector.
        stride: output stride, 4 or 8.
        kernel_size: size of the dynamic kernel.
        fine_channels: channels of a stride-4 image level merged before the dynamic kernel (stride 4 only);
            0: none.
    """

    def __init__(self, dim: int, text_dim: int, stride: int, kernel_size: int, fine_channels: int = 0) -> None:
        super().__init__()
        self.merge = conv_norm_act(2 * dim, dim, kernel_size=3)  # stride 8: upsampled fused map + skip
        out = dim // 2 if stride == 4 else dim
        self.fine = conv_norm_act(fine_channels, out, kernel_size=1) if fine_channels else None
        self.refine = conv_norm_act(dim + out if fine_channels else dim, out, kernel_size=3)  # at the output stride
        self.vis = nn.Conv2d(out, out, kernel_size=1)
        self.txt = nn.Linear(text_dim, out * kernel_size * kernel_size + 1)  # kernel weights + bias
        self.stride = stride
        self.kernel_size = kernel_size

    def forward(self, fused: torch.Tensor, skip: torch.Tensor, sentence: torch.Tensor,
                fine: torch.Tensor | None = None) -> torch.Tensor:
        """fused: (B, dim, H/16, W/16), skip: (B, dim, H/8, W/8), sentence: (B, D), fine: (B, fine_channels, H/4,
        W/4) when built with a stride-4 skip, else None -> (B, 1, H/s, W/s)."""
        if (fine is None) != (self.fine is None):
            raise ValueError("the stride-4 level must be given exactly when the projector was built with one")
        x = F.interpolate(fused, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        x = self.merge(torch.cat([x, skip], dim=1))
        x = F.interpolate(x, scale_factor=8 / self.stride, mode="bilinear", align_corners=False)
        if self.fine is not None:
            x = torch.cat([x, self.fine(fine)], dim=1)
        x = self.vis(self.refine(x))  # (B, C, h, w)
        b, c, h, w = x.shape
        params = self.txt(sentence)  # (B, C*k*k + 1)
        weight = params[:, :-1].reshape(b, c, self.kernel_size, self.kernel_size)  # one (C, k, k) kernel per sample
        out = F.conv2d(x.reshape(1, b * c, h, w), weight, bias=params[:, -1], padding=self.kernel_size // 2, groups=b)
        return out.reshape(b, 1, h, w)  # (1, B, h, w) -> (B, 1, h, w)
