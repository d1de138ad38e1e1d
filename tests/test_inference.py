"""Slice-wise inference: batches of raw slices are preprocessed as in training, stream through the network, and
equal MONAI's SliceInferer running the same steps one slice at a time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import SliceInferer

from causalclipseg.data.pipelines import SlicePreprocessing, get_val_transforms
from causalclipseg.inference.inferer import SliceWiseInferer

SIZE = 16


class _Recording(torch.nn.Module):
    """A stand-in model: records its batch sizes and the extra argument it is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 3, padding=1)
        self.batches: list[int] = []
        self.texts: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == (3, SIZE, SIZE)  # preprocessed to the model's size
        self.batches.append(x.shape[0])
        self.texts.append(text)
        return self.conv(x) + text.float().sum()


def _one_slice_reference(net: _Recording, text: torch.Tensor):
    """What the inferer must compute, one slice at a time: preprocess, network, logits resized back."""
    preprocess = SlicePreprocessing(SIZE)

    def run(s: torch.Tensor) -> torch.Tensor:
        out = torch.cat([net(preprocess(one[None]), text) for one in s])
        return F.interpolate(out, size=s.shape[-2:], mode="bilinear", align_corners=False)
    return run


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_volume_streams_in_batches_and_equals_monai_slice_inferer(batch):
    net, text = _Recording(), torch.tensor([[1, 2, 3]])
    volume = MetaTensor(torch.rand(2, 1, 20, 12, 7) * 900, affine=torch.diag(torch.tensor([0.5, 0.7, 2.0, 1.0])))
    with torch.no_grad():
        ours = SliceWiseInferer(SIZE, batch, progress=False)(volume, net, text)
        net.batches.clear()
        reference = SliceInferer(roi_size=(20, 12), sw_batch_size=batch, spatial_dim=2)(
            volume, _one_slice_reference(net, text))
    assert ours.shape == (2, 2, 20, 12, 7)
    torch.testing.assert_close(ours.as_subclass(torch.Tensor), reference.as_subclass(torch.Tensor))
    torch.testing.assert_close(ours.affine, volume.affine)  # the input's grid
    net.batches.clear()
    with torch.no_grad():
        SliceWiseInferer(SIZE, batch, progress=False)(volume, net, text)
    assert max(net.batches) <= 2 * batch and sum(net.batches) == 2 * 7  # never the whole volume at once
    assert all(t is text for t in net.texts)  # the extra argument (the prompt's tokens) reaches the network


def test_two_d_input_is_one_call_and_bad_inputs_are_refused():
    net, text = _Recording(), torch.tensor([[5]])
    image = torch.rand(3, 1, 8, 10)
    with torch.no_grad():
        out = SliceWiseInferer(SIZE, progress=False)(image, net, text)
        torch.testing.assert_close(out, _one_slice_reference(net, text)(image))
    assert out.shape == (3, 2, 8, 10) and net.batches[0] == 3
    with pytest.raises(ValueError, match="inputs must be"):
        SliceWiseInferer(SIZE)(torch.randn(2, 8, 8), net, text)
    with pytest.raises(ValueError, match="inputs must be"):
        SliceWiseInferer(SIZE)(torch.randn(1, 2, 8, 8), net, text)  # one channel: raw grayscale
    with pytest.raises(ValueError, match="sw_batch_size"):
        SliceWiseInferer(SIZE, 0)


def test_slice_preprocessing_equals_the_evaluation_pipeline(tmp_path):
    """A batch of slices is preprocessed exactly as the evaluation transforms preprocess each image."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    pictures = [(rng.random((40, 52)) * 255).astype(np.uint8) for _ in range(3)]
    records = []
    for i, picture in enumerate(pictures):
        Image.fromarray(picture).save(tmp_path / f"x{i}.png")
        Image.fromarray(picture).save(tmp_path / f"m{i}.png")
        records.append({"image": str(tmp_path / f"x{i}.png"), "label": str(tmp_path / f"m{i}.png"), "prompt": "x"})
    expected = torch.stack([get_val_transforms(SIZE)(r)["image"].as_subclass(torch.Tensor) for r in records])
    raw = torch.stack([torch.from_numpy(p.T.astype(np.float32))[None] for p in pictures])  # (N, 1, X, Y)
    torch.testing.assert_close(SlicePreprocessing(SIZE)(raw), expected)
    with pytest.raises(ValueError, match=r"slices must be \(N, 1, X, Y\)"):
        SlicePreprocessing(SIZE)(raw[:, 0])
