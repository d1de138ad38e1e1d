"""The package's MONAI transforms: image + prompt in, tensors out (the pipelines that use them are in
:mod:`causalclipseg.data.pipelines`).

Axis convention. Images are loaded by MONAI's ``LoadImaged``, which follows the world (ITK/NIfTI) convention for
every reader: the first spatial axis is x, the image's columns (PIL images arrive transposed, ``(C, W, H)``;
DICOM and NIfTI arrive as ``(C, X, Y)``). All readers thus agree, geometry metadata stays valid, and
``SaveImage``/``Invertd`` write predictions back on the input grid. Spatial axis :data:`LATERAL_AXIS` (= 0, tensor
dim 1) is therefore the left-right axis of the picture as a viewer sees it, and is the axis
:class:`RandLateralFlipd` flips. Shapes are written ``(C, H, W)`` in this package; since images are resized to a
square ``S x S`` the distinction is only one of orientation, which the model learns.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandFlipd, Transform
from monai.utils import TraceKeys

from ..tokenizer import PromptTokenizer
from .prompts import get_prompt_transform, swap_laterality

__all__ = [
    "LATERAL_AXIS",
    "Binarize",
    "Binarized",
    "Grayscale2D",
    "Grayscale2Dd",
    "PromptTransformd",
    "RandLateralFlipd",
    "TokenizeText",
    "TokenizeTextd",
    "check_size",
]

LATERAL_AXIS = 0


_REDUCTIONS = ("mean", "max")


def check_size(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")


class Grayscale2D(Transform):
    """Channel-first 2-D image ``(C, X, Y[, 1...])`` to one channel ``(1, X, Y)``.

    X-rays arrive as 8/16-bit grayscale PNG, RGB(A) PNG/JPEG, DICOM, or single-slice NIfTI ``(X, Y, 1)``; this
    drops trailing singleton spatial axes, drops an alpha channel, and merges colour channels.

    Args:
        reduction: ``"mean"`` for images, ``"max"`` for masks (a mask drawn in any colour stays foreground).
    """

    def __init__(self, reduction: str = "mean") -> None:
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        """Reduce ``img`` ``(C, X, Y[, 1...])`` to float32 ``(1, X, Y)``.

        Raises:
            ValueError: if ``img`` has more than two non-singleton spatial axes, or fewer than two spatial axes.
        """
        img = torch.as_tensor(img) if not isinstance(img, torch.Tensor) else img
        while img.ndim > 3 and img.shape[-1] == 1:
            img = img.squeeze(-1)  # (C, X, Y, 1) -> (C, X, Y)
        if img.ndim != 3:
            raise ValueError(f"image must be channel-first 2-D (C, X, Y), got shape {tuple(img.shape)}; "
                             f"volumes are segmented slice by slice")
        img = img.to(torch.float32)
        if img.shape[0] == 4:
            img = img[:3]  # RGBA -> RGB
        if img.shape[0] > 1:
            img = img.mean(dim=0, keepdim=True) if self.reduction == "mean" else img.amax(dim=0, keepdim=True)
        return img


class Grayscale2Dd(MapTransform):
    """Dictionary version of :class:`Grayscale2D`; ``reduction`` may be one per key."""

    def __init__(self, keys: KeysCollection, reduction: str | Sequence[str] = "mean",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        reductions = [reduction] * len(self.keys) if isinstance(reduction, str) else list(reduction)
        if len(reductions) != len(self.keys):
            raise ValueError(f"reduction must be one name or one per key ({len(self.keys)}), got {reduction!r}")
        self.converters = [Grayscale2D(r) for r in reductions]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, converter in self.key_iterator(d, self.converters):
            d[key] = converter(d[key])
        return d


class Binarize(Transform):
    """Mask to float32 {0, 1}: 1 where the value is strictly above ``threshold`` (default: any non-zero value)."""

    def __init__(self, threshold: float = 0.0) -> None:
        self.threshold = float(threshold)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        """``(img > threshold)`` as float32, same shape and metadata."""
        img = torch.as_tensor(img) if not isinstance(img, torch.Tensor) else img
        return (img > self.threshold).to(torch.float32)


class Binarized(MapTransform):
    """Dictionary version of :class:`Binarize`."""

    def __init__(self, keys: KeysCollection = "label", threshold: float = 0.0,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.binarize = Binarize(threshold)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.binarize(d[key])
        return d


class TokenizeText(Transform):
    """Prompt string to CLIP token ids ``(context_length,)`` int64, with the package's ``PromptTokenizer``.

    Truncation of prompts longer than ``context_length`` is logged as a warning by the tokenizer.

    Args:
        context_length: token slots, start- and end-of-text included.
        allow_empty: accept empty prompts (the ``empty`` prompt transform, to measure reliance on text).
    """

    def __init__(self, context_length: int = 32, allow_empty: bool = False) -> None:
        check_size("context_length", context_length, 3)
        self.tokenizer = PromptTokenizer(context_length)
        self.allow_empty = allow_empty

    def __call__(self, prompt: str) -> torch.Tensor:
        """Token ids of ``prompt``, ``(context_length,)`` int64, zero-padded.

        Raises:
            TypeError: if ``prompt`` is not a ``str``.
            ValueError: if ``prompt`` is empty and ``allow_empty`` is false.
        """
        return self.tokenizer(prompt, allow_empty=self.allow_empty)[0].to(torch.int64)


class TokenizeTextd(MapTransform):
    """Dictionary version of :class:`TokenizeText`: reads ``keys`` (a prompt string), writes ``output_key``.

    Args:
        keys: key of the prompt string (one key).
        output_key: key the token ids are written to; the prompt is kept.
        context_length: token slots, start- and end-of-text included.
        allow_empty: accept empty prompts.
    """

    def __init__(self, keys: KeysCollection = "prompt", output_key: str = "text", context_length: int = 32,
                 allow_empty: bool = False, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"keys must name one prompt key, got {self.keys}")
        self.output_key = output_key
        self.tokenize = TokenizeText(context_length, allow_empty)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.output_key] = self.tokenize(d[key])
        return d


class PromptTransformd(MapTransform):
    """Apply a named prompt transform (``none``, ``swap``, ``empty``; see :mod:`causalclipseg.data.prompts`)."""

    def __init__(self, keys: KeysCollection = "prompt", name: str = "none", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.name = name
        self.func = get_prompt_transform(name)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.func(d[key])
        return d


class RandLateralFlipd(RandFlipd):
    """Mirror image and mask left-right AND swap "left"/"right" in the prompt, drawn once per sample.

    Prompts name the patient's side; mirroring the picture moves each lung to the other side of the image, so the
    words must follow (docs/conventions.md). A flip without the swap teaches the model to ignore laterality.
    Flips spatial axis :data:`LATERAL_AXIS` in MONAI's loading convention; invertible like ``RandFlipd``.

    Args:
        keys: image-like keys flipped together.
        prompt_key: key of the prompt string, swapped when the flip happens; ``None`` to leave prompts alone.
        prob: probability of flipping a sample.
        spatial_axis: the axis to flip (keep the default unless images are loaded another way).
    """

    def __init__(self, keys: KeysCollection = ("image", "label"), prompt_key: str | None = "prompt",
                 prob: float = 0.5, spatial_axis: int = LATERAL_AXIS, allow_missing_keys: bool = False) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        super().__init__(keys, prob=prob, spatial_axis=spatial_axis, allow_missing_keys=allow_missing_keys)
        self.prompt_key = prompt_key

    def _swap_prompt(self, d: dict[Hashable, Any]) -> None:
        if self.prompt_key is None:
            return
        if self.prompt_key not in d:
            if self.allow_missing_keys:
                return
            raise KeyError(f"prompt_key {self.prompt_key!r} not in the data (keys: {list(d)}); pass prompt_key=None "
                           f"to flip without a prompt")
        d[self.prompt_key] = swap_laterality(d[self.prompt_key])

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        d = super().__call__(data, lazy)
        if self._do_transform:
            self._swap_prompt(d)
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        first = next(iter(self.key_iterator(d)), None)
        flipped = first is not None and self.get_most_recent_transform(d, first, check=False)[TraceKeys.DO_TRANSFORM]
        d = super().inverse(d)
        if flipped:
            self._swap_prompt(d)
        return d
