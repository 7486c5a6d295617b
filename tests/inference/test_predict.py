"""predict_volume: 2D slice-wise and 3D sliding-window paths, flip TTA, input validation."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from sslseg.inference import predict_slicewise, predict_volume


def _net(dim: int, in_channels: int = 1, classes: int = 3, seed: int = 0) -> nn.Module:
    """A small network that is NOT flip-equivariant (asymmetric kernels)."""
    torch.manual_seed(seed)
    conv = nn.Conv2d if dim == 2 else nn.Conv3d
    net = nn.Sequential(conv(in_channels, 4, 3, padding=1), nn.ReLU(), conv(4, classes, 3, padding=1)).eval()
    net.in_channels = in_channels
    return net


class _Symmetric(nn.Module):
    """Flip-equivariant: a pointwise map followed by a box blur (symmetric under every flip)."""

    def __init__(self, dim: int, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(1)
        conv = nn.Conv2d if dim == 2 else nn.Conv3d
        self.point = conv(1, classes, 1)
        self.blur = conv(classes, classes, 3, padding=1, groups=classes, bias=False)
        with torch.no_grad():
            self.blur.weight.fill_(1.0 / 3**dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blur(torch.tanh(self.point(x)) * 3)


def _flips(dims: list[int]) -> list[list[int]]:
    return [list(c) for r in range(len(dims) + 1) for c in itertools.combinations(dims, r)]


def test_2d_labels_match_predict_slicewise_and_probs_are_distributions():
    net = _net(2)
    image = torch.randn(1, 5, 20, 24)
    labels = predict_volume(net, image, dim=2, patch_size=[16, 16])
    assert labels.shape == (5, 20, 24) and labels.dtype == torch.int64
    assert torch.equal(labels, predict_slicewise(net, image, [16, 16]))
    probs = predict_volume(net, image, dim=2, patch_size=[16, 16], output="probs", sw_batch_size=2)
    assert probs.shape == (3, 5, 20, 24) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(0), torch.ones(5, 20, 24))


def test_3d_labels_are_the_argmax_of_the_blended_probabilities():
    net = _net(3)
    image = torch.randn(1, 12, 14, 10)
    probs = predict_volume(net, image, dim=3, patch_size=[8, 8, 8], output="probs", overlap=0.25)
    assert probs.shape == (3, 12, 14, 10)
    torch.testing.assert_close(probs.sum(0), torch.ones(12, 14, 10))
    labels = predict_volume(net, image, dim=3, patch_size=[8, 8, 8], overlap=0.25)
    assert labels.shape == (12, 14, 10) and labels.dtype == torch.int64
    assert torch.equal(labels, probs.argmax(0))


@pytest.mark.parametrize("dim,shape,patch", [(2, (1, 3, 12, 12), [12, 12]), (3, (1, 10, 12, 8), [8, 8, 8])])
def test_tta_of_a_flip_equivariant_model_equals_no_tta(dim, shape, patch):
    net = _Symmetric(dim).eval()
    image = torch.randn(*shape)
    plain = predict_volume(net, image, dim=dim, patch_size=patch, output="probs")
    tta = predict_volume(net, image, dim=dim, patch_size=patch, output="probs", tta=True)
    torch.testing.assert_close(tta, plain, atol=1e-5, rtol=1e-5)


def test_tta_2d_averages_the_flipped_softmax_per_slice():
    net = _net(2)
    image = torch.randn(1, 4, 16, 16)  # slice size == patch: no resize
    x = image.permute(1, 0, 2, 3)
    manual = sum(torch.softmax(net(x.flip(f)), 1).flip(f) for f in _flips([2, 3])) / 4
    probs = predict_volume(net, image, dim=2, patch_size=[16, 16], output="probs", tta=True)
    torch.testing.assert_close(probs, manual.permute(1, 0, 2, 3), atol=1e-5, rtol=1e-5)
    plain = predict_volume(net, image, dim=2, patch_size=[16, 16], output="probs")
    assert (probs - plain).abs().max() > 1e-3  # the model is not flip-equivariant: TTA changes it
    assert torch.equal(predict_volume(net, image, dim=2, patch_size=[16, 16], tta=True), probs.argmax(0))


def test_tta_2d_with_resize_equals_flipping_the_whole_volume():
    net = _net(2)
    image = torch.randn(1, 3, 20, 14)
    manual = sum(predict_slicewise(net, image.flip(f), [16, 16], output="probs").flip(f) for f in _flips([2, 3])) / 4
    probs = predict_volume(net, image, dim=2, patch_size=[16, 16], output="probs", tta=True)
    torch.testing.assert_close(probs, manual, atol=1e-5, rtol=1e-5)


def test_tta_3d_averages_the_eight_flips():
    net = _net(3)
    image = torch.randn(1, 8, 8, 8)  # one window: the blend is that window's prediction
    manual = sum(torch.softmax(net(image[None].flip(f)), 1).flip(f) for f in _flips([2, 3, 4]))[0] / 8
    probs = predict_volume(net, image, dim=3, patch_size=[8, 8, 8], output="probs", tta=True)
    torch.testing.assert_close(probs, manual, atol=1e-5, rtol=1e-5)
    plain = predict_volume(net, image, dim=3, patch_size=[8, 8, 8], output="probs")
    assert (probs - plain).abs().max() > 1e-3


def test_autocast_returns_float32():
    net = _net(2)
    probs = predict_volume(net, torch.randn(1, 2, 8, 8), dim=2, patch_size=[8, 8], output="probs",
                           autocast_dtype=torch.bfloat16, tta=True)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(0), torch.ones(2, 8, 8), atol=1e-3, rtol=0)


@pytest.mark.parametrize("image,kwargs,error,match", [
    (torch.randn(5, 8, 8), {}, ValueError, r"must be \(C, D, H, W\) with 4 dims, got shape \[5, 8, 8\]"),
    (torch.randn(1, 1, 5, 8, 8), {}, ValueError, r"4 dims, got shape \[1, 1, 5, 8, 8\]"),
    (torch.randn(2, 3, 8, 8), {}, ValueError, r"has 2 channel\(s\).*the model takes 1"),
    (torch.randn(2, 3, 8, 8), {"in_channels": 3}, ValueError, r"has 2 channel\(s\).*the model takes 3"),
    (torch.zeros(1, 3, 8, 8, dtype=torch.int16), {}, TypeError, "must be a floating tensor"),
    (torch.full((1, 3, 8, 8), float("nan")), {"name": "case7"}, ValueError, "image of case7 contains NaN"),
    (torch.full((1, 3, 8, 8), float("inf")), {}, ValueError, "image contains Inf"),
    ("not a tensor", {}, TypeError, "image must be a torch.Tensor"),
    (torch.randn(1, 3, 8, 8), {"dim": 4}, ValueError, "dim must be 2 or 3, got 4"),
    (torch.randn(1, 3, 8, 8), {"patch_size": [8, 8, 8]}, ValueError, "patch_size must be 2 positive ints"),
    (torch.randn(1, 3, 8, 8), {"output": "logits"}, ValueError, "output must be one of"),
    (torch.randn(1, 3, 8, 8), {"overlap": 1.0}, ValueError, r"overlap must be a number in \[0, 1\)"),
    (torch.randn(1, 3, 8, 8), {"sw_batch_size": 0}, ValueError, "sw_batch_size must be a positive int"),
])
def test_bad_input_raises_clear_errors(image, kwargs, error, match):
    args = {"dim": 2, "patch_size": [8, 8], **kwargs}
    with pytest.raises(error, match=match):
        predict_volume(_net(2), image, **args)
