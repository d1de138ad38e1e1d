"""The min-max game's variants: which player each objective reaches, the public code's mask generators, and the
measurements that say whether the game works (causal-mask statistics, mirrored-input evaluation)."""

from __future__ import annotations

import json

import pytest
import torch
from monai.data import DataLoader, Dataset

from causalclipseg import create_model
from causalclipseg.data.datasets import read_dataset
from causalclipseg.data.pipelines import get_val_transforms
from causalclipseg.evaluation.evaluate import causal_statistics, evaluate_model
from causalclipseg.model.causal import MaskGenerator
from causalclipseg.training.losses import CausalSegLoss

from .conftest import register_config, write_datalist


def _grads(model: torch.nn.Module, loss: torch.Tensor, modules: dict[str, torch.nn.Module]) -> dict[str, float]:
    """Total absolute gradient of ``loss`` reaching each module's parameters."""
    params = {name: list(m.parameters()) for name, m in modules.items()}
    flat = [p for group in params.values() for p in group]
    grads = torch.autograd.grad(loss, flat, retain_graph=True, allow_unused=True)
    out, i = {}, 0
    for name, group in params.items():
        out[name] = sum(float(g.abs().sum()) for g in grads[i:i + len(group)] if g is not None)
        i += len(group)
    return out


def test_uninformative_game_sends_each_objective_to_its_own_player():
    model = create_model("tiny").train()
    image, label = torch.randn(2, 3, 224, 224), (torch.rand(2, 1, 224, 224) > 0.7).float()
    text = model.tokenize(["lower left lung", "upper right lung"])
    with torch.no_grad():  # one head, two paths: equal without dropout
        evaluated = model.eval().forward_aux(image, text, reversal=0.5, game="uninformative")
    torch.testing.assert_close(evaluated.trunk_confounder_logits, evaluated.confounder_logits)
    output = model.train().forward_aux(image, text, reversal=0.5, game="uninformative")
    terms = CausalSegLoss()(output, label)
    loss = CausalSegLoss()
    bounded = loss.logit_bound * torch.tanh(output.confounder_logits / loss.logit_bound)
    head_term = loss.seg(bounded, label)
    trunk_term = torch.nn.functional.binary_cross_entropy_with_logits(
        output.trunk_confounder_logits, torch.full_like(label, 0.5))
    players = {"masks": model.intervention, "neck": model.neck, "head": model.confounder_projector,
               "decoder": model.decoder}
    head, trunk = _grads(model, head_term, players), _grads(model, trunk_term, players)
    assert head["head"] > 0 and head["decoder"] > 0 and head["masks"] == 0 and head["neck"] == 0
    assert trunk["masks"] > 0 and trunk["neck"] > 0 and trunk["head"] == 0 and trunk["decoder"] == 0
    assert float(terms.uninformative) >= 0.0  # BCE against 0.5 minus its minimum, log 2


def test_uninformative_term_is_zero_for_an_undecided_head_and_grows_with_confidence():
    loss = CausalSegLoss()
    label = torch.zeros(1, 1, 8, 8)
    values = []
    for z in (0.0, 2.0, -4.0):
        logits = torch.full((1, 1, 8, 8), z)
        out = type("Out", (), {"logits": logits, "confounder_logits": logits, "masks": [],
                               "trunk_confounder_logits": logits})()
        values.append(float(loss(out, label).uninformative))
    assert values[0] == pytest.approx(0.0, abs=1e-6) and 0 < values[1] < values[2]


def test_unknown_game_is_refused():
    with pytest.raises(ValueError, match="game must be one of reversal, uninformative"):
        create_model("tiny").forward_aux(torch.randn(1, 3, 64, 64), torch.zeros(1, 32, dtype=torch.long),
                                         game="minimax")


def test_public_mask_generators_have_the_public_codes_capacity(tmp_path):
    generator = MaskGenerator(512, 512, "public")
    assert 9.0e6 < sum(p.numel() for p in generator.parameters()) < 9.9e6  # about 9 M per level at RN101's 512
    mask = generator.eval()(torch.randn(2, 512, 7, 7))
    assert mask.shape == (2, 512, 7, 7) and float(mask.min()) > 0 and float(mask.max()) < 1
    assert sum(p.numel() for p in MaskGenerator(64, 32).parameters()) < 0.03e6  # the light one
    model = create_model("tiny-public-masks")
    assert model.config.causal.generator == "public"
    assert create_model("RN101-paper").config.causal.hidden == 512
    with pytest.raises(ValueError, match="causal.generator must be one of light, public"):
        register_config(tmp_path, "bad-generator", {"clip": {"name": "RN50"}, "causal": {"generator": "huge"}})


@pytest.fixture
def loader_factory(tmp_path):
    data = write_datalist(tmp_path, n=6)
    records = read_dataset(data, "train")

    def make(mirror: bool) -> DataLoader:
        return DataLoader(Dataset(records, get_val_transforms(64, 32, mirror=mirror)), batch_size=2)
    return make


def test_mirrored_evaluation_flips_image_mask_and_prompt_together(loader_factory):
    plain, mirrored = next(iter(loader_factory(False))), next(iter(loader_factory(True)))
    torch.testing.assert_close(mirrored["image"], plain["image"].flip(2))  # (B, C, X, Y): X runs left-right
    torch.testing.assert_close(mirrored["label"], plain["label"].flip(2))
    assert all(p.endswith("lower right lung.") for p in mirrored["prompt"])
    assert all(p.endswith("lower left lung.") for p in plain["prompt"])


def test_causal_statistics_measure_the_masks_and_the_confounder_head(loader_factory):
    torch.manual_seed(0)
    model = create_model("tiny")
    stats = causal_statistics(model, loader_factory(False), torch.device("cpu"))
    assert 0 < stats.mask_mean < 1 and 0 < stats.lesion_kept < 1 and 0 < stats.background_kept < 1
    assert stats.lesion_to_background == pytest.approx(stats.lesion_kept / stats.background_kept)
    assert 0 <= stats.confounder_dice <= 1
    assert set(stats.to_dict()) == {f"causal/{k}" for k in json.loads(json.dumps(stats.__dict__))}
    assert causal_statistics(create_model("unet"), loader_factory(False), torch.device("cpu")) is None
    assert len(evaluate_model(model, loader_factory(True), torch.device("cpu"))) == 4
