"""Explanations as volumes: ``predict --explain`` writes the lesion probability and the causal mask on the input's
grid, and the bundle's ``explain`` knob writes the same files with the same values (issue 12)."""

from __future__ import annotations

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
    files, rng = tiny_checkpoint_and_picture(root, "xray.png")
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
    assert out.shape == (2, 2, 64, 64)
    assert 0.0 <= float(out[:, 1].min()) and float(out[:, 1].max()) <= 1.0
    with pytest.raises(ValueError, match="no causal module"):
        create_model("tiny-nocausal").explain(image, tokens)


def test_predict_explains_on_the_input_grid(inputs):
    predictor = Predictor("tiny", inputs["ckpt"], device="cpu")
    a = predictor.predict(inputs["png"], PROMPT_A, explain=True)
    b = predictor.predict(inputs["png"], PROMPT_B, explain=True)
    assert a.causal_mask.shape == a.probability.shape == (88, 72)  # (X, Y): the picture's columns, rows
    assert a.causal_mask.dtype == np.float32 and 0.0 <= a.causal_mask.min() and a.causal_mask.max() <= 1.0
    assert a.causal_mask.std() > 0  # a map, not a constant
    assert not np.array_equal(a.probability, b.probability)  # the prediction follows the prompt
    # the mask generators see the image features before the text meets them: the causal mask does not depend on
    # the prompt (what the explanation shows is where the model looks, whatever it was asked)
    np.testing.assert_allclose(a.causal_mask, b.causal_mask, atol=1e-6)
    plain = predictor.predict(inputs["png"], PROMPT_A)
    assert plain.causal_mask is None
    np.testing.assert_array_equal(plain.mask, a.mask)


def test_cli_explain_writes_float_maps_with_the_volume_geometry(inputs, tmp_path, capsys):
    rc = cli.main(["predict", str(inputs["nii"]), str(inputs["png"]), "--prompt", PROMPT_A, "--checkpoint",
                   str(inputs["ckpt"]), "--device", "cpu", "--output-dir", str(tmp_path), "--explain"])
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


def test_cli_explain_refuses_a_model_without_the_causal_module(inputs, tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = save_weights(create_model("tiny-nocausal").state_dict(), tmp_path / "nocausal.pt")
    rc = cli.main(["predict", str(inputs["png"]), "--prompt", PROMPT_A, "--model", "tiny-nocausal", "--checkpoint",
                   str(ckpt), "--device", "cpu", "--output-dir", str(tmp_path / "out"), "--explain"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["error: model 'tiny-nocausal' has no causal module: --explain needs one"]
    assert not (tmp_path / "out").exists()


def test_the_bundles_explain_network_is_the_models_explain():
    model = create_model("tiny").eval()
    image, tokens = torch.randn(2, 3, 64, 64), model.tokenize(PROMPT_A)
    with torch.no_grad():
        torch.testing.assert_close(ExplainNetwork(model)(image, tokens), model.explain(image, tokens), rtol=0, atol=0)
    with pytest.raises(ValueError, match="explain needs a model with a causal module"):
        ExplainNetwork(create_model("tiny-nocausal"))
