"""CausalCLIPSeg: CLIP encoders, cross-modal decoder, causal intervention, text-to-pixel projector."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..data.prompts import check_prompt_side
from ..tokenizer import PromptTokenizer
from .causal import CausalIntervention
from .config import GAMES, CausalCLIPSegConfig
from .decoder import CrossModalDecoder, LevelNeck, TextPixelProjector
from .encoders import TextEncoder, TextFeatures, build_image_encoder
from .layers import grad_reverse, grad_scale

logger = logging.getLogger(__name__)

__all__ = ["GAMES", "CausalCLIPSeg", "CausalCLIPSegOutput", "PromptSideRecord"]


_SIDE_KEY = "viewer_side_prompts"


class PromptSideRecord:
    """Mixin for the models: the laterality convention of the prompts the weights were trained with, kept in the
    state dict (a bool buffer ``viewer_side_prompts``), so that every checkpoint, the shipped weights and the
    bundle's ``model.pt`` carry it. See :mod:`causalclipseg.data.prompts` for the conventions.

    Checkpoints written before it was recorded load as ``viewer``: every model trained here until then learned
    QaTa-COV19's captions as written, which name the viewer's side.
    """

    def _init_prompt_side(self, side: str = "patient") -> None:
        self.register_buffer(_SIDE_KEY, torch.tensor(check_prompt_side(side) == "viewer"))
        self.register_load_state_dict_pre_hook(_complete_prompt_side)

    @property
    def prompt_side(self) -> str:
        """``patient`` or ``viewer``: whose left the model's "left" is."""
        return "viewer" if bool(getattr(self, _SIDE_KEY)) else "patient"

    @prompt_side.setter
    def prompt_side(self, side: str) -> None:
        getattr(self, _SIDE_KEY).fill_(check_prompt_side(side) == "viewer")


