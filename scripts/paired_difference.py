"""Paired difference of per-image Dice between two evaluations of the same images.

    python scripts/paired_difference.py BASE.csv OTHER.csv [--resamples 2000]

BASE.csv and OTHER.csv are ``causalclipseg evaluate --csv`` rows (``name``, ``dice``, and ``group`` when the
captions say one) of the same split, e.g. without and with ``--flip-tta``. Images are matched by name; for all of
them and for each caption group (unilateral, bilateral, ...) it prints OTHER - BASE: the mean per-image Dice
difference with a percentile bootstrap 95% interval (images resampled with replacement, seed 0), and how many
images got better and worse. A paired interval is much narrower than the two evaluations' own intervals, which
overlap whenever the gain is small.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np


def read_rows(path: Path) -> dict[str, tuple[float, str]]:
    """``{name: (dice, group)}`` of an ``evaluate --csv`` file (group ``""`` without a ``group`` column).

    Raises:
        ValueError: if the file lacks the columns or names an image twice.
    """
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"name", "dice"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} is not an evaluate --csv file: it lacks {', '.join(sorted(missing))}")
        rows = [(r["name"], float(r["dice"]), r.get("group") or "") for r in reader]
    table = {name: (dice, group) for name, dice, group in rows}
    if len(table) != len(rows):
        raise ValueError(f"{path} names an image more than once")
    return table


def paired_difference(base: np.ndarray, other: np.ndarray, resamples: int = 2000, seed: int = 0) -> dict:
    """Mean of ``other - base`` with a percentile bootstrap 95% interval, and the counts that rose and fell."""
    diff = other - base
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (resamples, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"n": len(diff), "mean": float(diff.mean()), "low": float(low), "high": float(high),
            "better": int((diff > 0).sum()), "worse": int((diff < 0).sum())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", type=Path, help="evaluate --csv rows of the reference evaluation")
    parser.add_argument("other", type=Path, help="evaluate --csv rows of the evaluation compared with it")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    args = parser.parse_args(argv)
    try:
        base, other = read_rows(args.base), read_rows(args.other)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    names = sorted(set(base) & set(other))
    if not names or len(names) != len(base) or len(names) != len(other):
        print(f"error: the two files must score the same images ({len(base)} and {len(other)} rows, "
              f"{len(names)} shared)", file=sys.stderr)
        return 2
    groups = {"all": names}
    for name in names:
        if base[name][1]:
            groups.setdefault(base[name][1], []).append(name)
    for group, members in groups.items():
        r = paired_difference(np.array([base[n][0] for n in members]), np.array([other[n][0] for n in members]),
                              args.resamples)
        print(f"{group} ({r['n']} images): per-image Dice {r['mean']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}], "
              f"{r['better']} better, {r['worse']} worse")
    return 0


if __name__ == "__main__":
    sys.exit(main())
