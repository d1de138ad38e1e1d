"""CLIP image and text encoders from open_clip, reshaped for dense prediction.

The encoders wrap the open_clip modules themselves (never copies), so CLIP weights loaded through
open_clip land in them unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from torch import nn

__all__ = ["TextFeatures", "ResNetImageEncoder", "ViTImageEncoder", "TextEncoder", "build_image_encoder"]


def _resize_grid_embedding(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize a (1 + g*g, C) position embedding (class token first) to (1 + h*w, C), bicubic."""
    n, c = pos.shape
    side = math.isqrt(int(n) - 1)  # int(): under torch.jit.trace shapes are tensors
    if (side, side) == grid:
        return pos
    table = pos[1:].reshape(1, side, side, c).permute(0, 3, 1, 2)  # (1, C, g, g)
    table = F.interpolate(table, size=grid, mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], table.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], c)])  # (1 + h*w, C)


class ResNetImageEncoder(nn.Module):
    """Levels C3, C4, C5 (strides 8, 16, 32) of a CLIP ModifiedResNet, and C2 (stride 4) first when ``fine``.

    C5 is the attention-pool output kept spatial (every token queries, not only the mean token, as in
    CRIS), with the pool's position embedding resized to the input, so any multiple of 32 works.
    """

    def __init__(self, visual: ModifiedResNet, fine: bool = False) -> None:
        super().__init__()
        self.visual = visual
        pool = visual.attnpool
        self.out_channels = (
            visual.layer2[-1].conv3.out_channels,
            visual.layer3[-1].conv3.out_channels,
            pool.c_proj.out_features,
        )
        self.fine_channels = visual.layer1[-1].conv3.out_channels if fine else 0  # C2's; 0: not returned

    def _spatial_attnpool(self, x: torch.Tensor) -> torch.Tensor:
        pool = self.visual.attnpool
        b, c, h, w = x.shape
        x = x.flatten(2).permute(2, 0, 1)  # (B, C, H, W) -> (HW, B, C)
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)  # (1 + HW, B, C)
        x = x + _resize_grid_embedding(pool.positional_embedding, (h, w))[:, None, :].to(x.dtype)
        x, _ = F.multi_head_attention_forward(
            query=x, key=x, value=x, embed_dim_to_check=c, num_heads=pool.num_heads,
            q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=pool.c_proj.weight, out_proj_bias=pool.c_proj.bias,
            use_separate_proj_weight=True, training=self.training, need_weights=False,
        )  # (1 + HW, B, D)
        return x[1:].permute(1, 2, 0).reshape(b, -1, h, w)  # (B, D, H, W)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """image: (B, 3, H, W) -> [C3 (B, c3, H/8, W/8), C4 (B, c4, H/16, W/16), C5 (B, c5, H/32, W/32)], preceded
        by C2 (B, c2, H/4, W/4) when ``fine``."""
        v = self.visual
        c2 = v.layer1(v.stem(image.to(v.conv1.weight.dtype)))
        c3 = v.layer2(c2)
        c4 = v.layer3(c3)
        c5 = self._spatial_attnpool(v.layer4(c4))
        return [c2, c3, c4, c5] if self.fine_channels else [c3, c4, c5]


class ViTImageEncoder(nn.Module):
    """Levels at strides 8, 16, 32 from a CLIP VisionTransformer with patch size 16.

    Tokens of two intermediate blocks and of the last block (after ``ln_post`` and the projection)
    are reshaped to maps at stride 16, then resampled: the first upsampled to stride 8, the last
    average-pooled to stride 32. The position embedding is resized to the input grid.
    """

    def __init__(self, visual: VisionTransformer, feature_blocks: tuple[int, int]) -> None:
        super().__init__()
        if tuple(visual.patch_size) != (16, 16):
            raise ValueError(f"ViT encoders need patch size 16 for the stride-16 level, got {visual.patch_size}")
        depth = len(visual.transformer.resblocks)
        if not 0 <= feature_blocks[0] < feature_blocks[1] < depth - 1:
            raise ValueError(f"vit_feature_blocks must be increasing block indices below {depth - 1}, "
                             f"got {feature_blocks}")
        self.visual = visual
        self.feature_blocks = tuple(feature_blocks)
        width = visual.conv1.out_channels
        self.out_channels = (width, width, visual.output_dim)
        self.fine_channels = 0  # no stride-4 level

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """image: (B, 3, H, W) -> three maps at strides 8, 16, 32 (see class docstring)."""
        v = self.visual
        b, _, h, w = image.shape
        grid = (h // 16, w // 16)
        x = v.conv1(image.to(v.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # (B, h*w, width)
        x = torch.cat([v.class_embedding.expand(b, 1, -1).to(x.dtype), x], dim=1)  # (B, 1 + h*w, width)
        x = v.ln_pre(v.patch_dropout(x + _resize_grid_embedding(v.positional_embedding, grid).to(x.dtype)))
        transformer = v.transformer
        x = x if transformer.batch_first else x.transpose(0, 1)
        taken = []
        for i, block in enumerate(transformer.resblocks):
            x = block(x)
            if i in self.feature_blocks:
                taken.append(x if transformer.batch_first else x.transpose(0, 1))
        last = x if transformer.batch_first else x.transpose(0, 1)
        taken.append(v.ln_post(last) @ v.proj)  # (B, 1 + h*w, output_dim)

        def to_map(tokens: torch.Tensor) -> torch.Tensor:
            return tokens[:, 1:].transpose(1, 2).reshape(b, -1, *grid)  # (B, C, h, w), class token dropped

        c3, c4, c5 = (to_map(t) for t in taken)
        c3 = F.interpolate(c3, scale_factor=2.0, mode="bilinear", align_corners=False)  # stride 8
        c5 = F.avg_pool2d(c5, 2)  # stride 32
        return [c3, c4, c5]


def build_image_encoder(visual: nn.Module, vit_feature_blocks: tuple[int, int], fine: bool = False) -> nn.Module:
    """Wrap an open_clip image tower; ``fine``: also return its stride-4 level (ResNet towers only).

    Raises:
        TypeError: for towers other than ModifiedResNet and VisionTransformer.
        ValueError: for ``fine`` with a ViT tower, which has no stride-4 level.
    """
    if isinstance(visual, ModifiedResNet):
        return ResNetImageEncoder(visual, fine)
    if isinstance(visual, VisionTransformer):
        if fine:
            raise ValueError("projector.fine_skip needs a ResNet image tower; a ViT has no stride-4 level")
        return ViTImageEncoder(visual, vit_feature_blocks)
    raise TypeError(f"unsupported open_clip image tower {type(visual).__name__}; use a ResNet or ViT CLIP")


@dataclass
class TextFeatures:
    """Text encoder outputs."""

    words: torch.Tensor  # (B, L, D) every token after the final norm and the text projection
    sentence: torch.Tensor  # (B, D) the end-of-text token, the CLIP sentence embedding
    pad_mask: torch.Tensor  # (B, L) bool, True at padding


class TextEncoder(nn.Module):
    """CLIP text transformer returning word tokens, the sentence vector and the padding mask.

    Uses the first ``context_length`` rows of CLIP's position embedding and causal mask, so weights
    trained at 77 tokens load unchanged and short prompts cost only their length.
    """

    def __init__(self, clip: nn.Module, context_length: int) -> None:
        super().__init__()
        if context_length > clip.positional_embedding.shape[0]:
            raise ValueError(f"context_length {context_length} exceeds the CLIP text model's "
                             f"{clip.positional_embedding.shape[0]} positions")
        self.context_length = context_length
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        proj = clip.text_projection
        self.out_dim = proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]

    def forward(self, text: torch.Tensor) -> TextFeatures:
        """text: (B, L) token ids with L <= context_length -> :class:`TextFeatures`."""
        length = text.shape[1]
        x = self.token_embedding(text) + self.positional_embedding[:length]  # (B, L, width)
        x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
        x = self.ln_final(x)
        proj = self.text_projection
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj  # (B, L, D)
        eot = text.argmax(dim=-1)  # end-of-text has the highest id in the CLIP vocabulary
        sentence = x[torch.arange(x.shape[0], device=x.device), eot]  # (B, D)
        return TextFeatures(words=x, sentence=sentence, pad_mask=text == 0)