def _complete_prompt_side(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: a checkpoint without the record is from before it existed (viewer's side)."""
    if prefix + _SIDE_KEY not in state_dict:
        logger.info("checkpoint has no prompt-side record: taken as trained on QaTa-COV19 captions as written "
                    "(the viewer's side)")
        state_dict[prefix + _SIDE_KEY] = torch.tensor(True)


@dataclass
class CausalCLIPSegOutput:
    """Everything :meth:`CausalCLIPSeg.forward_aux` computes."""

    logits: torch.Tensor  # (B, 1, H, W) causal prediction, the one :meth:`CausalCLIPSeg.forward` returns
    confounder_logits: torch.Tensor | None  # (B, 1, H, W) from the confounding parts; None without the module
    masks: list[torch.Tensor]  # causal masks per level, (B, dim, H/8), (B, dim, H/16), (B, dim, H/32); [] without
    trunk_confounder_logits: torch.Tensor | None = None  # (B, 1, H, W), the ``uninformative`` game's trunk path


class CausalCLIPSeg(PromptSideRecord, nn.Module):
    """Text-prompted segmentation with a causal intervention module (Chen et al., MICCAI 2024).

    Image and prompt are encoded by CLIP (open_clip); the three image levels are projected to one width
    and, with the causal module on, split by learned soft masks into causal and confounding parts. The
    causal parts go through the cross-modal decoder and the text-to-pixel projector to the output; the
    confounding parts go through the same decoder and a second projector to the confounder prediction,
    behind a gradient-reversal layer: the decoder and the confounder projector learn to find the lesion
    in the confounding parts, while the encoders, neck and mask generators receive the reversed gradient
    and learn to leave nothing there to find (the min-max game; the bounded objective is in
    :class:`causalclipseg.training.losses.CausalSegLoss`). At inference only the causal prediction is computed.

    Build it with :func:`causalclipseg.create_model`, which also loads weights. :attr:`prompt_side` tells whose
    left the model's "left" is (:func:`causalclipseg.data.prompts.to_model_side` translates prompts to it).

    Args:
        config: the architecture.
        clip: an open_clip ``CLIP`` whose image tower and text modules become the encoders (shared, not copied).
    """

    def __init__(self, config: CausalCLIPSegConfig, clip: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = build_image_encoder(clip.visual, config.clip.vit_feature_blocks,
                                                 fine=config.projector.fine_skip)
        self.text_encoder = TextEncoder(clip, config.clip.context_length)
        self.tokenizer = PromptTokenizer(config.clip.context_length)
        dim, text_dim = config.decoder.dim, self.text_encoder.out_dim
        dec, proj = config.decoder, config.projector
        self.neck = LevelNeck(self.image_encoder.out_channels, dim)
        self.decoder = CrossModalDecoder(dim, text_dim, dec.sentence_gate, dec.num_layers, dec.num_heads,
                                         dec.ffn_dim, dec.dropout)
        fine = self.image_encoder.fine_channels
        self.projector = TextPixelProjector(dim, text_dim, proj.stride, proj.kernel_size, fine)
        self.intervention = (CausalIntervention([dim] * 3, config.causal.hidden, config.causal.generator)
                             if config.causal.enabled else None)
        self.confounder_projector = (TextPixelProjector(dim, text_dim, proj.stride, proj.kernel_size, fine)
                                     if config.causal.enabled else None)
        self._init_prompt_side()  # set by the trainer to its data's convention

    def tokenize(self, prompts: str | Sequence[str], allow_empty: bool = False) -> torch.Tensor:
        """Token ids (N, context_length) for ``forward``; see :class:`~causalclipseg.tokenizer.PromptTokenizer`."""
        return self.tokenizer(prompts, allow_empty=allow_empty)

    def encoder_modules(self) -> list[nn.Module]:
        """The CLIP towers, which train at a lower learning rate than the rest."""
        return [self.image_encoder, self.text_encoder]

    def _check_inputs(self, image: torch.Tensor,
                      text: torch.Tensor | Sequence[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(image, torch.Tensor) or image.ndim != 4:
            raise ValueError(f"image must be a (B, C, H, W) tensor, got {getattr(image, 'shape', type(image))}")
        if image.shape[1] not in (1, 3):
            raise ValueError(f"image must have 1 or 3 channels, got {image.shape[1]} (shape {tuple(image.shape)})")
        if image.shape[2] % 32 or image.shape[3] % 32:
            raise ValueError(f"image height and width must be divisible by 32, got {tuple(image.shape[2:])}")
        if text is None:
            text = self.tokenize("", allow_empty=True).to(image.device)
        if isinstance(text, (list, tuple)):  # token ids as a plain list, as MONAI's bundle tools pass them
            text = torch.as_tensor(text, dtype=torch.int64, device=image.device)
            text = text[None] if text.ndim == 1 else text
        if not isinstance(text, torch.Tensor) or text.ndim != 2 or text.dtype not in (torch.int64, torch.int32):
            raise TypeError("text must be a (B, L) integer tensor of token ids (use model.tokenize), got "
                            f"{getattr(text, 'shape', type(text))} {getattr(text, 'dtype', '')}")
        if text.shape[1] > self.text_encoder.context_length:
            raise ValueError(f"text has {text.shape[1]} tokens, more than context_length "
                             f"{self.text_encoder.context_length}")
        b = image.shape[0]
        if text.shape[0] not in (1, b):
            raise ValueError(f"text batch must be 1 or match the image batch {b}, got {text.shape[0]}")
        # plain tensors: subclasses such as MONAI's MetaTensor would track metadata through every reshape
        image, text = image.as_subclass(torch.Tensor), text.as_subclass(torch.Tensor)
        return image.expand(-1, 3, -1, -1), text.expand(b, -1)

    def _encode(self, image: torch.Tensor,
                text: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None, TextFeatures]:
        """-> the three levels after the neck, the stride-4 level (``projector.fine_skip``; else None), the text."""
        image, text = self._check_inputs(image, text)
        levels = self.image_encoder(image)
        fine = levels.pop(0) if self.image_encoder.fine_channels else None
        return self.neck(levels), fine, self.text_encoder(text)

    def _predict(self, levels: list[torch.Tensor], fine: torch.Tensor | None, text: TextFeatures,
                 projector: TextPixelProjector, size: torch.Size) -> torch.Tensor:
        logits = projector(self.decoder(levels, text), levels[0], text.sentence, fine)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def forward(self, image: torch.Tensor, text: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """Segment.

        Args:
            image: (B, C, H, W), C = 1 or 3, H and W multiples of 32, normalised as CLIP expects.
            text: (B, L) or (1, L) token ids from :meth:`tokenize` (a plain list of ids is taken too); a batch of 1
                is broadcast to B. ``None`` is the empty prompt: what the model predicts with no description (how
                generic tools such as MONAI's ``verify_net_in_out`` call a network; not a way to segment).

        Returns:
            logits (B, 1, H, W) of the causal prediction.

        Raises:
            ValueError: on a wrong rank, channel count, size or batch.
            TypeError: if ``text`` is not an integer tensor.
        """
        levels, fine, txt = self._encode(image, text)
        if self.intervention is not None:
            levels = self.intervention(levels).causal
        return self._predict(levels, fine, txt, self.projector, image.shape[-2:])

    @property
    def explanation_maps(self) -> tuple[str, ...]:
        """The maps :meth:`explain` gives, by name (:data:`causalclipseg.io.writers.EXPLANATION_MAPS`): the lesion
        probability (the sigmoid of its logits), and with the causal module the causal mask."""
        return ("probability", "causal_mask") if self.intervention is not None else ("probability",)

    def explain(self, image: torch.Tensor, text: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """The prediction and what the causal module kept for it, as channels on the image's grid.

        Args:
            image, text: as in :meth:`forward`.

        Returns:
            (B, C, H, W): channel 0 the logits of :meth:`forward` (the probability map is their sigmoid); with the
            causal module (C = 2) channel 1 the causal mask, in [0, 1]: each level's mask generator output averaged
            over its channels, resized to the image (bilinear) and averaged over the levels (1: the level's features
            were kept as causal, 0: handed to the confounder). Without it (C = 1) only the logits:
            :attr:`explanation_maps` names what the channels give.

        Raises:
            ValueError: as :meth:`forward`.
        """
        if self.intervention is None:
            return self(image, text)
        levels, fine, txt = self._encode(image, text)
        split = self.intervention(levels)
        size = image.shape[-2:]
        logits = self._predict(split.causal, fine, txt, self.projector, size)
        masks = [F.interpolate(m.mean(dim=1, keepdim=True), size=size, mode="bilinear", align_corners=False)
                 for m in split.masks]
        return torch.cat([logits, torch.stack(masks).mean(dim=0)], dim=1)

    def forward_aux(self, image: torch.Tensor, text: torch.Tensor, reversal: float = 1.0,
                    game: str = "reversal") -> CausalCLIPSegOutput:
        """Segment and return the auxiliary outputs the loss and the explanation heatmaps need.

        Args:
            image, text: as in :meth:`forward`.
            reversal: strength of the trunk's side of the min-max game (>= 0); the training engine ramps it up
                from 0. ``reversal`` game: the gradient-reversal coefficient between the confounding parts and the
                decoder. ``uninformative`` game: the gradient scale of the trunk path.
            game: one of :data:`GAMES`. ``uninformative`` returns two confounder predictions: ``confounder_logits``
                from the confounding parts cut from the trunk (the head learns to find the lesion there) and
                ``trunk_confounder_logits`` through the head with its weights held constant (the trunk learns to
                make it uninformative); one extra decoder pass in training.

        Returns:
            :class:`CausalCLIPSegOutput`.

        Raises:
            ValueError: for an unknown game.
        """
        if game not in GAMES:
            raise ValueError(f"game must be one of {', '.join(GAMES)}, got {game!r}")
        levels, fine, txt = self._encode(image, text)
        size = image.shape[-2:]
        if self.intervention is None:
            return CausalCLIPSegOutput(self._predict(levels, fine, txt, self.projector, size), None, [])
        split = self.intervention(levels)
        logits = self._predict(split.causal, fine, txt, self.projector, size)
        if game == "reversal":
            confounding = [grad_reverse(x, reversal) for x in split.confounding]
            return CausalCLIPSegOutput(logits, self._predict(confounding, fine, txt, self.confounder_projector, size),
                                       split.masks)
        head = self._predict([x.detach() for x in split.confounding], fine, txt, self.confounder_projector, size)
        trunk = self._predict_with_constant_head([grad_scale(x, reversal) for x in split.confounding], fine, txt, size)
        return CausalCLIPSegOutput(logits, head, split.masks, trunk_confounder_logits=trunk)

    def _predict_with_constant_head(self, levels: list[torch.Tensor], fine: torch.Tensor | None,
                                    text: TextFeatures, size: torch.Size) -> torch.Tensor:
        """The confounder prediction with the decoder's and confounder projector's weights (and the text) held
        constant: its gradient reaches only ``levels``, i.e. the trunk."""
        def constant(module: nn.Module) -> dict[str, torch.Tensor]:
            return {**{n: p.detach() for n, p in module.named_parameters()}, **dict(module.named_buffers())}

        txt = TextFeatures(text.words.detach(), text.sentence.detach(), text.pad_mask)
        fused = functional_call(self.decoder, constant(self.decoder), (levels, txt))
        logits = functional_call(self.confounder_projector, constant(self.confounder_projector),
                                 (fused, levels[0], txt.sentence, fine))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
