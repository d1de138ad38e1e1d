"""Issue 13, mirror gap: per-image Dice as stored and mirrored (image, mask and the prompt's sides) on the first N
valid images, for the shipped weights and for the best_model.pt of training runs.

    RUNS=work_dirs/ablation DATA=../shared/data/qata_cov19 python scripts/mirror_gap.py N [RUN ...]
"""

import json
import os
import sys

import torch

from causalclipseg.evaluation.evaluate import evaluate_model, split_loader
from causalclipseg.factory import DEFAULT_MODEL
from causalclipseg.inference.predictor import load_trained_model

torch.set_num_threads(1)
N = int(sys.argv[1])
DATA = os.environ.get("DATA", "../shared/data/qata_cov19")
RUNS = os.environ.get("RUNS", "work_dirs/ablation")
results = {}
for name, checkpoint in [("shipped", None)] + [(run, f"{RUNS}/{run}/best_model.pt") for run in sys.argv[2:]]:
    variant = DEFAULT_MODEL if checkpoint is None else json.loads(
        open(f"{RUNS}/{name}/train_config.json").read())["model"]
    model = load_trained_model(variant, checkpoint, device="cpu")
    row = {}
    for mirror in (False, True):
        loader = split_loader(model, DATA, "valid", 16, N, mirror=mirror)
        summary = evaluate_model(model, loader, torch.device("cpu")).summary(n_resamples=0)
        row["mirrored" if mirror else "stored"] = round(summary.per_image.dice.value, 4)
    results[name] = row
    print(name, row, flush=True)
print(json.dumps({"n_images": N, "per_image_dice": results}, indent=2))
