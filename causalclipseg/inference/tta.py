"""Flip test-time augmentation: a prediction averaged with the one made on the mirrored image under the mirrored
prompt.

Mirroring a chest X-ray left-right moves each lung to the other side of the picture, so the prompt's sides must
follow ("lower left lung" becomes "lower right lung"), exactly as the training augmentation does
(:class:`~causalclipseg.data.transforms.RandLateralFlipd`). The mirrored view's prediction, mirrored back, is a
second opinion on the same pixels; the two are averaged as probabilities. Measured on the QaTa-COV19 valid split with
the shipped weights (``causalclipseg evaluate --data ../shared/data/qata_cov19 --flip-tta``): per-image Dice 0.797
-> 0.805, unilateral cases 0.676 -> 0.691, for twice the inference time. ``causalclipseg predict --flip-tta``,
``evaluate --flip-tta`` and the bundle's ``flip_tta`` use it.

Mirroring a slice left-right mirrors the patient only where the slice's horizontal axis is the patient's left-right
one: pictures, axial and coronal slices. A volume cut in sagittal slices (its left-right axis is the slice axis,
:mod:`causalclipseg.io.orientation`) is refused (:func:`check_mirrorable`), not mirrored front to back.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform
from torch import nn

from ..data.transforms import LATERAL_AXIS

__all__ = ["CheckMirrorabled", "MirrorAveraged", "check_mirrorable", "mean_probability_logits"]


def check_mirrorable(image: torch.Tensor, source: object) -> None:
    """Refuse flip test-time augmentation for an image in display orientation whose horizontal axis is not the
    patient's left-right axis (a volume cut in sagittal slices): mirroring its slices would flip front and back,
    which no swap of "left" and "right" in the prompt describes.

    Raises:
        ValueError: naming ``source``, for such an image.
    """
    affine = getattr(image, "affine", None)
    if affine is None:
        return  # a plain tensor: a picture, taken as displayed
    horizontal = nib.aff2axcodes(np.asarray(affine, dtype=np.float64))[LATERAL_AXIS]
    if horizontal not in ("L", "R"):
        raise ValueError(f"{source} is cut in sagittal slices (its left-right axis is the slice axis), so flip "
                         f"test-time augmentation, which mirrors each slice left-right, cannot apply: segment it "
                         f"without flip TTA")


class CheckMirrorabled(MapTransform):
    """Pre-transform after display orientation: :func:`check_mirrorable` for each image key when ``enabled`` (the
    bundle's ``flip_tta``).

    Args:
        keys: image keys, in display orientation.
        enabled: check (flip TTA is on) or pass everything through.
    """

    def __init__(self, keys: KeysCollection = "image", enabled: bool = True, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.enabled = enabled

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d) if self.enabled else ():
            check_mirrorable(d[key], getattr(d[key], "meta", {}).get("filename_or_obj", key))
        return d


def mean_probability_logits(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The logits of the mean of two probabilities given as logits: ``logit((sigmoid(a) + sigmoid(b)) / 2)``, computed
    in log space, so that it stays finite and exact however confident either is."""
    pair = torch.stack([first, second])
    return torch.logsumexp(F.logsigmoid(pair), dim=0) - torch.logsumexp(F.logsigmoid(-pair), dim=0)


class MirrorAveraged(nn.Module):
    """A network's prediction averaged with its prediction on the mirrored input (flip test-time augmentation).

    ``forward(image, text, mirrored_text)``: the network runs on ``image`` with ``text`` and on ``image`` mirrored
    along :data:`~causalclipseg.data.transforms.LATERAL_AXIS` with ``mirrored_text``, the token ids of the prompt with
    "left" and "right" swapped (:func:`~causalclipseg.data.prompts.swap_laterality`); the second output is mirrored
    back. Channel 0 (the logits) is averaged as probabilities and returned as logits
    (:func:`mean_probability_logits`), so thresholds and sigmoids downstream are unchanged; further channels (maps in
    [0, 1], such as :meth:`~causalclipseg.model.causalclipseg.CausalCLIPSeg.explain`'s causal mask) are averaged as
    they are.

    Args:
        network: ``(image (B, 3, S, S), text (B or 1, L)) -> (B, C, S, S)``, channel 0 logits: the model, its
            ``explain`` method or a module wrapping it.
    """

    def __init__(self, network: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor, text: torch.Tensor, mirrored_text: torch.Tensor) -> torch.Tensor:
        axis = 2 + LATERAL_AXIS  # (B, C, X, Y): spatial axes from dim 2
        plain = self.network(image, text)
        mirrored = self.network(image.flip(axis), mirrored_text).flip(axis)
        logits = mean_probability_logits(plain[:, :1], mirrored[:, :1])
        return torch.cat([logits, (plain[:, 1:] + mirrored[:, 1:]) / 2], dim=1)

