"""The pipelines of training, evaluation and inference, built from MONAI's transforms and the package's.

Output contract of :func:`get_train_transforms` and :func:`get_val_transforms` (per sample, before collation):

- ``image``: float32 ``(3, S, S)``, grayscale scaled to [0, 1] per image (min-max), repeated to 3 channels,
  normalised with open_clip's ``OPENAI_DATASET_MEAN``/``STD``;
- ``label``: float32 ``(1, S, S)``, values in {0, 1} (mask > 0);
- ``text``: int64 ``(context_length,)`` CLIP token ids;
- ``prompt``: the prompt string the tokens encode (after laterality swap or prompt transform).

Inference reads a file with :class:`~causalclipseg.io.reader.LoadSegmentableImaged` and preprocesses batches of
slices with :class:`SlicePreprocessing` (the same steps and settings as the tail of these pipelines).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import (
    Compose,
    CopyItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensity,
    NormalizeIntensityd,
    RandAdjustContrastd,
    RandAffined,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RepeatChanneld,
    Resize,
    Resized,
    ScaleIntensity,
    ScaleIntensityd,
    Transform,
)
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from .prompts import get_prompt_transform
from .transforms import Binarized, Grayscale2Dd, PromptTransformd, RandLateralFlipd, TokenizeTextd, check_size

__all__ = ["SlicePreprocessing", "get_load_transforms", "get_train_transforms", "get_val_transforms"]


def get_load_transforms(image_size: int = 224, keys: Sequence[str] = ("image", "label")) -> list[Transform]:
    """The deterministic loading prefix: read, channel first, grayscale, [0, 1], resize to ``S x S``, binarise mask.

    Output: ``image`` float32 ``(1, S, S)`` in [0, 1]; ``label`` (if in ``keys``) float32 ``(1, S, S)`` in {0, 1}.
    These transforms are deterministic, so ``monai.data.CacheDataset`` caches their result.

    Args:
        image_size: side ``S`` of the square model input.
        keys: ``("image", "label")`` for training and evaluation, ``("image",)`` for inference.
    """
    check_size("image_size", image_size, 1)
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


def _finish_transforms(keys: Sequence[str], context_length: int, prompt_transform: str = "none") -> list[Transform]:
    """The deterministic tail: the prompt transform, 3 channels, CLIP normalisation, tokens, dtypes.

    Raises:
        ValueError: if ``prompt_transform`` is not a registered name.
    """
    get_prompt_transform(prompt_transform)
    return [
        PromptTransformd("prompt", prompt_transform),
        RepeatChanneld("image", repeats=3),
        NormalizeIntensityd("image", subtrahend=OPENAI_DATASET_MEAN, divisor=OPENAI_DATASET_STD, channel_wise=True),
        TokenizeTextd("prompt", output_key="text", context_length=context_length,
                      allow_empty=prompt_transform == "empty"),
        EnsureTyped(tuple(keys), dtype=torch.float32),
    ]


class SlicePreprocessing(Transform):
    """A batch of raw grayscale slices ``(N, 1, X, Y)`` to the model input ``(N, 3, S, S)``, on their own device.

    The same steps, with the same MONAI transforms and settings, as the dictionary pipeline
    (:func:`get_load_transforms` after reading, then the tail of the training and evaluation transforms): min-max
    to [0, 1] per slice, anti-aliased bilinear resize to ``S x S``, 3 channels, CLIP normalisation. The slices of a
    batch are handled as the channels of one image, so a batch costs one call of each transform, on the device
    the slices are on. :class:`causalclipseg.inference.inferer.SliceWiseInferer` applies it to every batch of
    slices of an image or volume.

    Args:
        image_size: side ``S`` of the square model input.
    """

    def __init__(self, image_size: int = 224) -> None:
        check_size("image_size", image_size, 1)
        self.image_size = image_size
        self.scale = ScaleIntensity(minv=0.0, maxv=1.0, channel_wise=True)
        self.resize = Resize(spatial_size=(image_size, image_size), mode="bilinear", anti_aliasing=True)
        self.normalize = NormalizeIntensity(subtrahend=OPENAI_DATASET_MEAN, divisor=OPENAI_DATASET_STD,
                                            channel_wise=True)

    def __call__(self, slices: torch.Tensor) -> torch.Tensor:
        """``(N, 1, X, Y)`` raw intensities -> float32 ``(N, 3, S, S)``.

        Raises:
            ValueError: if ``slices`` is not ``(N, 1, X, Y)``.
        """
        if slices.ndim != 4 or slices.shape[1] != 1:
            raise ValueError(f"slices must be (N, 1, X, Y), got shape {tuple(slices.shape)}")
        x = slices.as_subclass(torch.Tensor)[:, 0].float()  # (N, X, Y): one channel per slice
        x = self.resize(self.scale(x)).as_subclass(torch.Tensor)  # (N, S, S)
        x = x[None].repeat(3, 1, 1, 1)  # (3, N, S, S): the model's 3 channels first, slices as a spatial axis
        return self.normalize(x).as_subclass(torch.Tensor).transpose(0, 1).contiguous()  # (N, 3, S, S)


def get_train_transforms(image_size: int = 224, context_length: int = 32, augment: bool = True,
                         prompt_transform: str = "none") -> Compose:
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
        prompt_transform: ``none``, or ``empty`` to train without text (the ablation); ``swap`` would teach the
            wrong side and is refused.

    Raises:
        ValueError: for ``swap`` or an unregistered name.
    """
    if prompt_transform == "swap":
        raise ValueError("prompt_transform 'swap' would train on prompts naming the wrong side; use 'none' or 'empty'")
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
    return Compose(transforms + _finish_transforms(keys, context_length, prompt_transform))


def get_val_transforms(image_size: int = 224, context_length: int = 32, prompt_transform: str = "none",
                       mirror: bool = False, mirrored_text: bool = False) -> Compose:
    """Evaluation transforms for records ``{"image", "label", "prompt"}``; deterministic (the loading is cacheable).

    Args:
        image_size: side of the square model input.
        context_length: token slots of the text encoder.
        prompt_transform: ``none``, ``swap`` (left/right exchanged) or ``empty``, to measure reliance on the text;
            the output ``prompt`` is the transformed one.
        mirror: mirror every image and mask left-right and swap the prompt's sides with them (what
            :class:`RandLateralFlipd` does to half the training samples): a model that learned the flip scores
            the same as without it (mirror equivariance).
        mirrored_text: also give ``mirrored_text``, the token ids of the (transformed) prompt with its sides
            swapped, for flip test-time augmentation (:class:`~causalclipseg.inference.tta.MirrorAveraged`).

    Raises:
        ValueError: if ``prompt_transform`` is not a registered name.
    """
    keys = ("image", "label")
    flip = [RandLateralFlipd(keys, prompt_key="prompt", prob=1.0)] if mirror else []
    mirrored = [CopyItemsd("prompt", names="mirrored_prompt"), PromptTransformd("mirrored_prompt", "swap"),
                TokenizeTextd("mirrored_prompt", output_key="mirrored_text", context_length=context_length,
                              allow_empty=prompt_transform == "empty")] if mirrored_text else []
    return Compose(get_load_transforms(image_size, keys) + flip
                   + _finish_transforms(keys, context_length, prompt_transform) + mirrored)
