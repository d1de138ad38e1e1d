"""The slice-wise inferer: raw 2-D images and volumes in, logits on their grid out, in batches of slices."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer
from tqdm import tqdm

from ..data.pipelines import SlicePreprocessing

__all__ = ["SliceWiseInferer"]


class SliceWiseInferer(Inferer):
    """2-D inputs ``(B, 1, X, Y)`` in one batch; volumes ``(B, 1, X, Y, Z)`` slice by slice along ``Z`` in batches.

    Each batch of raw slices is moved to ``device``, preprocessed there as in training (:class:`~causalclipseg.
    data.pipelines.SlicePreprocessing`: min-max, resize to the model's ``S x S``, CLIP normalisation), given to
    ``network(slices, *args, **kwargs)`` (the model, with the prompt's token ids as its second argument), and its
    logits are resized back to the slice grid (bilinear) and written into the one float32 output on the input's
    device. So the memory beyond the input and the output stays flat in the number of slices (``causalclipseg
    benchmark`` measures it); MONAI's ``SliceInferer`` would keep a second full-size volume (its overlap count map),
    which whole slices never need, and cannot preprocess. The output keeps the input's metadata (affine, file name),
    so ``Invertd`` and the writers put it back on the input's grid.

    Args:
        image_size: the model's input side ``S``.
        sw_batch_size: slices per forward pass.
        device: where slices are preprocessed and the network runs; ``None``: the input's device.
        progress: show a progress bar over a volume's slice batches.

    Raises:
        ValueError: for a batch size below 1.
    """

    def __init__(self, image_size: int = 224, sw_batch_size: int = 8, device: str | torch.device | None = None,
                 progress: bool = True) -> None:
        super().__init__()
        if isinstance(sw_batch_size, bool) or not isinstance(sw_batch_size, int) or sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be an int >= 1, got {sw_batch_size!r}")
        self.preprocess = SlicePreprocessing(image_size)
        self.sw_batch_size = sw_batch_size
        self.device = torch.device(device) if device is not None else None
        self.progress = progress

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        """inputs (B, 1, X, Y[, Z]) raw intensities -> logits (B, K, X, Y[, Z]); extra arguments go to the network.

        Raises:
            ValueError: if ``inputs`` is not 4-D or 5-D with one channel.
        """
        if inputs.ndim not in (4, 5) or inputs.shape[1] != 1:
            raise ValueError(f"inputs must be (B, 1, X, Y) or (B, 1, X, Y, Z), got shape {tuple(inputs.shape)}")
        volume = inputs.as_subclass(torch.Tensor)
        volume = volume if inputs.ndim == 5 else volume[..., None]  # a 2-D image is a volume of one slice
        b, _, x, y, z = volume.shape
        out: torch.Tensor | None = None
        starts = range(0, z, self.sw_batch_size)
        for start in tqdm(starts, desc="slices", unit="batch", disable=not self.progress or len(starts) < 2,
                          leave=False):
            chunk = volume[..., start:start + self.sw_batch_size]  # (B, 1, X, Y, n)
            n = chunk.shape[-1]
            slices = chunk.permute(0, 4, 1, 2, 3).reshape(b * n, 1, x, y)
            slices = slices.to(self.device) if self.device is not None else slices
            logits = network(self.preprocess(slices), *args, **kwargs).as_subclass(torch.Tensor)  # (B n, K, S, S)
            logits = F.interpolate(logits.float(), size=(x, y), mode="bilinear", align_corners=False)
            if out is None:
                out = torch.empty((b, logits.shape[1], x, y, z), dtype=torch.float32, device=volume.device)
            out[..., start:start + n] = logits.reshape(b, n, -1, x, y).permute(0, 2, 3, 4, 1).to(volume.device)
        out = out if inputs.ndim == 5 else out[..., 0]
        if isinstance(inputs, MetaTensor):
            out = MetaTensor(out).copy_meta_from(inputs)
        return out
