"""The train task: fine-tune the served weights on the labels saved in the datastore (the active-learning loop).

Each run reads the images with a ``final`` label from the datastore and writes a MONAI datalist JSON of 2-D image and
label pairs as the model sees them (read as inference reads them, DICOM as a viewer shows it, in display
orientation; volumes as their slices). A share of the labelled images (``val_fraction``, at least one) is held out:
its pairs are the validation split, the rest are learnt from; with fewer than ``min_labels`` usable labelled images
the task refuses, saying so. The images held out are the first ones in the order of a hash of their ids, so that
mostly the same images stay held out as labels accumulate. The package's one trainer
(:func:`causalclipseg.training.trainer.train`: the min-max step, validation on the held-out pairs, atomic
checkpoints) starts from the weights the infer task serves. Then the served weights and the new best are both
scored on the held-out pairs with the package's evaluation
(:func:`causalclipseg.evaluation.evaluate.evaluate_checkpoint`); the new weights are published atomically to
``<model_dir>/causalclipseg_finetuned.pt``, which the infer task serves from its next request on, only when their
per-image Dice is higher; otherwise the served weights stay. Both scores and the decision are in the task's result
and ``stats``.

Labels saved from Slicer carry no text. The prompt of a record is, in order: ``prompt`` in the label's info (the
``params`` of ``PUT /datastore/label``), ``params.prompt`` there (labels saved by an inference with ``save_label``),
``prompt`` in the image's info, else the task's configured ``prompt``. Prompts name the patient's sides, unless the
same place says ``"prompt_side": "viewer"``; the datalist says ``"prompt_side": "patient"``, and the training
engine translates them to the served model's convention.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask

from causalclipseg.data.prompts import check_prompt_side, to_model_side
from causalclipseg.evaluation.evaluate import evaluate_checkpoint
from causalclipseg.io.formats import error_reason
from causalclipseg.io.orientation import GEOMETRY_KEY, DisplayOrientation
from causalclipseg.io.reader import LoadSegmentableImaged
from causalclipseg.io.writers import atomic_write
from causalclipseg.training.trainer import TrainConfig, train

from .common import BadRequestError

logger = logging.getLogger(__name__)

__all__ = ["FineTuneFromDatastore", "datastore_records"]


def _prompt_for(datastore: Datastore, image_id: str, label_id: str, tag: str, default: str) -> tuple[str, str]:
    """The record's prompt, worded with the patient's sides, and where it came from.

    Raises:
        ValueError: if the place of the prompt names an unknown ``prompt_side``.
    """
    label_info = datastore.get_label_info(label_id, tag) or {}
    params = label_info.get("params") if isinstance(label_info.get("params"), dict) else {}
    image_info = datastore.get_image_info(image_id) or {}
    for where, info in (("label info", label_info), ("label params", params), ("image info", image_info)):
        value = info.get("prompt")
        if isinstance(value, str) and value.strip():
            side = check_prompt_side(info.get("prompt_side", "patient"), f"{where} prompt_side of {image_id}")
            return to_model_side(value.strip(), side, "patient"), where
    return default, "default"


def datastore_records(datastore: Datastore, default_prompt: str, tag: str = DefaultLabelTag.FINAL) -> list[dict]:
    """``{"id", "image", "label", "prompt", "prompt_from"}`` for every image with a ``tag`` label."""
    records = []
    for image_id in sorted(datastore.get_labeled_images(label_tag=tag)):
        label_id = datastore.get_label_by_image_id(image_id, tag)
        if not label_id:
            continue
        prompt, where = _prompt_for(datastore, image_id, label_id, tag, default_prompt)
        records.append({"id": image_id, "image": datastore.get_image_uri(image_id),
                        "label": datastore.get_label_uri(label_id, tag), "prompt": prompt, "prompt_from": where})
    return records


def _as_training_pairs(record: dict, slice_dir: Path) -> list[dict]:
    """Datalist entries for one record: NIfTI image and label pairs as the model sees them (read like an inference
    input, in display orientation): a 2-D image as one pair, a volume as one pair per labelled slice (and as many
    unlabelled slices, evenly spread, at most).

    Raises:
        ValueError: if the image or label cannot be read, or they do not share a grid.
    """
    image = LoadSegmentableImaged("image")({"image": record["image"]})["image"]  # (1, X, Y) or (1, X, Y, Z)
    try:
        label = LoadImage(image_only=True, ensure_channel_first=True)(record["label"])
    except Exception as err:  # noqa: BLE001 - readers raise many types; all mean "unreadable"
        raise ValueError(f"cannot read label {record['label']}: {error_reason(err)}") from err
    label = label.as_subclass(torch.Tensor)
    if label.shape[0] > 1:
        label = label.amax(0, keepdim=True)  # a label drawn in colour
    while label.ndim > image.ndim and label.shape[-1] == 1:
        label = label[..., 0]  # a 2-D label saved as a single-slice volume
    spatial = tuple(image.shape[1:])
    if tuple(label.shape[1:]) != spatial:
        raise ValueError(f"label {Path(record['label']).name} has shape {tuple(label.shape[1:])}, its image "
                         f"{Path(record['image']).name} {spatial}: they must share a grid")
    # both in the image's display orientation, as inference shows the image to the model
    label = MetaTensor(label.float(), affine=image.affine, meta={GEOMETRY_KEY: image.meta[GEOMETRY_KEY]})
    orient = DisplayOrientation()
    image, label = orient(image).as_tensor(), orient(label).as_tensor()
    if image.ndim == 3:
        image, label = image[..., None], label[..., None]  # one slice
    lesion = (label[0] > 0).flatten(0, 1).any(0).numpy()  # per slice along the last axis
    labelled, empty = np.flatnonzero(lesion), np.flatnonzero(~lesion)
    n_empty = min(len(empty), max(len(labelled), 1))
    chosen = empty[np.linspace(0, len(empty) - 1, n_empty).round().astype(int)] if n_empty else empty
    keep = sorted({*labelled.tolist(), *chosen.tolist()})
    pairs = []
    slice_dir.mkdir(parents=True, exist_ok=True)
    for z in keep:
        stem = slice_dir / f"{record['id']}_z{z:04d}"
        nib.save(nib.Nifti1Image(image[0, ..., z].numpy().astype(np.float32), np.eye(4)), f"{stem}_image.nii.gz")
        nib.save(nib.Nifti1Image((label[0, ..., z] > 0).numpy().astype(np.uint8), np.eye(4)), f"{stem}_label.nii.gz")
        pairs.append({"image": f"{stem}_image.nii.gz", "label": f"{stem}_label.nii.gz", "prompt": record["prompt"]})
    return pairs


def _number(request: dict, key: str, kind: type, minimum: float, maximum: float | None = None) -> Any:
    value = request.get(key)
    try:
        number = kind(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number < minimum or (maximum is not None and number > maximum) or \
            (kind is int and isinstance(value, float) and not value.is_integer()):
        bound = f">= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
        raise BadRequestError(f"train option {key} must be a{'n integer' if kind is int else ' number'} {bound}, "
                              f"got {value!r}")
    return number


def _held_out_first(record: dict) -> str:
    """Sort key of the hold-out: a hash of the image id (stable across runs, unrelated to names or order)."""
    return hashlib.sha256(record["id"].encode("utf-8")).hexdigest()


class FineTuneFromDatastore(TrainTask):
    """Fine-tunes the served weights on the datastore's ``final`` labels; publishes them only when they beat the
    served weights on held-out labelled images.

    Config (``/info``, settable per request): ``max_epochs``, ``batch_size``, ``lr``, ``max_train`` (learn from at
    most N labelled images; 0: all), ``val_fraction`` (share of the labelled images held out, at least one),
    ``min_labels`` (fewer usable labelled images: refused), ``prompt`` (for labels without text), ``device``
    (``auto``, ``cpu``, ``cuda``), ``augment``, ``seed``.

    Args:
        infer_task: the infer task; training starts from the weights it serves (``get_path()``).
        model_dir: where runs go (``runs/<time>/``) and the fine-tuned weights are published.
        published: the published weight file (the last of the infer task's weight files).
        model_name: the variant.
        default_prompt: the prompt of labels without text.
    """

    def __init__(self, infer_task: Any, model_dir: str | os.PathLike, published: str | os.PathLike,
                 model_name: str, default_prompt: str) -> None:
        super().__init__("Fine-tune CausalCLIPSeg on the labels saved in the datastore (labels without text get "
                         "the configured prompt); the new weights are served only if they beat the served ones on "
                         "held-out labelled images")
        self.infer_task = infer_task
        self.model_dir = Path(model_dir)
        self.published = Path(published)
        self.model_name = model_name
        self._config = {"max_epochs": 5, "batch_size": 4, "lr": 1e-4, "max_train": 0, "val_fraction": 0.2,
                        "min_labels": 4, "prompt": default_prompt, "device": "auto", "augment": True, "seed": 0}

    def config(self) -> dict:
        return dict(self._config)

    def stats(self) -> dict:
        stats_file = self.model_dir / "train_stats.json"
        try:
            return json.loads(stats_file.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def __call__(self, request: dict, datastore: Datastore) -> dict:
        req = {**self._config, **{k: v for k, v in request.items() if k in self._config}}
        epochs = _number(req, "max_epochs", int, 1)
        batch_size = _number(req, "batch_size", int, 1)
        lr = _number(req, "lr", float, 1e-12, 1.0)
        max_train = _number(req, "max_train", int, 0)
        val_fraction = _number(req, "val_fraction", float, 0.0, 0.9)
        min_labels = _number(req, "min_labels", int, 2)
        seed = _number(req, "seed", int, 0)
        prompt = req["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadRequestError(f"train option prompt (for labels without text) must contain text, got {prompt!r}")
        augment = req["augment"] if isinstance(req["augment"], bool) else str(req["augment"]).lower() == "true"

        start = time.time()
        run_dir = self.model_dir / "runs" / time.strftime("%Y%m%d-%H%M%S")
        while run_dir.exists():
            run_dir = run_dir.with_name(run_dir.name + "_")
        records = datastore_records(datastore, prompt.strip())
        if not records:
            raise BadRequestError("no image in the datastore has a final label: save one (e.g. from Slicer) first")
        usable, skipped = [], []
        for record in records:
            try:
                usable.append((record, _as_training_pairs(record, run_dir / "slices")))
            except ValueError as err:
                skipped.append(f"{record['id']}: {err}")
                logger.warning("skipping %s: %s", record["id"], err)
        if len(usable) < min_labels:
            shutil.rmtree(run_dir, ignore_errors=True)
            unreadable = f" ({len(skipped)} more cannot be read: {'; '.join(skipped)})" if skipped else ""
            raise BadRequestError(f"the datastore holds {len(usable)} usable labelled images{unreadable}; fine-tuning "
                                  f"needs min_labels {min_labels}, some to learn from and some held out to check the "
                                  "new weights against the served ones: save more final labels, or lower min_labels "
                                  "(at least 2)")
        usable.sort(key=lambda item: _held_out_first(item[0]))
        n_val = min(max(1, round(len(usable) * val_fraction)), len(usable) - 1)
        held_out, learn = usable[:n_val], usable[n_val:][: max_train or None]
        training = [pair for _, pairs in learn for pair in pairs]
        validation = [pair for _, pairs in held_out for pair in pairs]
        datalist = run_dir / "datalist.json"
        datalist.write_text(json.dumps({"prompt_side": "patient", "training": training, "validation": validation},
                                       indent=2))

        init = self.infer_task.get_path()
        device = str(req["device"])
        cfg = TrainConfig(data=str(datalist), output_dir=str(run_dir / "train"), model=self.model_name,
                          init_checkpoint=init, epochs=epochs, batch_size=batch_size, lr=lr, encoder_lr_scale=1.0,
                          warmup_iterations=0, augment=augment, seed=seed, device=device, progress=False, cache=True,
                          num_workers=0)
        logger.info("fine-tuning %s from %s on %d images/slices of %d labelled images; %d held out (%d images/slices)",
                    self.model_name, init, len(training), len(learn), len(held_out), len(validation))
        try:
            best = train(cfg)
            new_weights = Path(cfg.output_dir) / "best_model.pt"
            scores = {name: evaluate_checkpoint(weights, datalist, "valid", model_name=self.model_name,
                                                batch_size=batch_size, device=device, n_resamples=0)
                      for name, weights in (("served", init), ("fine_tuned", new_weights))}
        except ValueError as err:
            raise BadRequestError(f"training cannot run: {err}") from err
        served, fine_tuned = (scores[k]["per_image/dice"] for k in ("served", "fine_tuned"))
        better = fine_tuned > served
        if better:
            atomic_write(self.published, lambda tmp: shutil.copyfile(new_weights, tmp))
            result = (f"published {self.published.name}: per-image Dice {fine_tuned:.4f} on the {len(held_out)} "
                      f"held-out labelled images, the served weights {served:.4f}")
        else:
            result = (f"kept serving {Path(init).name}: the fine-tuned weights scored per-image Dice {fine_tuned:.4f} "
                      f"on the {len(held_out)} held-out labelled images, the served ones {served:.4f}")
        stats = {
            "result": result,
            "published": str(self.published) if better else None,
            "serving": str(self.published) if better else init,
            "started_from": init,
            "run_dir": str(run_dir),
            "labelled_images": len(records),
            "training_images": len(learn),
            "held_out_images": [record["id"] for record, _ in held_out],
            "training_items": len(training),
            "validation_items": len(validation),
            "held_out_scores": {name: {k: summary[k] for k in ("n_images", "per_image/dice", "per_image/iou",
                                                               "dataset_level/dice", "dataset_level/iou")}
                                for name, summary in scores.items()},
            "prompts_from": {k: sum(r["prompt_from"] == k for r in records)
                             for k in ("label info", "label params", "image info", "default")},
            "skipped": skipped,
            "epochs": epochs,
            "best": best,
            "seconds": round(time.time() - start, 1),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        atomic_write(self.model_dir / "train_stats.json", lambda tmp: Path(tmp).write_text(json.dumps(stats, indent=2)))
        logger.info("%s", result)
        return stats
