"""Where a user's prompt meets a model: its sides translated to the model's convention, then token ids."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from torch import nn

from ..data.prompts import check_prompt_side, names_a_side, swap_laterality, to_model_side
from ..io.orientation import GEOMETRY_KEY

__all__ = ["ModelTokensd", "WarnUnverifiableSided", "mirrored_model_tokens", "model_tokens",
           "warn_if_side_unverifiable"]

logger = logging.getLogger(__name__)


def model_tokens(model: nn.Module, prompt: str, prompt_side: str = "patient") -> torch.Tensor:
    """Token ids ``(1, L)`` of ``prompt`` as ``model`` understands it: its sides (``prompt_side``: whose left "left"
    is) translated to the convention the model was trained with (``model.prompt_side``), then validated and
    tokenised.

    Raises:
        ValueError, TypeError: for an unknown side or a prompt the tokenizer refuses.
    """
    check_prompt_side(prompt_side)
    model.tokenize(prompt)  # refuse a bad prompt as the user wrote it, before translating it
    return model.tokenize(to_model_side(prompt, prompt_side, model.prompt_side))


def mirrored_model_tokens(model: nn.Module, prompt: str, prompt_side: str = "patient") -> torch.Tensor:
    """:func:`model_tokens` of what ``prompt`` says about the image mirrored left-right: its "left" and "right"
    swapped (:func:`~causalclipseg.data.prompts.swap_laterality`), as flip test-time augmentation
    (:class:`~causalclipseg.inference.tta.MirrorAveraged`) needs."""
    return model_tokens(model, swap_laterality(prompt), prompt_side)


class ModelTokensd(MapTransform):
    """Pre-transform: the prompt's token ids for ``model`` under ``output_key`` (``(L,)`` int64), so that the
    evaluator hands them to the inferer with each image (``PrepareBatchExtraInput``).

    The prompt is the data's ``prompt_key`` when present, else the one given here. It is tokenised when the data
    arrive, with the convention of the weights loaded by then (a checkpoint loaded after this transform was built
    brings its own), and cached per prompt and convention.

    Args:
        model: the network the tokens are for (``tokenize`` and ``prompt_side``).
        prompt: the prompt when the data hold none; checked now.
        prompt_side: whose left the prompt's "left" is: ``patient`` (default) or ``viewer``.
        prompt_key: where the data may hold a prompt.
        output_key: where the token ids go.
        mirrored_key: where the token ids of the prompt with its sides swapped go (what the mirrored image shows,
            for :class:`~causalclipseg.inference.tta.MirrorAveraged`); ``None``: not made.

    Raises:
        ValueError, TypeError: for an unknown side or a prompt the tokenizer refuses.
    """

    def __init__(self, model: nn.Module, prompt: str | None = None, prompt_side: str = "patient",
                 prompt_key: str = "prompt", output_key: str = "text", mirrored_key: str | None = None) -> None:
        super().__init__(prompt_key, allow_missing_keys=True)
        self.model, self.prompt, self.prompt_side = model, prompt, check_prompt_side(prompt_side)
        self.prompt_key, self.output_key, self.mirrored_key = prompt_key, output_key, mirrored_key
        if prompt is not None:
            model.tokenize(prompt)
        self._cache: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # output key -> token ids

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        prompt = d.get(self.prompt_key, self.prompt)
        if prompt is None:
            raise ValueError(f"no prompt: the data have no {self.prompt_key!r} and none was configured")
        key = (prompt, self.model.prompt_side)
        if key not in self._cache:
            tokens = {self.output_key: model_tokens(self.model, prompt, self.prompt_side)[0]}
            if self.mirrored_key is not None:  # made only when asked for
                tokens[self.mirrored_key] = mirrored_model_tokens(self.model, prompt, self.prompt_side)[0]
            self._cache = {key: tokens}
        d.update(self._cache[key])
        return d


def warn_if_side_unverifiable(image: torch.Tensor, prompt: str, source: object) -> None:
    """Log a warning when ``prompt`` names a side and the loaded ``image``'s orientation is not recorded."""
    if names_a_side(prompt) and getattr(image, "meta", {}).get(GEOMETRY_KEY) == "unknown":
        logger.warning("%s does not record its orientation (no DICOM Image Orientation or Patient Orientation, no "
                       "NIfTI qform/sform, no NRRD space): it is taken as stored, the patient's left on the image's "
                       "right; check that the mask is on the side the prompt names", source)


class WarnUnverifiableSided(MapTransform):
    """Pre-transform: :func:`warn_if_side_unverifiable` for each image key, with the request's prompt (``data``'s
    ``prompt_key``, as MONAI Label passes it) or the one given here (the bundle's).

    Args:
        keys: image keys, as loaded (their ``meta`` says where the orientation comes from).
        prompt: the prompt when the data holds none.
        prompt_key: where the data holds its prompt.
    """

    def __init__(self, keys: KeysCollection = "image", prompt: str | None = None, prompt_key: str = "prompt",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.prompt, self.prompt_key = prompt, prompt_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        prompt = d.get(self.prompt_key, self.prompt)
        for key in self.key_iterator(d):
            if isinstance(prompt, str):
                image = d[key]
                warn_if_side_unverifiable(image, prompt, getattr(image, "meta", {}).get("filename_or_obj", key))
        return d
