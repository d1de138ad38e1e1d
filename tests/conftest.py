"""Shared fixtures: tiny random models on the CPU, and the QaTa-COV19 location."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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


@pytest.fixture
def qata_root() -> Path:
    if not (QATA_ROOT / "prompts" / "annotation.json").is_file():
        pytest.skip(f"QaTa-COV19 not found at {QATA_ROOT} (see the project README)")
    return QATA_ROOT
