"""The analysis scripts in ``scripts/`` that are not run by other tests: on files the tests write themselves."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from causalclipseg.evaluation.metrics import SegmentationScores

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _rows(path: Path, masks: list[np.ndarray], label: np.ndarray, groups: list[str]) -> Path:
    """An ``evaluate --csv`` file (the package's own writer) of ``masks`` against one ``label``."""
    scores = SegmentationScores()
    for i, (mask, group) in enumerate(zip(masks, groups)):
        scores.update(torch.as_tensor(mask)[None, None], torch.as_tensor(label)[None, None], names=[f"img{i}.png"],
                      groups=[group])
    scores.to_csv(path)
    return path


def _run(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / "paired_difference.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def test_paired_difference_matches_images_by_name_and_groups_them(tmp_path):
    label = np.zeros((8, 8), np.float32)
    label[2:6, 2:6] = 1  # 16 pixels
    grown = [label.copy() for _ in range(4)]
    for i, mask in enumerate(grown):
        mask[6, : i + 1] = 1  # base: i + 1 false positives each
    base = _rows(tmp_path / "base.csv", grown, label, ["unilateral", "unilateral", "bilateral", "bilateral"])
    other = _rows(tmp_path / "other.csv", [label, label, grown[2], label * 0], label,
                  ["unilateral", "unilateral", "bilateral", "bilateral"])
    result = _run(base, other, "--resamples", 200)
    assert result.returncode == 0, result.stderr
    dice = [32 / (32 + i + 1) for i in range(4)]  # 2 |A n B| / (|A| + |B|)
    diff = [1 - dice[0], 1 - dice[1], 0.0, -dice[3]]
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"all (4 images): per-image Dice {np.mean(diff):+.4f} [")
    assert lines[0].endswith("2 better, 1 worse")
    assert lines[1].startswith(f"unilateral (2 images): per-image Dice {np.mean(diff[:2]):+.4f} [")
    assert lines[2].startswith(f"bilateral (2 images): per-image Dice {np.mean(diff[2:]):+.4f} [")
    assert lines[2].endswith("0 better, 1 worse")


def test_paired_difference_refuses_files_of_other_images(tmp_path):
    label = np.ones((4, 4), np.float32)
    base = _rows(tmp_path / "base.csv", [label, label], label, ["a", "a"])
    other = _rows(tmp_path / "other.csv", [label], label, ["a"])
    result = _run(base, other)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: the two files must score the same images (2 and 1 rows, 1 shared)"
    (tmp_path / "bad.csv").write_text("x,y\n1,2\n")
    result = _run(base, tmp_path / "bad.csv")
    assert result.returncode == 2 and "is not an evaluate --csv file: it lacks dice, name" in result.stderr
