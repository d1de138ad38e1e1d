"""Explanations as volumes: ``predict --explain`` writes the lesion probability and, for a model with a causal
module, the causal mask on the input's grid, and the bundle's ``explain`` knob writes the same files with the same
values (issue 12); a model without a causal module explains with the probability alone (issue 13)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from causalclipseg import cli, create_model
from causalclipseg.bundle import ExplainNetwork
from causalclipseg.inference.predictor import Predictor
from causalclipseg.training.checkpoint import save_weights

from .conftest import tiny_checkpoint_and_picture

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"

PROMPT_A = "bilateral pulmonary infection, two infected areas, lower left lung and lower right lung."
PROMPT_B = "unilateral pulmonary infection, one infected area, upper right lung."


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("explain")
    files, rng = tiny_checkpoint_and_picture(root, "xray.png", "tiny")  # CausalCLIPSeg: with the causal module
    files["nii"] = root / "volume.nii.gz"
    oblique = np.array([[0.9, 0.3, 0.0, -20.0], [-0.3, 0.9, 0.2, 15.0], [0.0, -0.2, 2.5, 40.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(rng.random((40, 36, 5)).astype(np.float32), oblique), files["nii"])
    return files


def test_explain_is_the_prediction_and_the_causal_mask():
    model = create_model("tiny").eval()
    image, tokens = torch.randn(2, 3, 64, 64), model.tokenize(PROMPT_A)
    with torch.no_grad():
        out = model.explain(image, tokens)
        torch.testing.assert_close(out[:, :1], model(image, tokens))
    assert out.shape == (2, 2, 64, 64) and model.explanation_maps == ("probability", "causal_mask")
    assert 0.0 <= float(out[:, 1].min()) and float(out[:, 1].max()) <= 1.0
    plain = create_model("tiny-nocausal").eval()  # no causal module: the logits alone, and the maps say so
    with torch.no_grad():
        torch.testing.assert_close(plain.explain(image, tokens), plain(image, tokens), rtol=0, atol=0)
    assert plain.explanation_maps == ("probability",)


def test_predict_explains_on_the_input_grid(inputs):
    predictor = Predictor("tiny", inputs["ckpt"], device="cpu")
    a = predictor.predict(inputs["png"], PROMPT_A, explain=True)
    b = predictor.predict(inputs["png"], PROMPT_B, explain=True)
    assert list(a.maps) == ["probability", "causal_mask"] and a.maps["probability"] is a.probability
    causal = a.maps["causal_mask"]
    assert causal.shape == a.probability.shape == (88, 72)  # (X, Y): the picture's columns, rows
    assert causal.dtype == np.float32 and 0.0 <= causal.min() and causal.max() <= 1.0
    assert causal.std() > 0  # a map, not a constant
    assert not np.array_equal(a.probability, b.probability)  # the prediction follows the prompt
    # the mask generators see the image features before the text meets them: the causal mask does not depend on
    # the prompt (what the explanation shows is where the model looks, whatever it was asked)
    np.testing.assert_allclose(causal, b.maps["causal_mask"], atol=1e-6)
    plain = predictor.predict(inputs["png"], PROMPT_A)
    assert plain.maps == {}
    np.testing.assert_array_equal(plain.mask, a.mask)


def test_cli_explain_writes_float_maps_with_the_volume_geometry(inputs, tmp_path, capsys):
    rc = cli.main(["predict", str(inputs["nii"]), str(inputs["png"]), "--prompt", PROMPT_A, "--model", "tiny",
                   "--checkpoint", str(inputs["ckpt"]), "--device", "cpu", "--output-dir", str(tmp_path), "--explain"])
    assert rc == 0, capsys.readouterr().err
    source = nib.load(inputs["nii"])
    for name in ("volume_probability.nii.gz", "volume_causal_mask.nii.gz"):
        image = nib.load(tmp_path / name)
        assert image.shape == source.shape and image.get_data_dtype() == np.float32
        np.testing.assert_allclose(image.affine, source.affine, atol=1e-5)
        values = np.asarray(image.dataobj)
        assert 0.0 <= values.min() and values.max() <= 1.0
    probability = np.asarray(nib.load(tmp_path / "volume_probability.nii.gz").dataobj)
    mask = np.asarray(nib.load(tmp_path / "volume_mask.nii.gz").dataobj)
    np.testing.assert_array_equal(mask, (probability > 0.5).astype(np.uint8))
    assert nib.load(tmp_path / "xray_causal_mask.nii.gz").shape[:2] == (88, 72)


def test_cli_explain_of_a_model_without_the_causal_module_writes_the_probability(inputs, tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = save_weights(create_model("tiny-nocausal").state_dict(), tmp_path / "nocausal.pt")
    args = ["--prompt", PROMPT_A, "--model", "tiny-nocausal", "--checkpoint", str(ckpt), "--device", "cpu"]
    assert cli.main(["predict", str(inputs["nii"]), *args, "--output-dir", str(tmp_path / "out"), "--explain"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["volume_mask.nii.gz", "volume_probability.nii.gz"]
    probability = nib.load(tmp_path / "out" / "volume_probability.nii.gz")
    assert probability.get_data_dtype() == np.float32 and probability.shape == nib.load(inputs["nii"]).shape
    values = np.asarray(probability.dataobj)
    threshold = float(np.median(values))  # the mask of a plain run at that threshold is the map thresholded
    assert cli.main(["predict", str(inputs["nii"]), *args, "--output-dir", str(tmp_path / "plain"), "--threshold",
                     repr(threshold)]) == 0, capsys.readouterr().err
    mask = np.asarray(nib.load(tmp_path / "plain" / "volume_mask.nii.gz").dataobj)
    np.testing.assert_array_equal(mask, (values > threshold).astype(np.uint8))
    assert 0 < mask.sum() < mask.size


def test_the_bundles_explain_network_is_the_models_explain():
    model = create_model("tiny").eval()
    image, tokens = torch.randn(2, 3, 64, 64), model.tokenize(PROMPT_A)
    with torch.no_grad():
        torch.testing.assert_close(ExplainNetwork(model)(image, tokens), model.explain(image, tokens), rtol=0, atol=0)


@pytest.mark.slow
def test_the_bundles_explain_of_a_causal_model_writes_what_predict_writes(inputs, tmp_path):
    """The bundle's ``explain`` with ``model_name`` a variant with the causal module: both maps, the values of
    ``predict --model tiny --explain`` (the shipped variant's, the probability alone: ``test_dicom_seg.py``)."""
    threshold = float(np.median(Predictor("tiny", inputs["ckpt"], device="cpu").predict(inputs["nii"], PROMPT_A)
                                .probability))
    assert cli.main(["predict", str(inputs["nii"]), str(inputs["png"]), "--prompt", PROMPT_A, "--model", "tiny",
                     "--checkpoint", str(inputs["ckpt"]), "--device", "cpu", "--output-dir", str(tmp_path / "predict"),
                     "--threshold", repr(threshold), "--explain"]) == 0
    datalist = tmp_path / "inputs.json"
    datalist.write_text(json.dumps({"testing": [{"image": str(inputs[k])} for k in ("nii", "png")]}))
    result = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                             "--model_name", "tiny", "--ckpt_path", str(inputs["ckpt"]), "--progress", "False",
                             "--input", str(datalist), "--output_dir", str(tmp_path / "bundle"), "--prompt", PROMPT_A,
                             "--threshold", repr(threshold), "--explain", "True"], cwd=BUNDLE, timeout=300,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    for name in ("volume", "xray"):
        for suffix in ("probability", "causal_mask"):
            ours = nib.load(tmp_path / "bundle" / f"{name}_{suffix}.nii.gz")
            theirs = nib.load(tmp_path / "predict" / f"{name}_{suffix}.nii.gz")
            np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-6)
            np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj), err_msg=suffix)
        causal = np.asarray(nib.load(tmp_path / "bundle" / f"{name}_causal_mask.nii.gz").dataobj)
        assert causal.dtype == np.float32 and causal.std() > 0


def test_the_writer_writes_the_maps_it_is_given_and_refuses_others(inputs, tmp_path):
    """``SaveMaskd(maps=...)``: only names of ``EXPLANATION_MAPS``, refused when it is built (the bundle's parse);
    a map the data lack is refused before anything is written."""
    from causalclipseg.inference.predictor import inference_preprocessing
    from causalclipseg.io.writers import SaveMaskd

    with pytest.raises(ValueError, match="^explanation maps must be among probability, causal_mask, got heatmap$"):
        SaveMaskd("pred", tmp_path, maps=["probability", "heatmap"])
    image = inference_preprocessing()({"image": str(inputs["png"])})["image"]
    data = {"pred": (image > image.mean()).float(), "probability": image / image.max()}
    with pytest.raises(ValueError, match="hold no 'causal_mask' map"):
        SaveMaskd("pred", tmp_path, suffixes=[".nii.gz"], maps=("probability", "causal_mask"))(data)
    assert not any(tmp_path.iterdir())
    SaveMaskd("pred", tmp_path, suffixes=[".nii.gz"], maps=("probability",))(data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["xray_mask.nii.gz", "xray_probability.nii.gz"]
