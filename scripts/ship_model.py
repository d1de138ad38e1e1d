"""Replace the shipped model with a training run's best model, everywhere the project records it.

    python scripts/ship_model.py RUN_DIR [--data ../shared/data/qata_cov19]

RUN_DIR is a ``causalclipseg train`` (or ``compare``) run folder: ``best_model.pt``, ``best_metrics.json`` and
``train_config.json``. Its model must be the one the package, the bundle and the Slicer module load by default
(``causalclipseg.factory.DEFAULT_MODEL``). In order:

1. the package's weights (``causalclipseg/weights/causalclipseg_qata.pt``): the best model's plain state dict
   in float16, at most 20 MB, refused unless it loads into the model strictly; ``..._metrics.json`` beside it is the
   run's ``best_metrics.json`` (the validation epoch that selected it) with the run's training settings;
2. ``bundle/models/model.pt``: a byte-identical copy;
3. ``bundle/configs/metadata.json`` ``eval_metrics``: those validation scores (4 decimals) and the epoch;
4. ``docs/results/evaluate_valid_{none,swap,empty,mirror,flip_tta}.json``: ``causalclipseg evaluate`` of the new
   weights on the valid split (prompts as written, sides swapped, empty, mirrored, with flip test-time augmentation),
   each with its command and commit;
5. the generated tables (``scripts/readme_tables.py``).

The README's and the bundle docs' prose about the shipped model, and the bundle's version and changelog, are left to
the person shipping: the script prints what it changed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]  # this checkout's package, whatever the environment installed

import readme_tables  # noqa: E402

from causalclipseg.factory import DEFAULT_CHECKPOINT, DEFAULT_MODEL, create_model  # noqa: E402
from causalclipseg.training.checkpoint import save_weights  # noqa: E402

MAX_MB = 20
BUNDLE_WEIGHTS = ROOT / "bundle" / "models" / "model.pt"
METADATA = ROOT / "bundle" / "configs" / "metadata.json"
RESULTS = ROOT / "docs" / "results"
#: evaluate_valid_<name>.json: the extra ``causalclipseg evaluate`` arguments
EVALUATIONS = {"none": [], "swap": ["--prompt-transform", "swap"], "empty": ["--prompt-transform", "empty"],
               "mirror": ["--mirror"], "flip_tta": ["--flip-tta"]}
#: metadata eval_metrics key -> best_metrics.json key
EVAL_METRICS = {"val_per_image_mean_dice": "per_image/dice", "val_per_image_mean_iou": "per_image/iou",
                "val_dataset_level_dice": "dataset_level/dice", "val_dataset_level_iou": "dataset_level/iou"}
#: training settings copied into the weights' metrics file
SETTINGS = ("model", "epochs", "batch_size", "lr", "game", "confounder_weight", "reversal_max", "augment",
            "prompt_side", "seed")


def _commit() -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def ship_weights(run: Path) -> dict:
    """Steps 1-3; returns the run's best metrics."""
    config = json.loads((run / "train_config.json").read_text())
    if config["model"] != DEFAULT_MODEL:
        raise SystemExit(f"error: {run} trained {config['model']!r}, but the package, the bundle and the Slicer module "
                         f"load {DEFAULT_MODEL!r} (causalclipseg.factory.DEFAULT_MODEL); change that first")
    state = torch.load(run / "best_model.pt", map_location="cpu", weights_only=True)
    create_model(DEFAULT_MODEL).load_state_dict(state, strict=True)
    with tempfile.TemporaryDirectory() as tmp:
        candidate = save_weights(state, Path(tmp) / "weights.pt", half=True)
        size_mb = candidate.stat().st_size / 2**20
        if size_mb > MAX_MB:
            raise SystemExit(f"error: the float16 weights of {run} are {size_mb:.1f} MB; the shipped model is at most "
                             f"{MAX_MB} MB")
        shutil.copyfile(candidate, DEFAULT_CHECKPOINT)
    shutil.copyfile(DEFAULT_CHECKPOINT, BUNDLE_WEIGHTS)
    best = json.loads((run / "best_metrics.json").read_text())
    _write_json(DEFAULT_CHECKPOINT.with_name(DEFAULT_CHECKPOINT.stem + "_metrics.json"),
                {**best, "training": {k: config[k] for k in SETTINGS}})
    metadata = json.loads(METADATA.read_text())
    metrics = metadata["eval_metrics"]
    metrics.update({key: round(best[source], 4) for key, source in EVAL_METRICS.items()})
    metrics["_protocol"] = (
        f"QaTa-COV19 validation split ({best['n_images']} images; also the model-selection split), threshold 0.5; "
        "per_image: Dice/IoU per image then averaged (the LViT/CausalCLIPSeg protocol); dataset_level: "
        "intersections and unions summed over the split (the GuideDecoder protocol). "
        f"Best of {config['epochs']} epochs (epoch {best['epoch']}); the shipped weights reproduce these with "
        "`causalclipseg evaluate --data ../shared/data/qata_cov19 --split valid`. Not test-split numbers.")
    METADATA.write_text(json.dumps(metadata, indent=4) + "\n")
    print(f"weights: {DEFAULT_CHECKPOINT.relative_to(ROOT)} ({size_mb:.1f} MB) and {BUNDLE_WEIGHTS.relative_to(ROOT)}; "
          f"validation epoch {best['epoch']}: per-image Dice {best['per_image/dice']:.4f}")
    return best


def measure(data: str) -> None:
    """Step 4: the new weights through ``causalclipseg evaluate``, one results file per evaluation."""
    commit = _commit()
    for name, extra in EVALUATIONS.items():
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / f"{name}.json"
            args = ["evaluate", "--data", data, "--split", "valid", *extra]
            subprocess.run([sys.executable, "-m", "causalclipseg.cli", *args, "--json", str(out)], check=True,
                           cwd=ROOT)
            header = {"command": " ".join(["causalclipseg", *args]),
                      "code": f"commit {commit} with the weights shipped by scripts/ship_model.py",
                      "source": "written by scripts/ship_model.py"}
            _write_json(RESULTS / f"evaluate_valid_{name}.json", {**header, **json.loads(out.read_text())})
        print(f"measured: docs/results/evaluate_valid_{name}.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="training run folder (best_model.pt, best_metrics.json, "
                                               "train_config.json)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "qata_cov19"),
                        help="QaTa-COV19 root (valid split)")
    args = parser.parse_args(argv)
    ship_weights(args.run)
    measure(args.data)
    for message in readme_tables.update():
        print(f"tables: {message}")
    print("left to you: the README's and bundle/docs/README.md's prose about the shipped model, and the bundle's "
          "version and changelog (bundle/configs/metadata.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
