"""`verify-data`: every planted problem is found and printed (file and reason), clean data passes, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from openpyxl import Workbook
from PIL import Image

from causalclipseg.data.verify import main, verify_dataset

SHORT = "unilateral pulmonary infection, one infected area, lower left lung."
# 47 CLIP tokens (twice the sentence is exactly 32)
LONG = " ".join(["bilateral pulmonary infection, upper middle lower left lung and upper middle lower right lung"] * 3)


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def _mask(shape: tuple[int, int] = (16, 16), values: tuple[int, ...] = (0, 255)) -> np.ndarray:
    m = np.full(shape, values[0], np.uint8)
    for i, v in enumerate(values[1:], start=1):
        m[i * 2:i * 2 + 2, :] = v
    return m


def _sgseg(root: Path, planted: bool) -> Path:
    """train: 2 clean rows (+ 6 planted problems when ``planted``); valid: 1 clean row."""
    image = np.tile(np.arange(16, dtype=np.uint8) * 10, (16, 1))
    train = []
    for name in ("good_1", "good_2"):
        _png(root / f"images/train/images/{name}.png", image)
        _png(root / f"images/train/masks/mask_{name}.png", _mask())
        train.append({"image_path": f"mask_{name}.png", "caption": SHORT})
    if planted:
        _png(root / "images/train/images/missing_mask.png", image)  # its mask file is missing
        train.append({"image_path": "mask_missing_mask.png", "caption": SHORT})
        (root / "images/train/images/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        _png(root / "images/train/masks/mask_broken.png", _mask())
        train.append({"image_path": "mask_broken.png", "caption": SHORT})
        _png(root / "images/train/images/sized.png", image)
        _png(root / "images/train/masks/mask_sized.png", _mask((16, 12)))
        train.append({"image_path": "mask_sized.png", "caption": SHORT})
        _png(root / "images/train/images/grey.png", image)
        _png(root / "images/train/masks/mask_grey.png", _mask(values=(0, 128, 255)))
        train.append({"image_path": "mask_grey.png", "caption": SHORT})
        _png(root / "images/train/images/silent.png", image)
        _png(root / "images/train/masks/mask_silent.png", _mask())
        train.append({"image_path": "mask_silent.png", "caption": ""})
        _png(root / "images/train/images/verbose.png", image)
        _png(root / "images/train/masks/mask_verbose.png", _mask())
        train.append({"image_path": "mask_verbose.png", "caption": LONG})
    _png(root / "images/valid/images/v_1.png", image)
    _png(root / "images/valid/masks/mask_v_1.png", _mask())
    (root / "prompts").mkdir(parents=True)
    (root / "prompts/annotation.json").write_text(json.dumps({
        "train": train, "valid": [{"image_path": "mask_v_1.png", "caption": SHORT}]}))
    return root


def test_clean_dataset_passes(tmp_path, capsys):
    root = _sgseg(tmp_path / "clean", planted=False)
    report = verify_dataset(root, ["train", "val"])
    assert report.ok and report.layout == "sgseg" and report.counts == {"train": 2, "valid": 1}
    assert main([str(root)]) == 0
    out = capsys.readouterr().out
    assert "train: 2 usable records, 0 problems" in out and "valid: 1 usable records, 0 problems" in out
    assert "OK: no problems found" in out


def test_every_planted_problem_is_found(tmp_path, capsys):
    root = _sgseg(tmp_path / "planted", planted=True)
    expected = {
        "mask_missing_mask.png": "mask not found",
        "broken.png": "image cannot be decoded",
        "mask_sized.png": "mask size 12x16 differs from image size 16x16",
        "mask_grey.png": "mask is not binary: 3 values (0, 128, 255)",
        "mask_silent.png": "empty prompt",
        "verbose.png": "more than context_length 32 (would be truncated)",
    }
    report = verify_dataset(root, ["train", "valid"], context_length=32)
    assert report.problems["valid"] == []
    reasons = [str(p) for p in report.problems["train"]]
    for name, reason in expected.items():
        assert any(name in r and reason in r for r in reasons), (name, reason, reasons)
    # the image whose mask is missing is also reported as a file no row uses
    assert any(r.endswith("missing_mask.png: image file not used by any annotation row") for r in reasons)
    assert len(reasons) == len(expected) + 1

    assert main([str(root), "--splits", "train", "valid", "--context-length", "32"]) == 1
    lines = capsys.readouterr().out.splitlines()
    problem_lines = [line for line in lines if line.startswith("[train] ")]
    assert len(problem_lines) == len(expected) + 1
    for name, reason in expected.items():
        assert any(name in line and reason in line for line in problem_lines), (name, reason, problem_lines)
    assert "train: 6 usable records, 7 problems" in lines  # the row without a mask file is not usable
    assert "valid: 1 usable records, 0 problems" in lines
    assert lines[-1] == "FAILED: 7 problems found"
    # a larger context length accepts the long prompt
    assert len(verify_dataset(root, ["train"], context_length=77).problems["train"]) == len(expected)


def test_leak_between_splits_and_missing_split(tmp_path, capsys):
    root = tmp_path / "dl"
    _png(root / "a.png", np.zeros((8, 8)))
    _png(root / "a_mask.png", _mask((8, 8)))
    entry = {"image": "a.png", "label": "a_mask.png", "prompt": SHORT}
    (root / "datalist.json").write_text(json.dumps({"training": [entry], "validation": [entry]}))
    report = verify_dataset(root / "datalist.json", ["train", "valid", "test"])
    assert [p.reason for p in report.problems["valid"]] == ["image used also in split 'train' (a leak)"]
    assert report.problems["test"][0].reason.startswith("split 'test' cannot be read: split 'test' not in")
    assert main([str(root), "--splits", "train"]) == 0
    capsys.readouterr()


def test_lvit_broken_row_and_cli_errors(tmp_path, capsys):
    root = tmp_path / "lvit"
    _png(root / "Train_Folder/img/c_1.png", np.zeros((8, 8)))
    _png(root / "Train_Folder/labelcol/mask_c_1.png", _mask((8, 8)))
    workbook = Workbook()
    workbook.active.append(("Image", "Description"))
    workbook.active.append(("mask_c_1.png", ""))
    workbook.save(root / "Train_Folder/Train_text.xlsx")
    assert main([str(root), "--splits", "train"]) == 1
    out = capsys.readouterr().out
    assert "Train_text.xlsx:row 2 mask_c_1.png: no prompt" in out
    assert main([str(tmp_path / "nowhere")]) == 1
    assert "cannot be read" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main([str(root), "--splits", "dev"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    assert "(default: 32)" in help_text and "(default: ['train', 'valid'])" in help_text
