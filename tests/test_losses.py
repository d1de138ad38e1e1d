"""Losses: Dice + BCE, and the bounded confounder term."""

from __future__ import annotations

import math

import pytest
import torch

from causalclipseg.model.causalclipseg import CausalCLIPSegOutput
from causalclipseg.training.losses import CausalSegLoss
from causalclipseg.training.trainer import reversal_coefficient


def _output(logits, confounder=None):
    return CausalCLIPSegOutput(logits=logits, confounder_logits=confounder, masks=[])


def test_perfect_prediction_has_low_loss_and_wrong_has_high():
    label = torch.zeros(2, 1, 8, 8)
    label[:, :, 2:6, 2:6] = 1
    good = CausalSegLoss()(_output(label * 40 - 20), label)
    bad = CausalSegLoss()(_output(20 - label * 40), label)
    assert good.segmentation < 0.01
    assert bad.segmentation > 5
    assert good.confounder == 0 and good.total == good.segmentation


@pytest.mark.parametrize("weights", [{}, {"lambda_dice": 0.8, "lambda_bce": 0.2},
                                     {"lambda_dice": 1.0, "lambda_bce": 0.0}])
def test_dice_bce_weights(weights):
    label = torch.zeros(1, 1, 4, 4)
    label[..., :2, :] = 1
    logits = torch.zeros(1, 1, 4, 4)  # p = 0.5 everywhere
    terms = CausalSegLoss(**weights)(_output(logits), label)
    dice = 1 - (2 * 4 + 1e-5) / (8 + 8 + 1e-5)  # MONAI smoothing 1e-5
    expected = weights.get("lambda_dice", 0.5) * dice + weights.get("lambda_bce", 0.5) * math.log(2)
    assert terms.segmentation.item() == pytest.approx(expected, rel=1e-4)


def test_confounder_term_is_bounded_and_has_finite_gradient():
    label = torch.ones(1, 1, 4, 4)
    loss = CausalSegLoss(logit_bound=5.0)
    for magnitude in (1e2, 1e6):
        conf = torch.full((1, 1, 4, 4), -magnitude, requires_grad=True)  # confidently wrong
        terms = loss(_output(torch.zeros(1, 1, 4, 4), conf), label)
        assert terms.confounder.item() <= 0.5 * 1 + 0.5 * math.log1p(math.exp(5.0)) + 1e-4
        terms.total.backward()
        assert torch.isfinite(conf.grad).all()


def test_reversal_ramp():
    assert reversal_coefficient(0.0, 0.5) == 0
    assert reversal_coefficient(1.0, 0.5) == pytest.approx(0.5, abs=1e-4)
    values = [reversal_coefficient(p / 10, 1.0) for p in range(11)]
    assert values == sorted(values)


@pytest.mark.parametrize("kwargs, match", [({"logit_bound": 0}, "logit_bound"), ({"confounder_weight": -1},
                                                                                   "confounder_weight"),
                                           ({"lambda_dice": -0.1}, "lambda_dice"),
                                           ({"lambda_dice": 0, "lambda_bce": 0}, "not both 0")])
def test_bad_loss_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CausalSegLoss(**kwargs)
