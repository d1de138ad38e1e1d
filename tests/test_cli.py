"""The command line: predict, train (with resume), evaluate; errors are one line and exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from causalclipseg import DEFAULT_MODEL, cli, create_model
from causalclipseg.factory import DEFAULT_CHECKPOINT, load_state_dict
from causalclipseg.registry import _CONFIG_DIR, _CONFIGS
from causalclipseg.training.checkpoint import save_weights

from .conftest import write_datalist

PROMPT = "bilateral pulmonary infection, two infected areas, lower left lung and lower right lung."


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_weights(create_model(DEFAULT_MODEL).state_dict(), tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def _xray(path: Path, size=(96, 64)) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, size=(size[1], size[0]), dtype=np.uint8)).save(path)
    return path


def test_predict_png_writes_mask_on_the_input_grid(tmp_path, checkpoint, capsys):
    image = _xray(tmp_path / "Chest_01.PNG", size=(96, 64))
    out = tmp_path / "out"
    assert cli.main(["predict", str(image), "--prompt", PROMPT, "--checkpoint", str(checkpoint),
                     "--output-dir", str(out), "--threshold", "0.5"]) == 0
    mask = np.array(Image.open(out / "Chest_01_mask.png"))
    assert mask.shape == (64, 96)  # rows x columns, as the input
    assert set(np.unique(mask)) <= {0, 255}
    overlay = Image.open(out / "Chest_01_overlay.png")
    assert overlay.size == (96, 64) and overlay.mode == "RGB"
    assert "Chest_01_mask.png" in capsys.readouterr().out
    # nothing is overwritten without --overwrite
    before = (out / "Chest_01_mask.png").read_bytes()
    assert cli.main(["predict", str(image), "--prompt", "lower left lung", "--checkpoint", str(checkpoint),
                     "--output-dir", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "Chest_01_mask.png").read_bytes() == before


def test_predict_prompt_file_with_commas_and_digits(tmp_path, checkpoint):
    image = _xray(tmp_path / "a.png")
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("left, right: 2 areas, 3rd zone\n", encoding="utf-8")
    out = tmp_path / "out"
    assert cli.main(["predict", str(image), "--prompt-file", str(prompt_file), "--checkpoint", str(checkpoint),
                     "--output-dir", str(out)]) == 0
    assert (out / "a_mask.png").exists()


def _oblique_affine() -> np.ndarray:
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.7, 0.9, 2.5])
    affine[:3, 3] = [-40.0, 12.5, 7.0]
    return affine


@pytest.mark.parametrize("shape", [(80, 64, 1), (64, 48, 5)])
def test_predict_nifti_keeps_geometry(tmp_path, checkpoint, shape):
    affine = _oblique_affine()
    data = np.random.default_rng(1).normal(size=shape).astype(np.float32) * 100
    src = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), src)
    before = src.read_bytes()
    out = tmp_path / "out"
    assert cli.main(["predict", str(src), "--prompt", PROMPT, "--checkpoint", str(checkpoint),
                     "--output-dir", str(out)]) == 0
    mask = nib.load(out / "scan_mask.nii.gz")
    assert mask.shape == shape
    np.testing.assert_allclose(mask.affine, affine, atol=1e-5)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    assert src.read_bytes() == before  # the input is untouched


def test_predict_errors_are_one_line(tmp_path, checkpoint, capsys):
    (tmp_path / "empty.png").write_bytes(b"")
    cases = [
        ([str(tmp_path / "missing.png"), "--prompt", PROMPT], "input not found"),
        ([str(tmp_path / "empty.png"), "--prompt", PROMPT], "cannot read"),
        ([str(_xray(tmp_path / "ok.png")), "--prompt", "   "], "prompt must contain text"),
        ([str(tmp_path / "ok.png"), "--prompt-file", str(tmp_path / "nope.txt")], "cannot read prompt file"),
    ]
    for args, message in cases:
        code = cli.main(["predict", *args, "--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, args
        assert err and err[-1].startswith("error: ") and message in err[-1], (args, err)
        assert not any("Traceback" in line for line in err)


def test_shipped_default_model_is_used_without_checkpoint(tmp_path):
    assert DEFAULT_CHECKPOINT.is_file(), "the default model must ship with the package"
    assert DEFAULT_CHECKPOINT.stat().st_size < 20 * 2**20
    assert all(isinstance(v, torch.Tensor) for v in load_state_dict(DEFAULT_CHECKPOINT).values())
    image = _xray(tmp_path / "x.png")
    assert cli.main(["predict", str(image), "--prompt", PROMPT, "--output-dir", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "x_mask.png").exists()


def _train_args(data: Path, out: Path, epochs: int) -> list[str]:
    # 12 iterations per epoch, resumable state every 2 iterations and at epoch ends
    return ["train", "--data", str(data), "--output-dir", str(out), "--epochs", str(epochs), "--batch-size", "2",
            "--checkpoint-every", "2", "--no-progress", "--warmup-iterations", "2", "--device", "cpu"]


def _checkpoint_step(path: Path) -> int:
    return int(path.stem.rsplit("_", 1)[1])


@pytest.mark.slow
def test_train_killed_mid_epoch_resumes_exactly(tmp_path):
    """SIGKILL in the middle of the second epoch, then the same command again: the resumed run (from a mid-epoch
    checkpoint) ends with the same model and optimiser state, bit for bit, as an uninterrupted run."""
    data = write_datalist(tmp_path, n=26)  # 24 training images, batch 2: 12 iterations per epoch
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"

    def command(out: Path) -> list[str]:  # both runs in fresh processes: same threads, same library state
        return [sys.executable, "-m", "causalclipseg.cli", *_train_args(data, out, epochs=2)]

    subprocess.run(command(straight), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    process = subprocess.Popen(command(resumed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600

    def steps() -> list[int]:
        return [_checkpoint_step(p) for p in (resumed / "checkpoints").glob("last_checkpoint_*.pt")]

    while not any(step > 12 for step in steps()) and time.monotonic() < deadline:
        assert process.poll() is None, "training ended before it could be interrupted"
        time.sleep(0.005)
    process.kill()
    process.wait(timeout=30)
    killed_at = max(steps())
    assert 12 < killed_at < 24, f"the kill came at iteration {killed_at}, not in the middle of epoch 2"
    for checkpoint in (resumed / "checkpoints").glob("last_*.pt"):  # what is on disk under its final name is whole
        torch.load(checkpoint, weights_only=True)
    subprocess.run(command(resumed), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    final = {d: [p.name for p in (d / "checkpoints").glob("last_*.pt")] for d in (straight, resumed)}
    assert final[straight] == final[resumed] == ["last_checkpoint_24.pt"]
    a = torch.load(straight / "checkpoints" / "last_checkpoint_24.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last_checkpoint_24.pt", weights_only=True)
    for key, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][key], tensor, rtol=0, atol=0, msg=key)
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for index, state in a["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(b["optimizer"]["state"][index][name], state[name], rtol=0, atol=0)
    history = [json.loads(line) for line in (resumed / "history.jsonl").read_text().splitlines()]
    assert history[-1]["epoch"] == 2
    # the run's clock went on from the checkpoint: it counts both processes, and matches the uninterrupted run's
    seconds = {d: json.loads((d / "history.jsonl").read_text().splitlines()[-1])["seconds"]
               for d in (straight, resumed)}
    assert 0 < history[0]["seconds"] < seconds[resumed] and b["clock"]["seconds"] >= history[0]["seconds"]
    assert seconds[resumed] > 0.5 * seconds[straight], seconds


def test_train_refuses_a_changed_config_in_one_line_unless_allowed(tmp_path, capsys, caplog):
    """A finished one-epoch run asked for more epochs at another learning rate: refused in one line naming both fields
    (old -> new) and nothing is touched; runtime fields alone (progress bar, workers, checkpoint interval) are no
    change; with --allow-config-change the run continues from its checkpoint and records the new values."""
    data = write_datalist(tmp_path, n=4)
    out = tmp_path / "run"
    assert cli.main(_train_args(data, out, epochs=1)) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    changed = [*_train_args(data, out, epochs=2), "--lr", "0.002"]
    assert cli.main(changed) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: output_dir {out} holds a run with epochs 1, lr 0.001; this call asks epochs 2, lr 0.002: "
                   "pass --allow-config-change (allow_config_change) to continue it with the new values, or choose a "
                   "new output_dir"]
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    runtime_only = [*_train_args(data, out, epochs=1), "--checkpoint-every", "5", "--num-workers", "1", "--progress"]
    assert cli.main(runtime_only) == 0  # the same run, complete: nothing to train
    assert (out / "checkpoints" / "last_checkpoint_1.pt").is_file()
    checkpoint = out / "checkpoints" / "last_checkpoint_1.pt"  # as saved before runs timed themselves
    legacy = torch.load(checkpoint, weights_only=True)
    del legacy["clock"]
    torch.save(legacy, checkpoint)
    with caplog.at_level("WARNING", logger="causalclipseg.training.trainer"):
        assert cli.main([*changed, "--allow-config-change"]) == 0
    assert "continuing the run with epochs 2, lr 0.002 instead of epochs 1, lr 0.001" in caplog.text
    assert [p.name for p in (out / "checkpoints").glob("last_*.pt")] == ["last_checkpoint_2.pt"]  # resumed, not redone
    assert [json.loads(line)["epoch"] for line in (out / "history.jsonl").read_text().splitlines()] == [1, 2]
    recorded = json.loads((out / "train_config.json").read_text())
    assert (recorded["epochs"], recorded["lr"], recorded["world_size"]) == (2, 0.002, 1)
    assert cli.main(changed) == 0  # the recorded run is now this config


def test_train_refuses_a_corrupted_checkpoint_in_one_line(tmp_path, capsys):
    data = write_datalist(tmp_path, n=4)
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    corrupt = out / "checkpoints" / "last_checkpoint_4.pt"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip archive")
    assert cli.main(_train_args(data, out, epochs=1)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot resume from checkpoint") and str(corrupt) in err
    assert len(err.strip().splitlines()) == 1
    assert corrupt.read_bytes() == b"PK\x03\x04 not really a zip archive"  # left for the user to inspect


def test_train_loss_weights_reach_the_loss_and_bad_ones_are_refused_first(tmp_path, capsys):
    """--lambda-dice / --lambda-bce weight the loss the trainer steps on; weights it cannot use are refused in one
    line before the output folder is made."""
    from causalclipseg.training.config import TrainConfig
    from causalclipseg.training.trainer import Trainer

    data = write_datalist(tmp_path, n=4)
    trainer = Trainer(TrainConfig(data=str(data), output_dir=str(tmp_path / "run"), lambda_dice=0.8, lambda_bce=0.2,
                                  device="cpu", progress=False))
    assert (trainer.loss_function.seg.lambda_dice, trainer.loss_function.seg.lambda_ce) == (0.8, 0.2)
    out = tmp_path / "refused"
    assert cli.main([*_train_args(data, out, epochs=1), "--lambda-dice", "0", "--lambda-bce", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: lambda_dice and lambda_bce must be >= 0 and not both 0, got 0.0 and 0.0"]
    assert not out.exists()


def test_train_rejects_a_bad_dataset(tmp_path, capsys):
    assert cli.main(["train", "--data", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "o"),
                     "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_a_model_config_file_is_trained_evaluated_and_used_by_name(tmp_path, capsys):
    """``--model-config FILE`` registers a variant the package does not ship (here the shipped one with deeper middle
    stages of its image encoder) for train, evaluate and predict; a file that is not a model config is one error
    line naming it, before anything runs; the name alone, unregistered, is not a choice."""
    config = json.loads((_CONFIG_DIR / f"{DEFAULT_MODEL}.json").read_text())
    config["clip"]["model_cfg"]["vision_cfg"]["layers"] = [1, 2, 2, 1]
    path = tmp_path / "my-variant.json"
    path.write_text(json.dumps(config))
    data, out = write_datalist(tmp_path, n=4), tmp_path / "run"
    named = ["--model-config", str(path), "--model", "my-variant"]
    try:
        assert cli.main([*_train_args(data, out, epochs=1), *named]) == 0
        assert json.loads((out / "train_config.json").read_text())["model"] == "my-variant"
        assert cli.main(["evaluate", "--data", str(data), "--split", "train", "--checkpoint",
                         str(out / "best_model.pt"), "--bootstrap", "10", *named]) == 0
        picture = _xray(tmp_path / "xray.png")
        assert cli.main(["predict", str(picture), "--prompt", PROMPT, "--checkpoint", str(out / "best_model.pt"),
                         "--output-dir", str(tmp_path / "masks"), *named]) == 0
        assert (tmp_path / "masks" / "xray_mask.png").is_file()
        capsys.readouterr()
        broken = tmp_path / "broken.json"
        broken.write_text("{not json")
        assert cli.main(["predict", str(picture), "--prompt", PROMPT, "--model-config", str(broken)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: invalid model config {broken}: ") and len(err.strip().splitlines()) == 1
        broken.write_text("[1, 2]")
        assert cli.main(["evaluate", "--data", str(data), "--model-config", str(broken)]) == 2
        err = capsys.readouterr().err
        assert err == f"error: invalid model config {broken}: a model config is a JSON object, got list\n"
    finally:
        _CONFIGS.pop("my-variant", None)
    done = subprocess.run([sys.executable, "-m", "causalclipseg.cli", "evaluate", "--data", str(data),
                           "--model", "my-variant"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "invalid choice: 'my-variant'" in done.stderr


def test_evaluate_reports_both_protocols(tmp_path, checkpoint, capsys):
    data = write_datalist(tmp_path)
    csv, summary = tmp_path / "rows.csv", tmp_path / "summary.json"
    assert cli.main(["evaluate", "--data", str(data), "--split", "train", "--checkpoint", str(checkpoint),
                     "--csv", str(csv), "--json", str(summary), "--bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    assert "per_image" in out and "dataset_level" in out
    result = json.loads(summary.read_text())
    assert result["n_images"] == 4 and 0 <= result["per_image/dice"] <= 1
    assert len(csv.read_text().strip().splitlines()) == 5  # header + 4 images
    assert cli.main(["evaluate", "--data", str(data), "--split", "train", "--checkpoint", str(checkpoint),
                     "--prompt-transform", "empty", "--bootstrap", "10"]) == 0


def test_help_and_argument_errors_answer_before_torch_is_imported():
    """``--help`` and a bad argument are answered from the registry alone; torch, open_clip and MONAI wait for a
    verb that runs (a fresh interpreter: this one has imported them)."""
    script = """
import sys
from causalclipseg import cli
def code(argv):
    try:
        return cli.main(argv)
    except SystemExit as end:  # argparse's own exits
        return end.code
codes = [code(argv) for argv in ([], ["predict", "x.png"], ["evaluate", "--model", "nope"], ["predict", "--help"],
                                 ["train", "--help"], ["train", "--data", "d", "--output-dir", "o", "--epochs", "x"],
                                 ["compare", "--help"], ["compare", "--data", "d", "--output-dir", "o", "--arms", "x"])]
print(codes, [m for m in ("torch", "open_clip", "monai") if m in sys.modules])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "[2, 2, 2, 0, 0, 2, 0, 2] []", done.stderr
    assert "--prompt" in done.stderr and "invalid choice: 'nope'" in done.stderr


def test_main_without_verb_prints_usage(capsys):
    assert cli.main([]) == 2
    assert "verify-data" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0
