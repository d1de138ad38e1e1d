"""MONAI Label app: text-prompted lesion segmentation (CausalCLIPSeg) served from the MONAI bundle in ``../bundle``.

Start (offline, nothing is downloaded)::

    monailabel start_server --app monailabel_app --studies STUDIES --host 127.0.0.1 --port 8000 \
        [--conf checkpoint WEIGHTS] [--conf model_dir DIR] [--conf prompt TEXT] [--conf bundle DIR] [--conf model NAME]

``--conf`` options: ``bundle`` (default ``../bundle`` beside this folder), ``checkpoint`` (the weights to serve;
default the bundle's ``models/model.pt``), ``model_dir`` (fine-tuning runs, the published fine-tuned weights and
``results/``, the labels being answered; default ``model/`` in this folder), ``prompt`` (the default prompt; default
the bundle's), ``model`` (the variant; default the bundle's), ``preload`` (``true`` loads the network at start).

Errors a request causes (an empty prompt, an unreadable image, an unknown model) answer HTTP 400/404 with one
line saying what is wrong; an uploaded image is deleted whether the request succeeds or not.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fastapi import HTTPException
from lib.common import BadRequestError, conf_path, remove_upload
from lib.infers import TextPromptSegmentation
from lib.trainers import FineTuneFromDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException

import causalclipseg

logger = logging.getLogger(__name__)

#: the name of the infer and train tasks (``/infer/causalclipseg``, ``/train/causalclipseg``)
MODEL = "causalclipseg"


class CausalCLIPSegApp(MONAILabelApp):
    """One infer task (the bundle, prompt per request) and one train task (fine-tuning from the datastore)."""

    def __init__(self, app_dir: str, studies: str, conf: dict) -> None:
        conf = dict(conf or {})
        here = Path(app_dir).resolve()
        self.bundle_dir = conf_path(conf, "bundle", here.parent / "bundle")
        self.checkpoint = conf_path(conf, "checkpoint", self.bundle_dir / "models" / "model.pt")
        self.model_dir = conf_path(conf, "model_dir", here / "model", must_exist=False)
        self.published = self.model_dir / f"{MODEL}_finetuned.pt"
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="CausalCLIPSeg",
                         description="Text-prompted lesion segmentation: send an image and a prompt describing the "
                                     "lesion; get the lesion mask on the image's grid (research use only)",
                         version=causalclipseg.__version__)

    def init_infers(self) -> dict:
        self.infer_task = TextPromptSegmentation(self.bundle_dir, self.conf, [self.checkpoint, self.published],
                                                 label_dir=self.model_dir / "results",
                                                 model_name=self.conf.get("model") or None,
                                                 prompt=self.conf.get("prompt") or None)
        served = self.infer_task.get_path()
        logger.info("%s: serving %s%s", MODEL, served,
                    " (fine-tuned here; delete it to serve the base weights again)" if served == str(self.published)
                    else "")
        return {MODEL: self.infer_task}

    def init_trainers(self) -> dict:
        task = self.infer_task
        return {MODEL: FineTuneFromDatastore(task, self.model_dir, self.published,
                                             model_name=task.bundle_config["model_name"],
                                             default_prompt=task.config()["prompt"])}

    def infer(self, request: dict, datastore=None) -> dict:
        """MONAI Label's ``infer``, with request errors answered as HTTP 400/404 and the upload always removed.

        MONAI Label deletes an uploaded image only after a successful answer; a failed request would leave it in
        the temporary folder.
        """
        image = request.get("image")
        if isinstance(image, str) and image and not os.path.exists(image) and \
                not (datastore or self.datastore()).get_image_uri(image):
            raise HTTPException(status_code=404, detail=f"image {image!r} is neither an image id of the datastore "
                                                        f"(GET /datastore/?output=all lists them) nor a file here")
        try:
            return super().infer(request, datastore)
        except BadRequestError as err:
            remove_upload(request.get("image"))
            raise HTTPException(status_code=400, detail=str(err)) from err
        except MONAILabelException as err:
            remove_upload(request.get("image"))
            if err.error is MONAILabelError.INVALID_INPUT:
                raise HTTPException(status_code=404, detail=err.msg) from err
            raise
        except BaseException:
            remove_upload(request.get("image"))
            raise

    def train(self, request: dict) -> dict:
        """MONAI Label's ``train``; a request it cannot serve (no labels, a bad option) is HTTP 400 with one line."""
        try:
            return super().train(request)
        except BadRequestError as err:
            logger.error("training refused: %s", err)
            raise HTTPException(status_code=400, detail=str(err)) from err
