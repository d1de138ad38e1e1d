"""CausalCLIPSeg network: shapes, broadcasting, gradient flow, the min-max wiring, input validation."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import causalclipseg
from causalclipseg import create_model, list_models
from causalclipseg.model import causalclipseg as model_module
from causalclipseg.model.layers import grad_reverse
from causalclipseg.registry import _CONFIG_DIR
from causalclipseg.training.losses import CausalSegLoss

from .conftest import PROMPT, TINY_VIT, register_config

SHIPPED = sorted(p.stem for p in _CONFIG_DIR.glob("*.json"))


def test_shipped_variants_registered():
    assert {"tiny", "tiny-nocausal", "RN50", "RN101", "ViT-B-16", "unet"} <= set(SHIPPED)
    assert set(SHIPPED) <= set(list_models())


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("size", [(224, 224), (160, 192)])
def test_output_shape_every_shipped_config(name, size):
    model = create_model(name)
    image = torch.randn(1, 3, *size)
    with torch.no_grad():
        logits = model(image, model.tokenize(PROMPT))
        aux = model.forward_aux(image, model.tokenize(PROMPT))
    assert logits.shape == (1, 1, *size)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(aux.logits, logits)
    if isinstance(model, model_module.CausalCLIPSeg) and model.config.causal.enabled:
        assert aux.confounder_logits.shape == (1, 1, *size)
        dim = model.config.decoder.dim
        h, w = size
        assert [tuple(m.shape) for m in aux.masks] == [(1, dim, h // 8, w // 8), (1, dim, h // 16, w // 16),
                                                       (1, dim, h // 32, w // 32)]
        assert all(((m > 0) & (m < 1)).all() for m in aux.masks)
    else:
        assert aux.confounder_logits is None and aux.masks == []


def test_tiny_vit_variant_shapes(tmp_path):
    name = register_config(tmp_path, "test-vit", TINY_VIT)
    model = create_model(name)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 96, 64), model.tokenize(PROMPT)).shape == (2, 1, 96, 64)


def test_text_batch_of_one_is_broadcast():
    model = create_model("tiny")
    image = torch.randn(3, 3, 64, 64)
    one = model.tokenize(PROMPT)
    with torch.no_grad():
        broadcast = model(image, one)
        repeated = model(image, one.repeat(3, 1))
    torch.testing.assert_close(broadcast, repeated)


def test_one_channel_equals_three_repeated_channels():
    model = create_model("tiny")
    gray = torch.randn(2, 1, 64, 64)
    text = model.tokenize(PROMPT)
    with torch.no_grad():
        torch.testing.assert_close(model(gray, text), model(gray.repeat(1, 3, 1, 1), text))


def test_prompt_changes_the_prediction():
    model = create_model("tiny")
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        left = model(image, model.tokenize("lower left lung"))
        right = model(image, model.tokenize("upper right lung"))
    assert not torch.allclose(left, right)


CONFIG_VARIANTS = {
    "tiny": None,
    "no-causal": {"causal": {"enabled": False}},
    "no-cross-attention-no-gate": {"decoder": {"dim": 64, "num_layers": 0, "sentence_gate": False, "num_heads": 4,
                                               "ffn_dim": 128}},
    "stride8": {"projector": {"stride": 8}},
    "stride4-skip": {"projector": {"fine_skip": True}},
    "vit": "vit",
}


@pytest.mark.parametrize("variant", list(CONFIG_VARIANTS))
def test_every_parameter_receives_a_gradient(tmp_path, variant):
    override = CONFIG_VARIANTS[variant]
    if override is None:
        name = "tiny"
    elif override == "vit":
        name = register_config(tmp_path, "test-vit", TINY_VIT)
    else:
        data = json.loads((_CONFIG_DIR / "tiny.json").read_text())
        for section, values in override.items():
            data[section].update(values)
        name = register_config(tmp_path, f"test-{variant}", data)
    model = create_model(name).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    image = torch.randn(2, 3, 64, 64)
    label = (torch.rand(2, 1, 64, 64) > 0.5).float()
    text = model.tokenize([PROMPT, "lower left lung"])
    loss_fn = CausalSegLoss()
    before = copy.deepcopy(model.state_dict())
    # open_clip zero-initialises the last BN of each residual branch, so the branch convs get their first
    # gradient on the second step: check connectivity (grad is not None) on step 1 and values on step 2
    for _ in range(2):
        optimizer.zero_grad()
        loss_fn(model.forward_aux(image, text, reversal=0.5), label).total.backward()
        unconnected = [n for n, p in model.named_parameters() if p.grad is None]
        assert unconnected == [], f"parameters that never reach the loss: {unconnected}"
        optimizer.step()
    dead = [n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0]
    assert dead == [], f"parameters without gradient: {dead}"
    unchanged = [n for n, p in model.named_parameters() if torch.equal(before[n], p.detach())]
    assert unchanged == []


def _confounder_grads(model, image, text, label, reversal):
    model.zero_grad()
    out = model.forward_aux(image, text, reversal=reversal)
    CausalSegLoss().seg(out.confounder_logits, label).backward()
    heads = {n: p.grad.clone() for n, p in model.named_parameters()
             if n.startswith(("confounder_projector.", "decoder.")) and p.grad is not None}
    masks = {n: p.grad.clone() for n, p in model.named_parameters()
             if n.startswith("intervention.") and p.grad is not None}
    return heads, masks


def test_min_max_gradient_signs(monkeypatch):
    """The confounder loss trains the head normally and the mask generators with the reversed sign."""
    model = create_model("tiny").eval()  # eval: no dropout, so both passes are identical
    image = torch.randn(2, 3, 64, 64)
    text = model.tokenize(PROMPT)
    label = (torch.rand(2, 1, 64, 64) > 0.5).float()
    heads_rev, masks_rev = _confounder_grads(model, image, text, label, reversal=0.7)
    monkeypatch.setattr(model_module, "grad_reverse", lambda x, coeff: x)  # plain backprop for comparison
    heads_plain, masks_plain = _confounder_grads(model, image, text, label, reversal=0.7)
    assert masks_rev and heads_rev
    for name, grad in masks_rev.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, -0.7 * masks_plain[name], rtol=1e-4, atol=1e-7)
    for name, grad in heads_rev.items():
        torch.testing.assert_close(grad, heads_plain[name], rtol=1e-4, atol=1e-7)
    assert any(g.abs().sum() > 0 for n, g in heads_rev.items() if n.startswith("confounder_projector."))


def test_grad_reverse_unit():
    x = torch.randn(4, requires_grad=True)
    y = grad_reverse(x, 0.3)
    torch.testing.assert_close(y, x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((4,), -0.3))
    with pytest.raises(ValueError, match="coeff"):
        grad_reverse(x, -1.0)


@pytest.mark.parametrize("shape, error, match", [
    ((1, 2, 64, 64), ValueError, "1 or 3 channels"),
    ((1, 3, 64, 70), ValueError, "divisible by 32"),
    ((3, 64, 64), ValueError, r"\(B, C, H, W\)"),
])
def test_bad_image_raises(shape, error, match):
    model = create_model("tiny")
    with pytest.raises(error, match=match):
        model(torch.randn(*shape), model.tokenize(PROMPT))


def test_bad_text_raises():
    model = create_model("tiny")
    image = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match="match the image batch"):
        model(image, model.tokenize([PROMPT] * 3))
    with pytest.raises(TypeError, match="token ids"):
        model(image, torch.randn(2, 32))
    with pytest.raises(ValueError, match="context_length"):
        model(image, torch.ones(2, 40, dtype=torch.long))


def test_text_as_a_list_and_no_text_as_the_empty_prompt():
    """How MONAI's bundle tools call a network: token ids as a plain list, or the image alone."""
    model = create_model("tiny")
    image = torch.randn(2, 3, 64, 64)
    tokens = model.tokenize(PROMPT)
    with torch.no_grad():
        torch.testing.assert_close(model(image, tokens[0].tolist()), model(image, tokens))
        torch.testing.assert_close(model(image), model(image, model.tokenize("", allow_empty=True)))


