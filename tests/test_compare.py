"""The comparison arms: the vision-only U-Net baseline, training without text, and ``causalclipseg compare``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from causalclipseg import cli, create_model
from causalclipseg.data.pipelines import get_train_transforms
from causalclipseg.experiments.compare import ARMS
from causalclipseg.experiments.unet import TextFreeUNet
from causalclipseg.tokenizer import PromptTokenizer
from causalclipseg.training.checkpoint import save_weights
from causalclipseg.training.trainer import param_groups

from .conftest import PROMPT, register_config, write_datalist


def test_unet_baseline_has_the_model_interface_and_ignores_text(tmp_path):
    model = create_model("unet")
    assert isinstance(model, TextFreeUNet)
    image = torch.randn(2, 1, 64, 96)
    text = model.tokenize([PROMPT, "left lung"])
    logits = model(image, text)
    assert logits.shape == (2, 1, 64, 96)
    torch.testing.assert_close(model(image, model.tokenize("right lung")), logits)  # the prompt changes nothing
    aux = model.forward_aux(image, text)
    assert aux.confounder_logits is None and aux.masks == []
    torch.testing.assert_close(aux.logits, logits)
    path = save_weights(model.state_dict(), tmp_path / "unet.pt")
    torch.testing.assert_close(create_model("unet", checkpoint=path)(image, text), logits)
    with pytest.raises(ValueError, match="no CLIP encoders"):
        create_model("unet", pretrained="openai")
    with pytest.raises(ValueError, match="unknown key"):
        register_config(tmp_path, "bad-unet", {"unet": {"channels": [8, 16], "strides": [2], "kernel": 3}})
    with pytest.raises(ValueError, match="one stride per level"):
        register_config(tmp_path, "bad-unet2", {"unet": {"channels": [8, 16, 32], "strides": [2]}})


def test_param_groups_put_only_the_clip_towers_in_the_encoder_group():
    tiny = create_model("tiny")
    encoders, rest = param_groups(tiny, lr=1e-3, encoder_scale=0.1, weight_decay=0.0)
    tower_ids = {id(p) for p in (*tiny.image_encoder.parameters(), *tiny.text_encoder.parameters())}
    assert {id(p) for p in encoders["params"]} == tower_ids and encoders["lr"] == pytest.approx(1e-4)
    assert len(encoders["params"]) + len(rest["params"]) == len(list(tiny.parameters()))
    encoders, rest = param_groups(create_model("unet"), lr=1e-3, encoder_scale=0.1, weight_decay=0.0)
    assert encoders["params"] == [] and rest["params"]


def test_training_transforms_can_drop_the_text_and_refuse_swapped_prompts(tmp_path):
    data = json.loads(write_datalist(tmp_path).read_text())["training"][0]
    record = {key: str(tmp_path / data[key]) for key in ("image", "label")} | {"prompt": PROMPT}
    empty = get_train_transforms(64, 32, augment=True, prompt_transform="empty")
    empty.set_random_state(seed=3)
    out = empty(dict(record))
    assert out["prompt"] == ""
    torch.testing.assert_close(out["text"], PromptTokenizer(32)("", allow_empty=True)[0])
    kept = get_train_transforms(64, 32, augment=False)(dict(record))
    assert kept["prompt"] == PROMPT
    np.testing.assert_array_equal(get_train_transforms(64, 32, augment=False, prompt_transform="empty")(
        dict(record))["image"], kept["image"])  # only the text differs
    with pytest.raises(ValueError, match="wrong side"):
        get_train_transforms(64, 32, prompt_transform="swap")


def test_compare_trains_every_arm_per_seed_and_tabulates(tmp_path, capsys):
    data = write_datalist(tmp_path, n=6)
    out = tmp_path / "comparison"
    args = ["compare", "--data", str(data), "--output-dir", str(out), "--epochs", "1", "--batch-size", "2",
            "--warmup-iterations", "1", "--no-progress", "--device", "cpu", "--arms", "uninformative", "unet",
            "--seeds", "0", "1"]
    assert cli.main(args) == 0
    table = capsys.readouterr().out
    result = json.loads((out / "comparison.json").read_text())
    assert [(r["arm"], r["seed"]) for r in result["runs"]] == [("uninformative", 0), ("uninformative", 1),
                                                               ("unet", 0), ("unet", 1)]
    for run in result["runs"]:  # measured on each best model: the mirrored inputs, and the causal masks if any
        assert 0.0 <= run["mirrored/per_image/dice"] <= 1.0
        assert ("causal/mask_mean" in run) == (run["arm"] == "uninformative")
    game = result["runs"][0]
    assert 0.0 < game["causal/mask_mean"] < 1.0 and 0.0 <= game["causal/confounder_dice"] <= 1.0
    assert game["causal/lesion_to_background"] == pytest.approx(game["causal/lesion_kept"] /
                                                                game["causal/background_kept"])
    assert json.loads((out / "uninformative_seed0" / "train_config.json").read_text())["game"] == "uninformative"
    for run in result["runs"]:
        train_config = json.loads((out / f"{run['arm']}_seed{run['seed']}" / "train_config.json").read_text())
        assert train_config["model"] == ARMS[run["arm"]].model and train_config["seed"] == run["seed"]
        assert train_config["prompt_transform"] == ARMS[run["arm"]].prompt_transform
        assert train_config["epochs"] == 1 and train_config["batch_size"] == 2  # the same budget for every arm
        assert 0.0 <= run["per_image/dice"] <= 1.0 and run["train_seconds"] > 0
    unet = [r["per_image/dice"] for r in result["runs"] if r["arm"] == "unet"]
    stats = result["summary"]["unet"]["per_image/dice"]
    assert stats["n"] == 2 and stats["mean"] == pytest.approx(np.mean(unet))
    assert stats["std"] == pytest.approx(np.std(unet, ddof=1))
    assert ARMS["unet"].label in table and "+/-" in table and "mirrored per-image Dice" in table
    assert (out / "comparison.md").read_text().strip() == table.strip()
    # run again: every arm is complete, so nothing retrains and the scores are the same
    assert cli.main(args) == 0
    again = json.loads((out / "comparison.json").read_text())
    assert [r["per_image/dice"] for r in again["runs"]] == [r["per_image/dice"] for r in result["runs"]]
    # --no-train tabulates finished runs as they are (the same table) ...
    capsys.readouterr()
    assert cli.main([*args, "--no-train"]) == 0
    assert capsys.readouterr().out.strip() == table.strip()
    assert json.loads((out / "comparison.json").read_text())["runs"] == again["runs"]
    # ... and refuses, naming every run not finished, before it trains or touches anything
    (out / "unet_seed1" / "history.jsonl").write_text(
        (out / "unet_seed1" / "history.jsonl").read_text().replace('"epoch": 1,', '"epoch": 0,'))
    more = [*args[:args.index("--seeds")], "--seeds", "0", "1", "2", "--no-train"]
    assert cli.main(more) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: not finished (1 epochs)") and "\n" not in err
    assert err.count("_seed2") == 2 and "unet_seed1" in err and "unet_seed0" not in err
    assert not (out / "unet_seed2").exists()


def test_a_runs_time_is_its_clock_unless_part_of_it_predates_the_clock(tmp_path):
    """The last validation's ``seconds`` when every validation has them; a run resumed from a checkpoint without the
    clock (its first epochs without ``seconds``) needs ``train_seconds.json``, and without one says so."""
    from causalclipseg.experiments.compare import _train_seconds

    history = tmp_path / "history.jsonl"
    history.write_text('{"epoch": 1, "seconds": 10.0}\n{"epoch": 2, "seconds": 25.5}\n')
    assert _train_seconds(tmp_path) == 25.5
    history.write_text('{"epoch": 1}\n{"epoch": 2, "seconds": 7.0}\n')  # the clock started at the resume
    with pytest.raises(ValueError, match="does not record the seconds of every epoch.*train_seconds.json"):
        _train_seconds(tmp_path)
    (tmp_path / "train_seconds.json").write_text('{"seconds": 40.0}')
    assert _train_seconds(tmp_path) == 40.0


def test_compare_rejects_an_unknown_arm(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["compare", "--data", str(tmp_path), "--output-dir", str(tmp_path / "o"), "--arms", "nnunet"])
    assert "invalid choice" in capsys.readouterr().err
