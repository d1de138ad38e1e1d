"""Usage: python scripts/mirror_positions.py [N]   (DATA=dataset root, default ../shared/data/qata_cov19)

Issue 13, mirror gap: does the shipped model read absolute position? Per-image Dice on the first N valid images,
as stored and mirrored (image, mask and the prompt's sides), with and without every absolute position signal
mirrored too (CoordConv's x coordinate, the decoder's sine x encoding, the attention pool's position grid)."""
import json
import os
import sys
import time

import torch

import causalclipseg.model.decoder as decoder
import causalclipseg.model.encoders as encoders
import causalclipseg.model.layers as layers
from causalclipseg.evaluation.evaluate import evaluate_model, split_loader
from causalclipseg.inference.predictor import load_trained_model

torch.set_num_threads(1)
N = int(sys.argv[1]) if len(sys.argv) > 1 else 300
DATA = os.environ.get("DATA", "../shared/data/qata_cov19")
orig_coords, orig_sine = layers._coordinates, decoder.sine_position_encoding
orig_resize = encoders._resize_grid_embedding


def flipped_coords(x):
    return orig_coords(x).flip(-1)  # x runs the other way; y is symmetric under the horizontal flip


def flipped_sine(h, w, c, device, dtype):
    return orig_sine(h, w, c, device, dtype).reshape(h, w, c).flip(1).reshape(h * w, c)


def flipped_resize(pos, grid):
    out = orig_resize(pos, grid)
    h, w = grid
    table = out[1:].reshape(h, w, -1).flip(1).reshape(h * w, -1)
    return torch.cat([out[:1], table])


def positions(flip: bool) -> None:
    layers._coordinates = flipped_coords if flip else orig_coords
    decoder.sine_position_encoding = flipped_sine if flip else orig_sine
    encoders._resize_grid_embedding = flipped_resize if flip else orig_resize


model = load_trained_model(device="cpu")
results = {}
for mirror in (False, True):
    for flip in (False, True):
        positions(flip)
        start = time.time()
        loader = split_loader(model, DATA, "valid", batch_size=16, max_images=N, mirror=mirror)
        s = evaluate_model(model, loader, torch.device("cpu")).summary(n_resamples=0)
        key = f"{'mirrored' if mirror else 'stored'}, positions {'mirrored' if flip else 'as trained'}"
        results[key] = round(s.per_image.dice.value, 4)
        print(key, results[key], f"{time.time() - start:.0f}s", flush=True)
print(json.dumps({"n_images": N, "per_image_dice": results}, indent=2))
