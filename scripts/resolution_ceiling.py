"""Issue 13, how fine the output must be: the per-image Dice that the ground truth itself keeps when it is averaged
down to an output stride and upsampled back (bilinear, threshold 0.5), by the captions' extent. A model whose
prediction carries information only at stride s cannot do better than this on average.

    python scripts/resolution_ceiling.py [--data ../shared/data/qata_cov19] [--split valid] [--strides 4 8 16]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import LoadImage

from causalclipseg.data.datasets import read_dataset
from causalclipseg.data.prompts import infection_extent
from causalclipseg.evaluation.metrics import SegmentationScores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/qata_cov19")
    parser.add_argument("--split", default="valid")
    parser.add_argument("--strides", type=int, nargs="+", default=[4, 8, 16])
    args = parser.parse_args()
    records = read_dataset(args.data, args.split)
    load = LoadImage(image_only=True, ensure_channel_first=True)
    scores = {s: SegmentationScores() for s in args.strides}
    areas: dict[str, list[float]] = {}  # lesion area, % of the image, by extent
    for record in records:
        label = (torch.as_tensor(load(record["label"]))[None, :1] > 127).float()  # (1, 1, H, W)
        areas.setdefault(infection_extent(record["prompt"]), []).append(100 * label.mean().item())
        for stride, score in scores.items():
            coarse = F.interpolate(F.avg_pool2d(label, stride), size=label.shape[-2:], mode="bilinear",
                                   align_corners=False)
            score.update(coarse >= 0.5, label, groups=[infection_extent(record["prompt"])])
    result = {"command": f"python scripts/resolution_ceiling.py --data {args.data} --split {args.split} --strides "
                         + " ".join(map(str, args.strides)),
              "median_lesion_area_percent": {g: round(float(np.median(a)), 2) for g, a in areas.items()},
              "per_image_dice": {}}
    for stride, score in scores.items():
        row = {"all": round(score.summary(n_resamples=0).per_image.dice.value, 4)}
        for group in score.groups:
            row[group] = round(score.summary(n_resamples=0, group=group).per_image.dice.value, 4)
        result["per_image_dice"][f"stride {stride}"] = row
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
