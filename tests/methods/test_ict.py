"""ICT: the pairing, the mixing of inputs and of teacher targets, for any B_u."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from sslseg.data import Batch
from sslseg.methods import NetworkSpec, StepContext, get_method
from sslseg.methods.ict import ict_pairs, mix

from tests.methods._context import cpu_context


def _ctx() -> StepContext:
    return cpu_context(weight=1.0)


class _Recording(nn.Module):
    """logits = (w_c * x) per class; records its inputs."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w).view(1, -1, 1, 1))
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.w * x


def test_pairs_permutation_and_halves():
    torch.manual_seed(0)
    i0, i1 = ict_pairs(5, "permutation")
    assert i0.tolist() == [0, 1, 2, 3, 4] and sorted(i1.tolist()) == [0, 1, 2, 3, 4]
    i0, i1 = ict_pairs(5, "halves")  # odd: the last sample is left out
    assert i0.tolist() == [0, 1] and i1.tolist() == [2, 3]
    i0, i1 = ict_pairs(2, "halves")
    assert i0.tolist() == [0] and i1.tolist() == [1]
    with pytest.raises(ValueError, match="at least 2 unlabeled"):
        ict_pairs(1, "halves")
    with pytest.raises(ValueError, match="pairing"):
        ict_pairs(4, "random")


def test_mix_is_one_minus_lambda_a_plus_lambda_b_per_sample():
    a = torch.zeros(2, 1, 2, 2)
    b = torch.ones(2, 1, 2, 2) * torch.tensor([4.0, 8.0]).view(2, 1, 1, 1)
    out = mix(a, b, torch.tensor([0.25, 0.5]))
    assert torch.equal(out[0], torch.full((1, 2, 2), 1.0)) and torch.equal(out[1], torch.full((1, 2, 2), 4.0))


def _method(pairing: str = "permutation"):
    cls = get_method("ict")
    spec = NetworkSpec(model="unet", in_channels=1, num_classes=2, dim=2, patch_size=(16, 16))
    method = cls(cls.Config(pairing=pairing), spec)
    method.build()
    method.nets["student"] = _Recording([1.0, -1.0])
    method.teachers["teacher"] = _Recording([3.0, 0.5])
    return method


@pytest.mark.parametrize("pairing, n_u", [("permutation", 3), ("permutation", 1), ("halves", 5), ("halves", 2)])
def test_step_mixes_inputs_and_teacher_targets(pairing, n_u):
    method = _method(pairing)
    n_l = 2
    torch.manual_seed(0)
    x_u = torch.randn(n_u, 1, 3, 3)
    batch = Batch(labeled_image=torch.randn(n_l, 1, 3, 3), labeled_label=torch.zeros(n_l, 3, 3, dtype=torch.long),
                  unlabeled_image=x_u)
    # Fix the draw: pairs as the pairing defines them (a reversed batch for "permutation"), known lambdas.
    if pairing == "permutation":
        i0, i1 = torch.arange(n_u), torch.arange(n_u).flip(0)
    else:
        i0, i1 = ict_pairs(n_u, "halves")
    lam = torch.linspace(0.1, 0.9, i0.numel())
    method.draw_mix = lambda n: (i0, i1, lam)
    out = method.step(batch, _ctx())
    lam4 = lam.view(-1, 1, 1, 1)
    x_m = (1 - lam4) * x_u[i0] + lam4 * x_u[i1]
    # The student saw the labeled images and the mixed images, never the raw unlabeled ones.
    (seen,) = method.nets["student"].inputs
    torch.testing.assert_close(seen, torch.cat([batch.labeled_image, x_m]))
    # The teacher saw the raw unlabeled images of the pairs (the first 4 of 5 for "halves").
    (t_seen,) = method.teachers["teacher"].inputs
    torch.testing.assert_close(t_seen, x_u[: 2 * i0.numel()] if pairing == "halves" else x_u)
    t = method.teachers["teacher"].w.detach()
    q0, q1 = torch.softmax(t * x_u[i0], 1), torch.softmax(t * x_u[i1], 1)
    target = (1 - lam4) * q0 + lam4 * q1
    p_m = torch.softmax(method.nets["student"].w.detach() * x_m, 1)
    expected = ((p_m - target) ** 2).mean()
    assert out.logs["loss_cons"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_lambda_draws_follow_beta_alpha_alpha_per_pair():
    method = _method()
    torch.manual_seed(0)
    i0, i1, lam = method.draw_mix(6)
    assert lam.shape == (6,) and bool(((lam >= 0) & (lam <= 1)).all())
    # Beta(0.2, 0.2) is U-shaped: most draws lie near 0 or 1.
    lams = torch.cat([method.draw_mix(50)[2] for _ in range(20)])
    assert ((lams < 0.1) | (lams > 0.9)).float().mean() > 0.5
    assert abs(lams.mean().item() - 0.5) < 0.1


def test_invalid_options():
    cls = get_method("ict")
    spec = NetworkSpec(model="unet", in_channels=1, num_classes=2, dim=2, patch_size=(16, 16))
    with pytest.raises(ValueError, match="alpha"):
        cls(cls.Config(alpha=0.0), spec)
    with pytest.raises(ValueError, match="pairing"):
        cls(cls.Config(pairing="shuffle"), spec)
