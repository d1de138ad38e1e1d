"""``causalclipseg verify-data``: check a dataset before hours of training, and list every problem.

Checks, per split: every annotation row is usable and every data file is used (the readers'
:class:`~causalclipseg.data.datasets.Problem` list), image and mask files decode, image and mask sizes agree,
images are 2-D, masks are binary (at most two values, one of them 0), prompts are non-empty and fit the text
encoder's context length (longer prompts would be truncated), and no image appears twice (within a split or
across splits: a leak between training and validation).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from causalclipseg.data.datasets import Problem, index_dataset, normalize_split
from causalclipseg.tokenizer import PromptTokenizer

__all__ = ["VerificationReport", "main", "verify_dataset"]

_PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
_DEFAULT_SPLITS = ("train", "valid")


@dataclass
class VerificationReport:
    """What :func:`verify_dataset` found.

    Attributes:
        root: the dataset checked.
        layout: the detected layout (empty if it could not be detected).
        counts: usable records per split (canonical split names).
        problems: problems per split, in file order.
    """

    root: str
    layout: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    problems: dict[str, list[Problem]] = field(default_factory=dict)

    @property
    def n_problems(self) -> int:
        """Problems over all splits."""
        return sum(len(p) for p in self.problems.values())

    @property
    def ok(self) -> bool:
        """No problem found."""
        return self.n_problems == 0


@dataclass
class _Loaded:
    spatial_shape: tuple[int, ...]
    values: np.ndarray | None = None  # unique values, for masks


def _load(path: str, want_values: bool) -> _Loaded | str:
    """Decode ``path``; its spatial shape in MONAI's (X, Y) order, its unique values; or the reason it fails."""
    try:
        if Path(path).suffix.lower() in _PIL_SUFFIXES:
            from PIL import Image

            with Image.open(path) as im:
                im.load()
                array = np.asarray(im)
                shape = tuple(im.size)  # (W, H) = (X, Y), as MONAI's PILReader gives it
        else:
            from monai.transforms import LoadImage

            loaded = LoadImage(image_only=True, ensure_channel_first=True)(path)
            array = np.asarray(loaded)
            shape = tuple(int(s) for s in loaded.shape[1:])
            while len(shape) > 2 and shape[-1] == 1:
                shape = shape[:-1]
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a finding, reported with its message
        return f"cannot be decoded ({type(exc).__name__}: {exc})"
    if len(shape) != 2:
        return f"is not a 2-D image (spatial shape {shape})"
    return _Loaded(shape, np.unique(array) if want_values else None)


def _check_record(record: dict[str, str], tokenizer: PromptTokenizer) -> list[Problem]:
    """Problems of one record: decoding, sizes, binary mask, prompt length."""
    problems = []
    image = _load(record["image"], want_values=False)
    mask = _load(record["label"], want_values=True)
    if isinstance(image, str):
        problems.append(Problem(record["image"], f"image {image}"))
    if isinstance(mask, str):
        problems.append(Problem(record["label"], f"mask {mask}"))
    if not isinstance(image, str) and not isinstance(mask, str):
        if image.spatial_shape != mask.spatial_shape:
            problems.append(Problem(record["label"], f"mask size {_wh(mask.spatial_shape)} differs from image size "
                                                     f"{_wh(image.spatial_shape)} ({record['image']})"))
    if not isinstance(mask, str):
        values = mask.values
        if len(values) > 2:
            shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if len(values) > 6 else "")
            problems.append(Problem(record["label"], f"mask is not binary: {len(values)} values ({shown})"))
        elif len(values) == 2 and values.min() != 0:
            problems.append(Problem(record["label"], f"mask is not binary: two values ({values[0]:g}, "
                                                     f"{values[1]:g}) and neither is 0"))
    prompt = record["prompt"]
    if not prompt.strip():
        problems.append(Problem(record["image"], "empty prompt"))
    else:
        needed = tokenizer.num_tokens(prompt)
        if needed > tokenizer.context_length:
            problems.append(Problem(record["image"], f"prompt needs {needed} tokens, more than context_length "
                                                     f"{tokenizer.context_length} (would be truncated): {prompt!r}"))
    return problems


def _wh(shape: tuple[int, ...]) -> str:
    """``W x H`` of an (X, Y) shape."""
    return "x".join(str(s) for s in shape)


def verify_dataset(root: str | os.PathLike, splits: Sequence[str] = _DEFAULT_SPLITS, context_length: int = 32,
                   workers: int = 4) -> VerificationReport:
    """Check every record of ``splits`` (see the module docstring) and collect every problem.

    Args:
        root: a dataset root (SGSeg, LViT layout) or a MONAI datalist JSON.
        splits: split names (``train``, ``valid``/``val``/``validation``, ``test``).
        context_length: token slots of the text encoder the prompts must fit.
        workers: threads decoding files.

    Returns:
        the report; a split that cannot be read at all becomes one problem naming the reason.

    Raises:
        ValueError: if a split name is unknown or ``workers`` < 1.
    """
    canonical = [normalize_split(s) for s in splits]
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    tokenizer = PromptTokenizer(context_length)
    report = VerificationReport(str(root))
    first_split_of_image: dict[str, str] = {}
    for split in dict.fromkeys(canonical):
        problems: list[Problem] = []
        report.problems[split] = problems
        try:
            index = index_dataset(root, split)
        except (FileNotFoundError, ValueError, TypeError, OSError) as exc:
            report.counts[split] = 0
            problems.append(Problem(str(root), f"split {split!r} cannot be read: {exc}"))
            continue
        report.layout = index.layout
        report.counts[split] = len(index.records)
        problems += index.problems
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for found in pool.map(lambda r: _check_record(r, tokenizer), index.records):
                problems += found
        for record in index.records:
            key = os.path.normcase(os.path.realpath(record["image"]))
            if key in first_split_of_image:
                other = first_split_of_image[key]
                where = "twice in this split" if other == split else f"also in split {other!r} (a leak)"
                problems.append(Problem(record["image"], f"image used {where}"))
            else:
                first_split_of_image[key] = split
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of ``causalclipseg verify-data``; prints counts and every problem; 0 if clean, else 1."""
    parser = argparse.ArgumentParser(
        prog="causalclipseg verify-data",
        description="Check a text-annotated segmentation dataset (SGSeg, LViT or MONAI datalist layout) before "
                    "training: annotation rows, unused files, decoding, image/mask sizes, binary masks, prompt "
                    "lengths, images shared between splits. Prints every problem, one line each (file: reason). "
                    "Exit status 0 when clean, 1 when problems are found.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("root", help="dataset root folder (SGSeg or LViT layout) or a MONAI datalist JSON file")
    parser.add_argument("--splits", nargs="+", default=list(_DEFAULT_SPLITS),
                        help="splits to check: train, valid (val, validation), test")
    parser.add_argument("--context-length", type=int, default=32,
                        help="token slots of the text encoder; longer prompts are reported (they would be truncated)")
    parser.add_argument("--workers", type=int, default=4, help="threads decoding image files")
    args = parser.parse_args(argv)
    try:
        report = verify_dataset(args.root, args.splits, args.context_length, args.workers)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"dataset: {report.root} (layout: {report.layout or 'unknown'})")
    for split, count in report.counts.items():
        print(f"{split}: {count} usable records, {len(report.problems[split])} problems")
    for split, problems in report.problems.items():
        for problem in problems:
            print(f"[{split}] {problem}")
    if report.ok:
        print("OK: no problems found")
        return 0
    print(f"FAILED: {report.n_problems} problems found")
    return 1
