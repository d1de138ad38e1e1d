"""``causalclipseg worker``: one loaded model answers many job requests, each as ``causalclipseg predict`` would."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from causalclipseg import cli, create_model
from causalclipseg.inference.predictor import Predictor
from causalclipseg.inference.worker import PredictWorker, serve
from causalclipseg.registry import _CONFIG_DIR, _CONFIGS, add_model_config
from causalclipseg.training.checkpoint import save_weights

PROMPT = "bilateral pulmonary infection, two infected areas, lower left lung and lower right lung."


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_weights(create_model("tiny").state_dict(), tmp_path_factory.mktemp("weights") / "tiny.pt")


def write_job(folder: Path, checkpoint: Path, prompt: str = PROMPT, shape: tuple[int, ...] = (40, 36, 1),
              **fields: object) -> Path:
    """A job folder as the Slicer module writes it (input.nii.gz, prompt.txt, request.json); returns request.json."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = np.random.default_rng(0).normal(0, 100, shape).astype(np.float32)
    affine = np.array([[0.9, 0.3, 0.0, -20.0], [-0.3, 0.9, 0.2, 15.0], [0.0, -0.2, 2.5, 40.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(volume, affine), folder / "input.nii.gz")
    (folder / "prompt.txt").write_text(prompt + "\n", encoding="utf-8")
    record = {"prompt": prompt, "device": "cpu", "threshold": 0.5, "model": "tiny", "checkpoint": str(checkpoint),
              "prompt_side": "patient", "explain": False, "input": str(folder / "input.nii.gz"),
              "prompt_file": str(folder / "prompt.txt"), "output_dir": str(folder / "output"), **fields}
    (folder / "request.json").write_text(json.dumps(record), encoding="utf-8")
    return folder / "request.json"


def answer_all(worker: PredictWorker, *requests: Path) -> list[dict]:
    answers = io.StringIO()
    assert serve(io.StringIO("".join(f"{r}\n" for r in requests)), answers, worker=worker) == 0  # ends at EOF
    return [json.loads(line) for line in answers.getvalue().splitlines()]


def test_one_model_answers_requests_as_predict_does(tmp_path: Path, checkpoint: Path) -> None:
    log: list[str] = []
    worker = PredictWorker(log=log.append)
    plain = write_job(tmp_path / "a", checkpoint)
    explained = write_job(tmp_path / "b", checkpoint, shape=(40, 36, 3), explain=True, threshold=0.3,
                          prompt_side="viewer")
    first, second = answer_all(worker, plain, explained)
    assert first["ok"] and first["request"] == str(plain) and first["seconds"] > 0
    assert first["files"] == [str(tmp_path / "a" / "output" / n) for n in ("input_mask.nii.gz", "input_overlay.png")]
    assert second["ok"] and [Path(f).name for f in second["files"]] == [
        "input_mask.nii.gz", "input_probability.nii.gz", "input_causal_mask.nii.gz"]
    assert sum("loading model" in line for line in log) == 1  # loaded once, kept for the second request
    # the second request's own threshold and prompt side were applied to the kept model
    out = tmp_path / "b" / "output"
    probability = np.asarray(nib.load(out / "input_probability.nii.gz").dataobj)
    assert probability.dtype == np.float32 and probability.shape == (40, 36, 3)
    np.testing.assert_array_equal(np.asarray(nib.load(out / "input_mask.nii.gz").dataobj), probability > 0.3)
    # the same files as `causalclipseg predict` with the same options
    reference, job = tmp_path / "reference", tmp_path / "b"
    assert cli.main(["predict", str(job / "input.nii.gz"), "--prompt-file", str(job / "prompt.txt"), "--prompt-side",
                     "viewer", "--threshold", "0.3", "--model", "tiny", "--checkpoint", str(checkpoint), "--device",
                     "cpu", "--explain", "--output-dir", str(reference)]) == 0
    for name in ("input_mask.nii.gz", "input_probability.nii.gz", "input_causal_mask.nii.gz"):
        np.testing.assert_array_equal(np.asarray(nib.load(out / name).dataobj),
                                      np.asarray(nib.load(reference / name).dataobj))


def test_a_flip_tta_request_writes_what_predict_flip_tta_writes(tmp_path: Path, checkpoint: Path) -> None:
    worker = PredictWorker(log=lambda text: None)
    job = write_job(tmp_path / "a", checkpoint, flip_tta=True, explain=True)
    plain = write_job(tmp_path / "b", checkpoint, explain=True)
    assert all(answer["ok"] for answer in answer_all(worker, job, plain))
    reference = tmp_path / "reference"
    assert cli.main(["predict", str(tmp_path / "a" / "input.nii.gz"), "--prompt", PROMPT, "--model", "tiny",
                     "--checkpoint", str(checkpoint), "--device", "cpu", "--explain", "--flip-tta",
                     "--output-dir", str(reference)]) == 0
    probability = {folder: np.asarray(nib.load(tmp_path / folder / "input_probability.nii.gz").dataobj)
                   for folder in ("a/output", "b/output", "reference")}
    np.testing.assert_array_equal(probability["a/output"], probability["reference"])
    assert np.abs(probability["a/output"] - probability["b/output"]).max() > 1e-4  # the kept model, flipped


def test_a_failing_request_is_one_line_and_the_worker_carries_on(tmp_path: Path, checkpoint: Path) -> None:
    log: list[str] = []
    worker = PredictWorker(log=log.append)
    empty_prompt = write_job(tmp_path / "empty", checkpoint)
    (tmp_path / "empty" / "prompt.txt").write_text("   \n")
    unreadable = write_job(tmp_path / "unreadable", checkpoint)
    (tmp_path / "unreadable" / "input.nii.gz").write_bytes(b"\x1f\x8b not a volume")
    incomplete = tmp_path / "incomplete.json"
    incomplete.write_text(json.dumps({"prompt_file": "p.txt", "output_dir": "out"}))
    wrong_type = write_job(tmp_path / "typed", checkpoint, explain="yes")
    good = write_job(tmp_path / "good", checkpoint)
    answers = answer_all(worker, empty_prompt, unreadable, incomplete, tmp_path / "missing.json", wrong_type, good)
    assert [a["ok"] for a in answers] == [False, False, False, False, False, True]
    errors = [a["error"] for a in answers[:-1]]
    assert all("\n" not in e for e in errors)
    assert errors[0].startswith("prompt must contain text")
    assert "input.nii.gz" in errors[1]
    assert errors[2] == f"the request {incomplete} lacks 'input'"
    assert errors[3].startswith(f"cannot read the request {tmp_path / 'missing.json'}")
    assert errors[4] == f"'explain' in the request {wrong_type} must be bool, got 'yes'"
    assert sum("loading model" in line for line in log) == 1


def test_a_rewritten_checkpoint_is_loaded_again(tmp_path: Path, checkpoint: Path) -> None:
    log: list[str] = []
    worker = PredictWorker(log=log.append)
    weights = tmp_path / "tiny.pt"
    weights.write_bytes(checkpoint.read_bytes())
    kept = worker.predictor("tiny", str(weights), "cpu")
    assert worker.predictor("tiny", str(weights), "cpu") is kept
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new epoch written to the same file
    assert worker.predictor("tiny", str(weights), "cpu") is not kept
    assert sum("loading model" in line for line in log) == 2


def test_a_request_with_a_model_config_runs_the_variant_it_registers(tmp_path: Path) -> None:
    """``model_config`` in a request registers a variant the package does not ship, as ``predict --model-config``
    does, and gives the same files; without it the name is an unknown model, and a missing or rewritten config file is
    an error line or a reload, the worker carrying on."""
    config = json.loads((_CONFIG_DIR / "tiny.json").read_text())
    config["decoder"]["dim"] = 32  # a variant no shipped weights fit
    variant = tmp_path / "worker-variant.json"
    variant.write_text(json.dumps(config))
    log: list[str] = []
    worker = PredictWorker(log=log.append)
    try:
        add_model_config(variant)
        torch.manual_seed(1)
        weights = save_weights(create_model("worker-variant").state_dict(), tmp_path / "variant.pt")
        _CONFIGS.pop("worker-variant")
        unregistered = write_job(tmp_path / "unregistered", weights, model="worker-variant")
        missing = write_job(tmp_path / "missing", weights, model="worker-variant",
                            model_config=str(tmp_path / "nowhere.json"))
        job = write_job(tmp_path / "job", weights, explain=True, model="worker-variant", model_config=str(variant))
        refused, lost, answered = answer_all(worker, unregistered, missing, job)
        assert not refused["ok"] and refused["error"].startswith("unknown model 'worker-variant'")
        assert lost == {"request": str(missing), "ok": False,
                        "error": f"model config path not found: {tmp_path / 'nowhere.json'}"}
        assert answered["ok"], answered
        reference = tmp_path / "reference"
        assert cli.main(["predict", str(tmp_path / "job" / "input.nii.gz"), "--prompt", PROMPT, "--model-config",
                         str(variant), "--model", "worker-variant", "--checkpoint", str(weights), "--device", "cpu",
                         "--explain", "--output-dir", str(reference)]) == 0
        for name in ("input_mask.nii.gz", "input_probability.nii.gz"):
            np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "job" / "output" / name).dataobj),
                                          np.asarray(nib.load(reference / name).dataobj))
        kept = worker.predictor("worker-variant", str(weights), "cpu", str(variant))
        assert worker.predictor("worker-variant", str(weights), "cpu", str(variant)) is kept
        os.utime(variant, ns=(time.time_ns(), time.time_ns() + 10**9))  # the config edited: the model is rebuilt
        assert worker.predictor("worker-variant", str(weights), "cpu", str(variant)) is not kept
    finally:
        _CONFIGS.pop("worker-variant", None)


