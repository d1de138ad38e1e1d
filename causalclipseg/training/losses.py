"""Losses: the only place where labels meet predictions.

Segmentation loss: Dice + BCE with weights 0.5/0.5 (the QaTa/LViT convention), MONAI's ``DiceCELoss``.

The adversarial min-max game of the causal module is implemented as gradient reversal (chosen over
alternating updates because it needs one forward and one backward pass per step, which matters on a
CPU). :meth:`CausalCLIPSeg.forward_aux` puts a gradient-reversal layer between the confounding parts
and the shared decoder, so one loss term, the confounder head's segmentation loss ``L_conf``, is
*minimised* by the decoder and confounder projector and *maximised* by the encoders, neck and mask
generators. The training engine ramps the reversal coefficient from 0 (DANN schedule), so the head
learns to read the confounding parts before the trunk starts hiding the lesion from it.

An unbounded maximisation diverges: the trunk could push the confounder logits to any magnitude of
the wrong sign. Here the confounder logits are squashed to ``bound * tanh(z / bound)`` before the loss,
so each pixel's BCE is at most ``softplus(bound)`` and the Dice term at most 1: the most the trunk can
gain is finite, and its gradient vanishes as the head's prediction saturates. A confidently inverted
confounder prediction then earns the trunk as much as an uninformative one, which is not what the paper's
game asks for; the ``uninformative`` game (``CausalCLIPSeg.forward_aux(game="uninformative")``) is the
alternative: the head still minimises ``L_conf`` (on confounding parts cut from the trunk), while the trunk
minimises ``BCE(sigmoid(z_trunk), 0.5) - log 2`` on the head's prediction through the head held constant: its
best is a prediction of 0.5 everywhere, bounded below by 0, whatever the head does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn

from ..model.causalclipseg import CausalCLIPSegOutput

__all__ = ["CausalSegLoss", "LossTerms", "segmentation_loss"]


def segmentation_loss(lambda_dice: float = 0.5, lambda_bce: float = 0.5) -> DiceCELoss:
    """Dice + BCE on (B, 1, H, W) logits and {0, 1} labels (sigmoid; Dice per image, then averaged)."""
    return DiceCELoss(sigmoid=True, lambda_dice=lambda_dice, lambda_ce=lambda_bce)


@dataclass
class LossTerms:
    """The total loss and its parts (parts detached, for logging)."""

    total: torch.Tensor  # what to call backward() on
    segmentation: torch.Tensor  # Dice + BCE of the causal prediction
    confounder: torch.Tensor  # bounded Dice + BCE of the confounder prediction (0 without the module)
    uninformative: torch.Tensor  # the trunk's term of the uninformative game (0 in the reversal game)


class CausalSegLoss(nn.Module):
    """``L = L_seg(causal) + confounder_weight * (L_conf(bounded confounder) + L_uninformative)``.

    Args:
        lambda_dice: weight of Dice in both terms.
        lambda_bce: weight of BCE in both terms.
        confounder_weight: weight of the confounder term (the adversarial strength is the model's
            reversal coefficient times this).
        logit_bound: confounder logits are mapped to ``bound * tanh(z / bound)`` (see module docstring).
    """

    def __init__(self, lambda_dice: float = 0.5, lambda_bce: float = 0.5, confounder_weight: float = 1.0,
                 logit_bound: float = 5.0) -> None:
        super().__init__()
        if logit_bound <= 0:
            raise ValueError(f"logit_bound must be > 0, got {logit_bound}")
        if lambda_dice < 0 or lambda_bce < 0 or lambda_dice + lambda_bce == 0:
            raise ValueError(f"lambda_dice and lambda_bce must be >= 0 and not both 0, "
                             f"got {lambda_dice} and {lambda_bce}")
        if confounder_weight < 0:
            raise ValueError(f"confounder_weight must be >= 0, got {confounder_weight}")
        self.seg = segmentation_loss(lambda_dice, lambda_bce)
        self.confounder_weight = confounder_weight
        self.logit_bound = logit_bound

    def forward(self, output: CausalCLIPSegOutput, label: torch.Tensor) -> LossTerms:
        """output: from ``forward_aux``; label: (B, 1, H, W) in {0, 1} -> :class:`LossTerms`."""
        seg = self.seg(output.logits, label)
        conf = uninformative = torch.zeros((), device=seg.device)
        if output.confounder_logits is not None:
            bounded = self.logit_bound * torch.tanh(output.confounder_logits / self.logit_bound)
            conf = self.seg(bounded, label)
        if output.trunk_confounder_logits is not None:
            z = output.trunk_confounder_logits
            uninformative = F.binary_cross_entropy_with_logits(z, torch.full_like(z, 0.5)) - math.log(2.0)
        return LossTerms(total=seg + self.confounder_weight * (conf + uninformative), segmentation=seg.detach(),
                         confounder=conf.detach(), uninformative=uninformative.detach())
