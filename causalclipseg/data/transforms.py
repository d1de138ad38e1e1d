"""MONAI transforms shared by training, evaluation, inference and the bundle: image + prompt in, tensors out.

Output contract of :func:`get_train_transforms` and :func:`get_val_transforms` (per sample, before collation):

- ``image``: float32 ``(3, S, S)``, grayscale scaled to [0, 1] per image (min-max), repeated to 3 channels,
  normalised with open_clip's ``OPENAI_DATASET_MEAN``/``STD``;
- ``label``: float32 ``(1, S, S)``, values in {0, 1} (mask > 0);
- ``text``: int64 ``(context_length,)`` CLIP token ids;
- ``prompt``: the prompt string the tokens encode (after laterality swap or prompt transform).

:func:`get_inference_transforms` gives ``image``, ``text`` and ``prompt`` from ``{"image": path, "prompt": str}``.

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

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImage,
    LoadImaged,
    MapTransform,
    NormalizeIntensity,
    NormalizeIntensityd,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RepeatChannel,
    RepeatChanneld,
    Resize,
    Resized,
    ScaleIntensity,
    ScaleIntensityd,
    Transform,
)
from monai.utils import TraceKeys
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from causalclipseg.data.prompts import get_prompt_transform, swap_laterality
from causalclipseg.tokenizer import PromptTokenizer

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
    "LoadSegmentableImaged",
    "get_inference_transforms",
    "get_slice_preprocessing",
    "get_load_transforms",
    "get_train_transforms",
    "get_val_transforms",
]

#: Spatial axis (tensor dim ``1 + LATERAL_AXIS`` of a channel-first image) that runs left-right across the picture
#: as a viewer sees it, in MONAI's loading convention (see the module docstring).
LATERAL_AXIS = 0

_REDUCTIONS = ("mean", "max")


def _check_size(name: str, value: int, minimum: int) -> None:
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
        _check_size("context_length", context_length, 3)
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
    words must follow (DESIGN.md section 1). A flip without the swap teaches the model to ignore laterality.
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


class LoadSegmentableImaged(MapTransform):
    """Read an image file or DICOM series into what the slice-wise network takes, on its own grid (no resampling).

    MONAI's ``LoadImage`` reads it (PNG/JPEG/BMP/TIFF, DICOM file or series folder, NIfTI, NRRD) channel first with
    its metadata (affine, file name); 2-D inputs (and volumes with one slice) become grayscale ``(1, X, Y)``
    (colour merged, alpha dropped, as in training); volumes stay ``(1, X, Y, Z)``, segmented slice by slice along Z.

    Raises:
        ValueError: for an unreadable file, a multi-channel volume or non-finite pixel values, naming the file.
    """

    def __init__(self, keys: str | Sequence[str] = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadImage(image_only=True, ensure_channel_first=True)
        self.grayscale = Grayscale2D("mean")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            source = d[key]
            try:
                img = self.loader(source)
            except Exception as err:  # noqa: BLE001 - readers raise many types; all mean "unreadable"
                reason = (str(err.__cause__ or err).strip().splitlines() or [type(err).__name__])[-1]
                raise ValueError(f"cannot read {source}: {reason}") from err
            spatial = [s for s in img.shape[1:]]
            while len(spatial) > 2 and spatial[-1] == 1:
                spatial.pop()
            if len(spatial) == 2:
                img = self.grayscale(img)
            elif len(spatial) == 3 and img.shape[0] == 1:
                img = img.reshape(1, *spatial).float()
            else:
                raise ValueError(f"cannot segment {source}: expected a 2-D image or a single-channel 3-D volume, got "
                                 f"{img.shape[0]} channel(s) of shape {tuple(img.shape[1:])}")
            if not torch.isfinite(img).all():
                raise ValueError(f"cannot segment {source}: it contains NaN or infinite pixel values")
            d[key] = img
        return d


def get_load_transforms(image_size: int = 224, keys: Sequence[str] = ("image", "label")) -> list[Transform]:
    """The deterministic loading prefix: read, channel first, grayscale, [0, 1], resize to ``S x S``, binarise mask.

    Output: ``image`` float32 ``(1, S, S)`` in [0, 1]; ``label`` (if in ``keys``) float32 ``(1, S, S)`` in {0, 1}.
    These transforms are deterministic, so ``monai.data.CacheDataset`` caches their result.

    Args:
        image_size: side ``S`` of the square model input.
        keys: ``("image", "label")`` for training and evaluation, ``("image",)`` for inference.
    """
    _check_size("image_size", image_size, 1)
    keys = tuple(keys)
    if "image" not in keys or not set(keys) <= {"image", "label"}:
        raise ValueError(f"keys must be ('image',) or ('image', 'label'), got {keys}")
    modes = tuple("bilinear" if k == "image" else "nearest" for k in keys)
    transforms: list[Transform] = [
        LoadImaged(keys, image_only=True),
        EnsureChannelFirstd(keys),
        Grayscale2Dd(keys, reduction=["mean" if k == "image" else "max" for k in keys]),
        ScaleIntensityd("image", minv=0.0, maxv=1.0),
        Resized(keys, spatial_size=(image_size, image_size), mode=modes,
                anti_aliasing=[k == "image" for k in keys]),
    ]
    if "label" in keys:
        transforms.append(Binarized("label"))
    return transforms


def _finish_transforms(keys: Sequence[str], context_length: int, allow_empty: bool = False) -> list[Transform]:
    """The deterministic tail: 3 channels, CLIP normalisation, tokens, dtypes."""
    return [
        RepeatChanneld("image", repeats=3),
        NormalizeIntensityd("image", subtrahend=OPENAI_DATASET_MEAN, divisor=OPENAI_DATASET_STD, channel_wise=True),
        TokenizeTextd("prompt", output_key="text", context_length=context_length, allow_empty=allow_empty),
        EnsureTyped(tuple(keys), dtype=torch.float32),
    ]


def get_slice_preprocessing(image_size: int = 224) -> Compose:
    """Array transforms taking one raw grayscale slice ``(1, X, Y)`` to the model input ``(3, S, S)``.

    The same steps, with the same settings, as the dictionary pipeline (:func:`get_load_transforms` after
    reading, then the tail of the training and evaluation transforms): min-max to [0, 1], anti-aliased
    bilinear resize to ``S x S``, 3 channels, CLIP normalisation. The slice-wise inference network
    (:class:`causalclipseg.engine.inference.SliceSegmenter`) applies it to every slice of a volume.
    """
    _check_size("image_size", image_size, 1)
    return Compose([
        ScaleIntensity(minv=0.0, maxv=1.0),
        Resize(spatial_size=(image_size, image_size), mode="bilinear", anti_aliasing=True),
        RepeatChannel(repeats=3),
        NormalizeIntensity(subtrahend=OPENAI_DATASET_MEAN, divisor=OPENAI_DATASET_STD, channel_wise=True),
    ])


def get_train_transforms(image_size: int = 224, context_length: int = 32, augment: bool = True) -> Compose:
    """Training transforms for records ``{"image", "label", "prompt"}`` (see the module docstring for the output).

    Order: the deterministic loading prefix (:func:`get_load_transforms`, cached by ``CacheDataset``), then the
    random part, cheap enough for CPU training: :class:`RandLateralFlipd` (p 0.5, swaps the prompt's sides), a small
    ``RandAffined`` on image and mask together (p 0.5, rotation within +/-10 degrees, scale 0.9-1.1 per axis,
    bilinear / nearest), and mild intensity jitter on the [0, 1] image (scale +/-10 %, shift +/-0.05, gamma
    0.85-1.15, p 0.5 / 0.5 / 0.3); then the deterministic tail (3 channels, CLIP normalisation, tokens).

    Args:
        image_size: side of the square model input.
        context_length: token slots of the text encoder.
        augment: include the random part; without it the result equals :func:`get_val_transforms`.
    """
    keys = ("image", "label")
    transforms = get_load_transforms(image_size, keys)
    if augment:
        # --- random part starts here: everything above is deterministic and cacheable ---
        transforms += [
            RandLateralFlipd(keys, prompt_key="prompt", prob=0.5),
            RandAffined(keys, prob=0.5, rotate_range=np.deg2rad(10.0), scale_range=(0.1, 0.1),
                        mode=("bilinear", "nearest"), padding_mode="zeros"),
            RandScaleIntensityd("image", factors=0.1, prob=0.5),
            RandShiftIntensityd("image", offsets=0.05, prob=0.5),
            RandAdjustContrastd("image", gamma=(0.85, 1.15), prob=0.3),
        ]
    return Compose(transforms + _finish_transforms(keys, context_length))


def get_val_transforms(image_size: int = 224, context_length: int = 32, prompt_transform: str = "none") -> Compose:
    """Evaluation transforms for records ``{"image", "label", "prompt"}``; fully deterministic (cacheable).

    Args:
        image_size: side of the square model input.
        context_length: token slots of the text encoder.
        prompt_transform: ``none``, ``swap`` (left/right exchanged) or ``empty``, to measure reliance on the text;
            the output ``prompt`` is the transformed one.

    Raises:
        ValueError: if ``prompt_transform`` is not a registered name.
    """
    keys = ("image", "label")
    get_prompt_transform(prompt_transform)
    return Compose(
        get_load_transforms(image_size, keys)
        + [PromptTransformd("prompt", prompt_transform)]
        + _finish_transforms(keys, context_length, allow_empty=prompt_transform == "empty")
    )


def get_inference_transforms(image_size: int = 224, context_length: int = 32) -> Compose:
    """Inference transforms for ``{"image": path, "prompt": str}``: PNG/JPEG, DICOM or 2-D / single-slice NIfTI.

    Output ``image`` float32 ``(3, S, S)`` (a ``MetaTensor`` whose ``applied_operations`` let ``Invertd`` bring the
    prediction back to the input grid), ``text`` int64 ``(context_length,)``, ``prompt`` str.

    Args:
        image_size: side of the square model input.
        context_length: token slots of the text encoder.
    """
    keys = ("image",)
    return Compose(get_load_transforms(image_size, keys) + _finish_transforms(keys, context_length))
