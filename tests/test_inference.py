"""Slice-wise inference: volumes stream through the network in batches and equal MONAI's SliceInferer."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import SliceInferer

from causalclipseg.inference.predictor import SliceWiseInferer


class _Recording(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        return self.conv(x)


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_volume_streams_in_batches_and_equals_monai_slice_inferer(batch):
    net = _Recording()
    volume = MetaTensor(torch.randn(2, 2, 16, 12, 7), affine=torch.diag(torch.tensor([0.5, 0.7, 2.0, 1.0])))
    with torch.no_grad():
        ours = SliceWiseInferer(batch, progress=False)(volume, net)
        reference = SliceInferer(roi_size=(16, 12), sw_batch_size=batch, spatial_dim=2)(volume, net.conv)
    assert ours.shape == (2, 3, 16, 12, 7)
    torch.testing.assert_close(ours.as_subclass(torch.Tensor), reference.as_subclass(torch.Tensor))  # batch rounding
    assert max(net.batches) <= 2 * batch and sum(net.batches) == 2 * 7  # never the whole volume at once
    torch.testing.assert_close(ours.affine, volume.affine)  # the input's grid


def test_two_d_input_is_one_call_and_bad_ranks_are_refused():
    net = _Recording()
    image = torch.randn(3, 2, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(SliceWiseInferer(progress=False)(image, net), net.conv(image))
    assert net.batches == [3]
    with pytest.raises(ValueError, match="inputs must be"):
        SliceWiseInferer()(torch.randn(2, 8, 8), net)
    with pytest.raises(ValueError, match="sw_batch_size"):
        SliceWiseInferer(0)
