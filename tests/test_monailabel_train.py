"""The MONAI Label train task in process, without a server: the minimum, the hold-out, and no worse weights served.

A MONAI Label ``LocalDatastore`` over a folder of PNG X-rays with ``final`` labels, and the task itself
(``monailabel_app/lib/trainers.py``) with a stand-in for the infer task, which only says which weights it serves.
The task with a real server, publishing better weights, is in ``test_monailabel_app.py``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("monailabel", reason="MONAI Label is not installed here: pip install -e '.[test,monailabel]'")

from monailabel.datastore.local import LocalDatastore  # noqa: E402

from causalclipseg import create_model  # noqa: E402
from causalclipseg.training.checkpoint import save_weights  # noqa: E402
from monailabel_app.lib.common import BadRequestError  # noqa: E402
from monailabel_app.lib.trainers import FineTuneFromDatastore  # noqa: E402

PROMPT = "unilateral pulmonary infection, one infected area, lower left lung."


class _ServedWeights:
    """The infer task as the train task sees it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def get_path(self) -> str:
        return str(self.path)


def _datastore(root: Path, names: list[str], empty: set[str] = frozenset(), unreadable: set[str] = frozenset()):
    """A datastore of 64 x 64 PNG X-rays, each with a final label: a box, empty for ``empty``, not an image for
    ``unreadable``."""
    rng = np.random.default_rng(0)
    studies = root / "studies"
    studies.mkdir(parents=True)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(studies / f"{name}.png")
    datastore = LocalDatastore(str(studies), extensions=("*.png",), auto_reload=False)
    for i, name in enumerate(names):
        label = root / f"{name}_label.png"
        if name in unreadable:
            label.write_text("not a label")
        else:
            mask = np.zeros((64, 64), np.uint8)
            if name not in empty:
                mask[10 + i:40, 5:30 + i] = 1
            Image.fromarray(mask).save(label)
        datastore.save_label(name, str(label), "final", {"prompt": PROMPT})
    return datastore


def _task(root: Path, served: Path) -> FineTuneFromDatastore:
    model_dir = root / "model"
    return FineTuneFromDatastore(_ServedWeights(served), model_dir, model_dir / "causalclipseg_finetuned.pt",
                                 model_name="tiny", default_prompt=PROMPT)


def test_refuses_below_the_minimum_in_one_line(tmp_path):
    datastore = _datastore(tmp_path, ["a", "b", "c"], unreadable={"c"})
    served = save_weights(create_model("tiny").state_dict(), tmp_path / "served.pt")
    task = _task(tmp_path, served)
    assert task.config()["min_labels"] == 4
    with pytest.raises(BadRequestError) as refused:
        task({"max_epochs": 1}, datastore)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("the datastore holds 2 usable labelled images (1 more cannot be read: c: cannot read ")
    assert "needs min_labels 4" in message and "lower min_labels (at least 2)" in message
    with pytest.raises(BadRequestError, match=r"train option min_labels must be an integer >= 2, got 1"):
        task({"min_labels": 1}, datastore)
    assert not (tmp_path / "model" / "causalclipseg_finetuned.pt").exists()
    assert not list((tmp_path / "model" / "runs").glob("*/slices/*"))  # nothing left of the refused runs


def test_holds_out_images_and_keeps_serving_weights_that_are_not_beaten(tmp_path):
    """Three labelled images; the one held out (first by the hash of its id) has an empty label, and the served
    weights predict nothing anywhere: they score per-image Dice 1 there (both empty), which nothing can beat. The
    fine-tuned weights are scored on the same held-out pairs, reported, and not published."""
    names = ["a", "b", "c"]
    held_out = min(names, key=lambda name: hashlib.sha256(name.encode()).hexdigest())
    datastore = _datastore(tmp_path, names, empty={held_out})
    model = create_model("tiny")
    with torch.no_grad():
        model.projector.txt.bias[-1] = -1e4  # the dynamic kernel's bias: every logit far below 0
    served = save_weights(model.state_dict(), tmp_path / "served.pt")
    task = _task(tmp_path, served)
    stats = task({"max_epochs": 1, "batch_size": 2, "min_labels": 2, "augment": False}, datastore)

    assert stats["held_out_images"] == [held_out] and stats["training_images"] == 2
    datalist = json.loads((Path(stats["run_dir"]) / "datalist.json").read_text())
    ids = {split: {Path(r["image"]).name.split("_z")[0] for r in datalist[split]} for split in ("training",
                                                                                                  "validation")}
    assert ids == {"validation": {held_out}, "training": set(names) - {held_out}}
    scores = stats["held_out_scores"]
    assert scores["served"]["n_images"] == scores["fine_tuned"]["n_images"] == 1
    assert scores["served"]["per_image/dice"] == 1.0 and scores["fine_tuned"]["per_image/dice"] <= 1.0
    assert stats["published"] is None and stats["serving"] == str(served)
    assert stats["result"].startswith("kept serving served.pt: the fine-tuned weights scored per-image Dice")
    assert not (tmp_path / "model" / "causalclipseg_finetuned.pt").exists()
    assert task.stats() == stats  # what /info shows
