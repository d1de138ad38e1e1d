"""Dataset readers: SGSeg, LViT (QaTa and MosMedData+ naming) and MONAI datalist layouts, case-insensitive names,
broken rows reported, strict and non-strict reading, and the real QaTa-COV19 data when present."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from openpyxl import Workbook
from PIL import Image

from causalclipseg.data.datasets import (
    DatasetIndex,
    detect_layout,
    index_dataset,
    normalize_split,
    read_datalist,
    read_dataset,
    read_lvit,
    read_sgseg,
)

QATA = Path(__file__).resolve().parents[2] / "shared/data/qata_cov19"
CAPTION = "unilateral pulmonary infection, one infected area, lower left lung."


def _png(path: Path, size: tuple[int, int] = (8, 8), value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8)).save(path)
    return path


def _xlsx(path: Path, rows: list[tuple], header: tuple = ("Image", "Description")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    workbook = Workbook()
    sheet = workbook.active
    sheet.append(header)
    for row in rows:
        sheet.append(row)
    workbook.save(path)
    return path


def _sgseg(root: Path) -> Path:
    """train: 3 good rows (one with mixed-case files on disk), 1 missing mask, 1 empty caption; valid: 1 row."""
    for name in ("covid_1", "covid_2", "sub-a_dx"):
        _png(root / "images/train/images" / f"{name}.png")
        _png(root / "images/train/masks" / f"mask_{name}.png", value=255)
    (root / "images/train/images/covid_2.png").rename(root / "images/train/images/Covid_2.PNG")
    (root / "images/train/masks/mask_covid_2.png").rename(root / "images/train/masks/MASK_Covid_2.png")
    _png(root / "images/train/images/covid_9.png")  # its mask is missing
    _png(root / "images/train/images/covid_8.png")
    _png(root / "images/train/masks/mask_covid_8.png")
    _png(root / "images/valid/images/covid_5.png")
    _png(root / "images/valid/masks/mask_covid_5.png")
    annotation = {
        "train": [
            {"image_path": "mask_covid_1.png", "caption": CAPTION},
            {"image_path": "mask_covid_2.png", "caption": "bilateral pulmonary infection, two infected areas."},
            {"image_path": "mask_sub-a_dx.png", "caption": CAPTION},
            {"image_path": "mask_covid_9.png", "caption": CAPTION},
            {"image_path": "mask_covid_8.png", "caption": "  "},
        ],
        "valid": [{"image_path": "mask_covid_5.png", "caption": CAPTION}],
    }
    (root / "prompts").mkdir(parents=True)
    (root / "prompts/annotation.json").write_text(json.dumps(annotation))
    return root


def test_normalize_split_aliases_and_errors():
    assert [normalize_split(s) for s in ("train", "VAL", "valid", "validation", "test")] == [
        "train", "valid", "valid", "valid", "test"]
    with pytest.raises(ValueError, match="split must be one of.*'dev'"):
        normalize_split("dev")


def test_sgseg_reads_mixed_case_and_reports_broken_rows(tmp_path):
    root = _sgseg(tmp_path / "qata")
    assert detect_layout(root) == "sgseg"
    index = read_sgseg(root, "train")
    assert isinstance(index, DatasetIndex) and index.layout == "sgseg" and index.split == "train"
    assert [Path(r["image"]).name for r in index.records] == ["covid_1.png", "Covid_2.PNG", "sub-a_dx.png"]
    assert [Path(r["label"]).name for r in index.records] == ["mask_covid_1.png", "MASK_Covid_2.png",
                                                              "mask_sub-a_dx.png"]
    assert all(Path(r["image"]).is_absolute() and Path(r["label"]).is_file() for r in index.records)
    assert index.records[1]["prompt"] == "bilateral pulmonary infection, two infected areas."
    reasons = {str(p) for p in index.problems}
    assert any("mask_covid_9.png" in r and "mask not found" in r for r in reasons), reasons
    assert any("mask_covid_8.png" in r and "empty prompt" in r for r in reasons), reasons
    # covid_9.png has no usable row: reported as an unused image file
    assert any(r.endswith("covid_9.png: image file not used by any annotation row") for r in reasons), reasons
    assert len(index.problems) == 3


def test_read_dataset_strict_raises_naming_first_problems(tmp_path):
    root = _sgseg(tmp_path / "qata")
    with pytest.raises(ValueError, match=r"3 usable records, 3 problems: .*mask_covid_9\.png.*mask not found"):
        read_dataset(root, "train")
    records = read_dataset(root, "train", strict=False)
    assert len(records) == 3 and set(records[0]) == {"image", "label", "prompt"}
    assert len(read_dataset(root, "validation")) == 1
    with pytest.raises(ValueError, match="split 'test' not in"):
        read_dataset(root, "test")


def test_sgseg_duplicate_entry_reported(tmp_path):
    root = tmp_path / "d"
    _png(root / "images/train/images/a.png")
    _png(root / "images/train/masks/mask_a.png")
    (root / "prompts").mkdir()
    entry = {"image_path": "mask_a.png", "caption": CAPTION}
    (root / "prompts/annotation.json").write_text(json.dumps({"train": [entry, dict(entry, image_path="MASK_A.png")]}))
    index = read_sgseg(root, "train")
    assert len(index.records) == 1
    assert [p.reason for p in index.problems] == ["duplicate entry for this mask; the first one is kept"]


def _lvit_qata(root: Path) -> Path:
    """LViT QaTa naming; Train_text.xlsx inside Train_Folder (as LViT ships it), Val_text.xlsx in the root."""
    for name in ("covid_1", "covid_2", "covid_3"):
        _png(root / "Train_Folder/img" / f"{name}.png")
        _png(root / "Train_Folder/labelcol" / f"mask_{name}.png", value=255)
    (root / "Train_Folder/img/covid_3.png").rename(root / "Train_Folder/img/COVID_3.png")
    _xlsx(root / "Train_Folder/Train_text.xlsx", [
        ("mask_covid_1.png", "Unilateral pulmonary infection, one infected area, lower left lung."),
        ("mask_covid_2.png", None),  # broken row: no description
        ("Mask_Covid_3.PNG", "  Bilateral pulmonary infection, all left lung and all right lung.  "),
        ("mask_covid_7.png", "A row whose files are missing."),
        (None, None),  # blank trailing row: ignored
    ])
    _png(root / "Val_Folder/img/covid_4.png")
    _png(root / "Val_Folder/labelcol/mask_covid_4.png")
    _xlsx(root / "Val_text.xlsx", [("mask_covid_4.png", "Unilateral pulmonary infection, lower right lung.")])
    return root


def test_lvit_qata_layout(tmp_path):
    root = _lvit_qata(tmp_path / "QaTa-LViT")
    assert detect_layout(root) == "lvit"
    index = read_lvit(root, "train")
    assert index.source.endswith("Train_Folder/Train_text.xlsx")
    assert [(Path(r["image"]).name, Path(r["label"]).name) for r in index.records] == [
        ("covid_1.png", "mask_covid_1.png"), ("COVID_3.png", "mask_covid_3.png")]
    assert index.records[1]["prompt"] == "Bilateral pulmonary infection, all left lung and all right lung."
    reasons = [str(p) for p in index.problems]
    assert any(":row 3 mask_covid_2.png: no prompt" in r for r in reasons), reasons
    assert any(":row 5 mask_covid_7.png: mask not found" in r for r in reasons), reasons
    assert len(reasons) == 2  # covid_2's files belong to a row: the row is the one problem
    val = read_dataset(root, "val")
    assert len(val) == 1 and Path(val[0]["image"]).name == "covid_4.png"


def test_lvit_mosmed_layout_same_names_and_valid_xlsx(tmp_path):
    root = tmp_path / "MosMedDataPlus"
    for split, folder, xlsx in (("train", "Train_Folder", "Train_text.xlsx"), ("test", "Test_Folder", "Test_text.xlsx"),
                                ("valid", "Val_Folder", "Valid_text.xlsx")):
        _png(root / folder / "img" / f"{split}_slice_07.png", value=40)
        _png(root / folder / "labelcol" / f"{split}_slice_07.png", value=1)
        _xlsx(root / folder / xlsx, [(f"{split}_slice_07.png", "Bilateral pulmonary infection, upper left lung.")])
    for split in ("train", "valid", "test"):
        records = read_dataset(root, split)
        assert len(records) == 1
        assert Path(records[0]["image"]).parent.name == "img" and Path(records[0]["label"]).parent.name == "labelcol"
        assert Path(records[0]["image"]).name == Path(records[0]["label"]).name == f"{split}_slice_07.png"


def test_lvit_spreadsheet_without_required_columns(tmp_path):
    root = tmp_path / "lvit"
    _png(root / "Train_Folder/img/a.png")
    _png(root / "Train_Folder/labelcol/a.png")
    _xlsx(root / "Train_Folder/Train_text.xlsx", [("a.png", "x")], header=("Name", "Text"))
    with pytest.raises(ValueError, match="must have columns 'Image'.*'Description'.*got \\['name', 'text'\\]"):
        read_dataset(root, "train")
    with pytest.raises(FileNotFoundError, match="no folder for split 'test'"):
        read_dataset(root, "test")


def test_datalist_layout_relative_paths_and_case(tmp_path):
    root = tmp_path / "dl"
    _png(root / "imgs/Case_A.PNG")
    _png(root / "masks/case_a.png")
    _png(root / "imgs/b.png")
    _png(root / "masks/b.png")
    datalist = {
        "training": [
            {"image": "imgs/case_a.png", "label": "Masks/CASE_A.png", "prompt": CAPTION},  # case differs from disk
            {"image": "imgs/b.png", "label": "masks/missing.png", "prompt": CAPTION},
            {"image": "imgs/b.png", "label": "masks/b.png", "prompt": ""},
        ],
        "validation": [{"image": "imgs/b.png", "label": "masks/b.png", "prompt": "right lung"}],
    }
    (root / "datalist.json").write_text(json.dumps(datalist))
    assert detect_layout(root / "datalist.json") == "datalist" and detect_layout(root) == "datalist"
    index = read_datalist(root / "datalist.json", "train")
    assert index.records == [{"image": str(root / "imgs/Case_A.PNG"), "label": str(root / "masks/case_a.png"),
                              "prompt": CAPTION}]
    assert [p.reason for p in index.problems] == [
        f"label not found ('missing.png' in {root / 'masks'})", "empty prompt"]
    assert read_dataset(root, "valid") == [{"image": str(root / "imgs/b.png"), "label": str(root / "masks/b.png"),
                                            "prompt": "right lung"}]
    with pytest.raises(ValueError, match=r"split 'test' not in .*datalist.json: looked for keys \['test', 'testing'\]"):
        index_dataset(root, "test")


def test_detect_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        detect_layout(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no known dataset layout"):
        detect_layout(tmp_path / "empty")


def test_real_qata_cov19():
    if not (QATA / "prompts/annotation.json").is_file():
        pytest.skip(f"QaTa-COV19 not found at {QATA}")
    from causalclipseg.data.pipelines import get_train_transforms, get_val_transforms

    train, valid = read_dataset(QATA, "train"), read_dataset(QATA, "valid")
    assert (len(train), len(valid)) == (5716, 1429)
    assert Path(train[0]["label"]).name == "mask_" + Path(train[0]["image"]).name
    for transforms in (get_train_transforms(224, 32), get_val_transforms(224, 32)):
        out = transforms(train[0])
        assert out["image"].shape == (3, 224, 224) and out["label"].shape == (1, 224, 224)
        assert out["text"].shape == (32,) and isinstance(out["prompt"], str)
        assert set(out["label"].unique().tolist()) == {0.0, 1.0}
