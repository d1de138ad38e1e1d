"""Weights: CLIP weights through open_clip, CausalCLIPSeg checkpoints, safe loading."""

from __future__ import annotations

import json
import os
import pickle

import open_clip
import pytest
import torch

from causalclipseg import create_model
from causalclipseg.factory import load_state_dict
from causalclipseg.registry import _CONFIG_DIR
from causalclipseg.training.checkpoint import save_weights

from .conftest import PROMPT


def _tiny_clip() -> open_clip.CLIP:
    cfg = json.loads((_CONFIG_DIR / "tiny.json").read_text())["clip"]["model_cfg"]
    return open_clip.CLIP(**cfg)


def test_pretrained_clip_file_lands_in_the_encoders(tmp_path):
    torch.manual_seed(123)
    clip = _tiny_clip()
    path = tmp_path / "clip.pt"
    torch.save(clip.state_dict(), path)
    model = create_model("tiny", pretrained=str(path))
    random_model = create_model("tiny")
    for name, tensor in clip.visual.state_dict().items():
        torch.testing.assert_close(model.image_encoder.visual.state_dict()[name], tensor, rtol=0, atol=0)
    text = model.text_encoder
    for ours, theirs in [(text.token_embedding.weight, clip.token_embedding.weight),
                         (text.positional_embedding, clip.positional_embedding),
                         (text.text_projection, clip.text_projection),
                         (text.transformer.resblocks[0].attn.in_proj_weight,
                          clip.transformer.resblocks[0].attn.in_proj_weight)]:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert not torch.equal(random_model.text_encoder.token_embedding.weight, clip.token_embedding.weight)


def test_unknown_pretrained_value_raises(tmp_path):
    with pytest.raises(ValueError, match="neither a file nor an open_clip tag"):
        create_model("tiny", pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match=r"tags: \[.*openai"):
        create_model("RN50", pretrained="no-such-tag")


@pytest.mark.parametrize("suffix, half", [(".pt", False), (".safetensors", False), (".safetensors", True)])
def test_checkpoint_round_trip(tmp_path, suffix, half):
    model = create_model("tiny")
    path = save_weights(model.state_dict(), tmp_path / f"model{suffix}", half=half)
    loaded = create_model("tiny", checkpoint=path)
    image = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        expected, got = model(image, model.tokenize(PROMPT)), loaded(image, loaded.tokenize(PROMPT))
    if half:
        torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)
    else:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic write left nothing behind


def test_checkpoint_of_another_variant_names_the_keys(tmp_path):
    path = save_weights(create_model("tiny-nocausal").state_dict(), tmp_path / "nocausal.pt")
    with pytest.raises(ValueError, match=r"does not fit model 'tiny'.*missing keys: confounder_projector\."):
        create_model("tiny", checkpoint=path)
    state = create_model("tiny").state_dict()
    state["neck.proj.0.conv.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "reshaped.pt")
    with pytest.raises(ValueError, match=r"shape-mismatched keys: neck\.proj\.0\.conv\.weight"):
        create_model("tiny", checkpoint=tmp_path / "reshaped.pt")


def test_a_checkpoint_of_another_variant_is_named_by_its_run_record(tmp_path):
    """The state dict does not record its variant; a training run's record beside it, or the metrics file that
    ships beside released weights, does, and the refusal names what it says."""
    run = tmp_path / "run"
    run.mkdir()
    path = save_weights(create_model("tiny").state_dict(), run / "best_model.pt")
    with pytest.raises(ValueError, match=r"does not fit model 'tiny-nocausal' \(is it for another variant\?\)"):
        create_model("tiny-nocausal", checkpoint=path)
    (run / "train_config.json").write_text(json.dumps({"model": "tiny", "epochs": 1}))
    with pytest.raises(ValueError, match=r"'tiny-nocausal' \(its run trained model 'tiny' \(train_config\.json beside "
                                         r"it\)\): unexpected keys: "):
        create_model("tiny-nocausal", checkpoint=path)
    shipped = save_weights(create_model("tiny").state_dict(), tmp_path / "released.pt")
    (tmp_path / "released_metrics.json").write_text(json.dumps({"training": {"model": "tiny"}}))
    with pytest.raises(ValueError, match=r"its run trained model 'tiny' \(released_metrics\.json beside it\)"):
        create_model("tiny-nocausal", checkpoint=shipped)
    (tmp_path / "released_metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"is it for another variant\?"):
        create_model("tiny-nocausal", checkpoint=shipped)


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        create_model("tiny", checkpoint=tmp_path / "nope.pt")
    path = save_weights(create_model("tiny").state_dict(), tmp_path / "model.pt")
    data = path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        create_model("tiny", checkpoint=tmp_path / "truncated.pt")


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"weight": _Payload()}, f)
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_state_dict(path)