def test_idle_timeout_and_closed_input_end_the_worker() -> None:
    log: list[str] = []
    read, write = os.pipe()
    with os.fdopen(read) as requests, os.fdopen(write, "w"):  # open and silent: the client is alive but idle
        start = time.monotonic()
        assert serve(requests, io.StringIO(), idle_timeout=0.5, worker=PredictWorker(log=log.append)) == 0
    assert 0.5 <= time.monotonic() - start < 5 and log == ["idle for 0.5 s: exiting"]
    assert serve(io.StringIO(""), io.StringIO(), idle_timeout=30, worker=PredictWorker(log=log.append)) == 0
    with pytest.raises(ValueError, match="idle_timeout must be positive"):
        serve(io.StringIO(""), io.StringIO(), idle_timeout=0)


def test_cli_worker_refuses_a_negative_idle_timeout(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["worker", "--idle-timeout", "-1"]) == 2
    assert capsys.readouterr().err == "error: --idle-timeout must be 0 (never) or positive seconds, got -1\n"


def test_predictor_configure_validates(checkpoint: Path) -> None:
    predictor = Predictor("tiny", checkpoint, device="cpu")
    predictor.configure(0.25, "viewer")
    assert (predictor.threshold, predictor.prompt_side) == (0.25, "viewer")
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\), got 1.5"):
        predictor.configure(1.5, "patient")
    with pytest.raises(ValueError, match="prompt_side"):
        predictor.configure(0.5, "left")
    assert (predictor.threshold, predictor.prompt_side) == (0.25, "viewer")  # unchanged by a refused call
