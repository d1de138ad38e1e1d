"""Shared fixtures: tiny random models on the CPU, and the QaTa-COV19 location."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import causalclipseg

QATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "qata_cov19"
PROMPT = "bilateral pulmonary infection, two infected areas, lower left lung and lower right lung."

TINY_VIT = {
    "clip": {
        "model_cfg": {
            "embed_dim": 32,
            "vision_cfg": {"image_size": 64, "layers": 4, "width": 32, "head_width": 16, "patch_size": 16},
            "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        },
        "context_length": 32,
        "vit_feature_blocks": [0, 1],
    },
    "decoder": {"dim": 32, "num_layers": 1, "num_heads": 2, "ffn_dim": 64},
    "causal": {"hidden": 8},
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def register_config(tmp_path: Path, name: str, data: dict) -> str:
    """Write a model config JSON and register it; returns the name."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    causalclipseg.add_model_config(path)
    return name


def write_datalist(tmp_path: Path, n: int = 6) -> Path:
    """A MONAI datalist of ``n`` random 64x64 PNG images with box masks: ``n - 2`` training, 2 validation."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        img = rng.integers(0, 255, size=(64, 64), dtype=np.uint8)
        mask = np.zeros((64, 64), dtype=np.uint8)
        mask[10 + i:40, 5:30 + i] = 255
        Image.fromarray(img).save(tmp_path / f"img_{i}.png")
        Image.fromarray(mask).save(tmp_path / f"mask_{i}.png")
        rows.append({"image": f"img_{i}.png", "label": f"mask_{i}.png",
                     "prompt": "unilateral pulmonary infection, one infected area, lower left lung."})
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": rows[:-2], "validation": rows[-2:]}))
    return path


def save_dicom(ds, path: str | Path) -> Path:
    """Write ``ds`` as a proper DICOM file (preamble, file meta) with pydicom 3 or 2 (MONAI Label's pin)."""
    import pydicom
    option = ({"enforce_file_format": True} if int(pydicom.__version__.split(".")[0]) >= 3
              else {"write_like_original": False})
    ds.save_as(str(path), **option)
    return Path(path)


def pydicom_test_files() -> list[Path]:
    """Every file of pydicom's test data; skips, saying why, where this pydicom cannot list it (pydicom 2.4 needs
    ``pkg_resources``, which new setuptools no longer ship)."""
    import pydicom
    try:
        from pydicom.data import get_testdata_files
        return sorted(Path(f) for f in get_testdata_files() if Path(f).is_file())
    except ImportError as err:
        pytest.skip(f"pydicom {pydicom.__version__} cannot list its test data here: {err}")


@pytest.fixture
def qata_root() -> Path:
    if not (QATA_ROOT / "prompts" / "annotation.json").is_file():
        pytest.skip(f"QaTa-COV19 not found at {QATA_ROOT} (see the project README)")
    return QATA_ROOT
