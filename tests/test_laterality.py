"""Whose left is "left": prompts, datasets and models each declare their convention, and one function translates.

Clinicians name the patient's side, QaTa-COV19's captions the viewer's (DESIGN section 1); the front doors take the
patient's by default; training and evaluation on QaTa read the captions as written, so their numbers do not move.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from causalclipseg import cli, create_model
from causalclipseg.data.datasets import dataset_prompt_side, index_dataset, read_dataset
from causalclipseg.data.prompts import (
    PROMPT_SIDES,
    check_prompt_side,
    infection_extent,
    names_a_side,
    to_model_side,
)
from causalclipseg.factory import DEFAULT_CHECKPOINT, DEFAULT_MODEL, checkpoint_prompt_side, load_state_dict
from causalclipseg.inference.predictor import Predictor
from causalclipseg.inference.prompts import model_tokens
from causalclipseg.training.checkpoint import save_weights
from causalclipseg.training.trainer import TrainConfig, train

from .conftest import write_datalist

CAPTION = "unilateral pulmonary infection, one infected area, lower left lung."


def test_translation_is_one_swap_between_conventions_and_none_within():
    assert to_model_side(CAPTION, "viewer", "viewer") == CAPTION
    assert to_model_side(CAPTION, "patient", "viewer") == CAPTION.replace("left", "right")
    assert to_model_side("Left and RIGHT lungs", "viewer", "patient") == "Right and LEFT lungs"
    for prompt in ("left lung", "upper right and lower left lung", "no side at all"):
        assert to_model_side(to_model_side(prompt, "patient", "viewer"), "viewer", "patient") == prompt
    assert names_a_side("lower Left lung") and names_a_side("right-sided effusion")
    assert not names_a_side("bilateral infection, leftover bright spots")


@pytest.mark.parametrize("bad", ["Patient", "radiological", "", None, "left"])
def test_an_unknown_side_is_refused_naming_the_choices(bad):
    with pytest.raises(ValueError, match="prompt_side must be one of patient, viewer"):
        check_prompt_side(bad)
    assert PROMPT_SIDES == ("patient", "viewer")


def test_layouts_declare_their_captions_convention(tmp_path, qata_root):
    assert dataset_prompt_side(qata_root) == "viewer"
    assert index_dataset(qata_root, "valid").prompt_side == "viewer"
    as_written = read_dataset(qata_root, "valid")
    assert read_dataset(qata_root, "valid", prompt_side="viewer") == as_written
    translated = read_dataset(qata_root, "valid", prompt_side="patient")
    assert [r["image"] for r in translated] == [r["image"] for r in as_written]
    assert [r["prompt"] for r in translated] == [to_model_side(r["prompt"], "viewer", "patient") for r in as_written]
    assert any(t["prompt"] != w["prompt"] for t, w in zip(translated, as_written))


def test_a_datalist_names_the_patients_side_unless_it_says_otherwise(tmp_path):
    datalist = write_datalist(tmp_path, n=4)
    assert dataset_prompt_side(datalist) == "patient" == index_dataset(datalist, "train").prompt_side
    content = json.loads(datalist.read_text())
    datalist.write_text(json.dumps({**content, "prompt_side": "viewer"}))
    assert dataset_prompt_side(datalist) == "viewer"
    assert read_dataset(datalist, "train", prompt_side="patient")[0]["prompt"].endswith("lower right lung.")
    datalist.write_text(json.dumps({**content, "prompt_side": "radiological"}))
    with pytest.raises(ValueError, match="'prompt_side' must be one of patient, viewer"):
        read_dataset(datalist, "train")


def test_models_record_their_convention_in_the_state_dict(tmp_path):
    model = create_model("tiny")
    assert model.prompt_side == "patient"  # a model trained on nothing yet: the clinical default
    model.prompt_side = "viewer"
    path = save_weights(model.state_dict(), tmp_path / "viewer.safetensors")
    assert create_model("tiny", checkpoint=path).prompt_side == "viewer" == checkpoint_prompt_side(path)
    model.prompt_side = "patient"
    path = save_weights(model.state_dict(), tmp_path / "patient.pt")
    assert create_model("tiny", checkpoint=path).prompt_side == "patient" == checkpoint_prompt_side(path)
    with pytest.raises(ValueError, match="prompt_side must be one of"):
        model.prompt_side = "left"
    # a checkpoint from before the record: every such model learned QaTa's captions as written
    legacy = {k: v for k, v in model.state_dict().items() if k != "viewer_side_prompts"}
    save_weights(legacy, tmp_path / "legacy.pt")
    assert create_model("tiny", checkpoint=tmp_path / "legacy.pt").prompt_side == "viewer"
    assert checkpoint_prompt_side(tmp_path / "legacy.pt") == "viewer"
    fresh = create_model("tiny")
    fresh.load_state_dict(legacy)  # the training engine's resume path (ignite loads the model's state dict)
    assert fresh.prompt_side == "viewer"
    assert create_model("unet").prompt_side == "patient"


def test_the_shipped_model_learned_qatas_captions_as_written():
    assert load_state_dict(DEFAULT_CHECKPOINT)["viewer_side_prompts"].item() is True
    assert create_model(DEFAULT_MODEL, checkpoint=DEFAULT_CHECKPOINT).prompt_side == "viewer"


def test_prompts_reach_the_model_in_its_convention():
    model = create_model("tiny")
    model.prompt_side = "viewer"
    patient = model_tokens(model, "lower left lung", "patient")
    assert torch.equal(patient, model.tokenize("lower right lung"))
    assert torch.equal(model_tokens(model, "lower left lung", "viewer"), model.tokenize("lower left lung"))
    with pytest.raises(ValueError, match="prompt must contain text"):
        model_tokens(model, "  ", "patient")


@pytest.mark.parametrize(("asked", "expected"), [(None, "patient"), ("viewer", "viewer")])
def test_training_records_the_convention_and_reads_captions_in_it(tmp_path, asked, expected, monkeypatch):
    datalist = write_datalist(tmp_path, n=4)  # "lower left lung", patient's side (a datalist's default)
    seen: list[str] = []
    real = read_dataset

    def spy(*args, **kwargs):
        records = real(*args, **kwargs)
        seen.extend(r["prompt"] for r in records)
        return records

    monkeypatch.setattr("causalclipseg.training.trainer.read_dataset", spy)
    cfg = TrainConfig(data=str(datalist), output_dir=str(tmp_path / "run"), epochs=1, batch_size=2,
                      warmup_iterations=1, progress=False, device="cpu", prompt_side=asked)
    train(cfg)
    assert checkpoint_prompt_side(tmp_path / "run" / "best_model.pt") == expected
    word = "left" if expected == "patient" else "right"
    assert seen and all(p.endswith(f"lower {word} lung.") for p in seen)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


@pytest.fixture
def unilateral(qata_root) -> tuple[Path, np.ndarray, str]:
    """A QaTa valid X-ray whose caption names one lung (the viewer's side), its mask and its caption."""
    entries = json.loads((qata_root / "prompts" / "annotation.json").read_text())["valid"]
    entry = next(a for a in entries if a["pulmonary_infection"] == 1 and "lower left lung" in a["caption"])
    truth = np.array(Image.open(qata_root / "images" / "valid" / "masks" / entry["image_path"])) > 0
    return qata_root / "images" / "valid" / "images" / entry["image_path"][len("mask_"):], truth, entry["caption"]


def test_the_predictor_takes_the_patients_side_by_default(unilateral):
    image, truth, caption = unilateral  # caption: "... lower left lung." = the image's left = the patient's right
    patient = Predictor(device="cpu")
    viewer = Predictor(device="cpu", prompt_side="viewer")
    clinician = "unilateral pulmonary infection, one infected area, lower right lung."
    as_clinician = patient.predict(image, clinician).mask.T > 0
    assert _dice(as_clinician, truth) > 0.6
    assert np.array_equal(viewer.predict(image, caption).mask.T > 0, as_clinician)
    misread = patient.predict(image, caption).mask.T > 0  # the caption's words read as the patient's: other lung
    assert _dice(misread, truth) < 0.3
    with pytest.raises(ValueError, match="prompt_side must be one of"):
        Predictor(device="cpu", prompt_side="image")


def test_cli_prompt_side_option_and_help(tmp_path, unilateral, capsys):
    image, _, caption = unilateral
    with pytest.raises(SystemExit):
        cli.main(["predict", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "PATIENT's sides" in help_text and "--prompt-side {patient,viewer}" in help_text
    clinician = caption.replace("left", "right")
    assert cli.main(["predict", str(image), "--prompt", clinician, "--output-dir", str(tmp_path / "a")]) == 0
    assert cli.main(["predict", str(image), "--prompt", caption, "--prompt-side", "viewer",
                     "--output-dir", str(tmp_path / "b")]) == 0
    name = image.name.replace(".png", "_mask.png")
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:  # argparse's own one-line usage error, exit status 2
        cli.main(["predict", str(image), "--prompt", caption, "--prompt-side", "image"])
    assert refused.value.code == 2 and "invalid choice: 'image'" in capsys.readouterr().err


def test_evaluate_scores_qata_captions_as_written(tmp_path, qata_root, capsys):
    """The shipped model learned QaTa's captions as written: evaluation reads them in its convention, so the
    numbers are those the captions give it directly (the same as before conventions were recorded)."""
    assert cli.main(["evaluate", "--data", str(qata_root), "--split", "valid", "--max-images", "24",
                     "--bootstrap", "10", "--json", str(tmp_path / "ours.json")]) == 0
    ours = json.loads((tmp_path / "ours.json").read_text())
    predictor = Predictor(device="cpu", prompt_side="viewer")
    dices, extents = [], []
    for record in read_dataset(qata_root, "valid")[:24]:
        truth = np.array(Image.open(record["label"])) > 0
        mask = predictor.predict(record["image"], record["prompt"]).mask.T > 0
        dices.append(2 * (mask & truth).sum() / (mask.sum() + truth.sum()) if truth.any() or mask.any() else 1.0)
        extents.append(infection_extent(record["prompt"]))
    assert ours["per_image/dice"] == pytest.approx(float(np.mean(dices)), abs=0.02)
    # the unilateral target is read from these: each extent's images alone
    assert set(ours["by_extent"]) == set(extents) >= {"unilateral", "bilateral"}
    for extent, scores in ours["by_extent"].items():
        mine = [d for d, e in zip(dices, extents) if e == extent]
        assert scores["n_images"] == len(mine)
        assert scores["per_image/dice"] == pytest.approx(float(np.mean(mine)), abs=0.03)


@pytest.mark.parametrize("prompt, extent", [
    ("unilateral pulmonary infection, one infected area, lower right lung.", "unilateral"),
    ("Bilateral pulmonary infection, two infected areas, all left lung and all right lung.", "bilateral"),
    ("BILATERAL INFECTION", "bilateral"),
    ("infection in the lower left lung", "unstated"),
    ("a unilateralism of sorts", "unstated"),
    ("", "unstated"),
    (None, "unstated"),
])
def test_the_extent_a_caption_states(prompt, extent):
    assert infection_extent(prompt) == extent