@pytest.mark.parametrize("prompt", ["", "   ", "\t\n"])
def test_empty_prompt_raises(prompt):
    model = create_model("tiny")
    with pytest.raises(ValueError, match="prompt must contain text"):
        model.tokenize(prompt)
    assert model.tokenize(prompt, allow_empty=True).shape == (1, 32)  # the text-reliance ablation needs it


def test_long_prompt_truncated_with_log(caplog):
    model = create_model("tiny")
    long_prompt = ", ".join(["lower left lung and upper right lung"] * 10)
    with caplog.at_level("WARNING"):
        tokens = model.tokenize(long_prompt)
    assert "truncated" in caplog.text and "to 32 tokens" in caplog.text
    assert tokens.shape == (1, 32) and tokens[0, -1] == model.tokenizer.eot_id
    caplog.clear()
    with caplog.at_level("WARNING"):
        model.tokenize(PROMPT)
    assert "truncated" not in caplog.text


def test_unknown_model_name_suggests_closest():
    with pytest.raises(ValueError, match=r"unknown model 'RN5O'.*did you mean 'RN50'"):
        create_model("RN5O")


def test_bad_config_rejected(tmp_path):
    data = json.loads((_CONFIG_DIR / "tiny.json").read_text())
    data["decoder"]["dimension"] = 3
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['dimension'\] in decoder"):
        causalclipseg.add_model_config(path)
    data = json.loads((_CONFIG_DIR / "tiny.json").read_text())
    data["image_size"] = 300
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="divisible by 32, got 300"):
        causalclipseg.add_model_config(path)
    data = json.loads((_CONFIG_DIR / "tiny.json").read_text())
    data["projector"] = {"stride": 8, "fine_skip": True}
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="fine_skip merges a stride-4 level, so it needs stride 4, got 8"):
        causalclipseg.add_model_config(path)


def test_stride4_skip_needs_a_resnet_tower(tmp_path):
    name = register_config(tmp_path, "test-vit-fine", {**TINY_VIT, "projector": {"fine_skip": True}})
    with pytest.raises(ValueError, match="fine_skip needs a ResNet image tower; a ViT has no stride-4 level"):
        create_model(name)


def test_stride4_skip_carries_the_image_tower_level(tmp_path):
    """With ``projector.fine_skip`` the projector receives the tower's stride-4 level and its output depends on it."""
    data = json.loads((_CONFIG_DIR / "tiny-nocausal.json").read_text())
    data["projector"]["fine_skip"] = True
    model = create_model(register_config(tmp_path, "test-fine", data)).eval()
    seen = []
    model.projector.fine.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    image, text = torch.randn(1, 3, 64, 96), model.tokenize(PROMPT)
    with torch.no_grad():
        before = model(image, text)
        model.projector.fine.conv.weight.mul_(2)
        after = model(image, text)
    channels = model.image_encoder.visual.layer1[-1].conv3.out_channels
    assert seen == [(1, channels, 16, 24)] * 2
    assert not torch.allclose(before, after)
