"""FixMatch: confidence masking, the strong policies and CTAugment's probe updates."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from sslseg.data import Batch
from sslseg.methods import NetworkSpec, StepContext, get_method
from sslseg.methods._pseudo import IGNORE_INDEX
from sslseg.methods.fixmatch import fixmatch_unsup_loss, probe_proximity

from tests.methods._context import cpu_context

SMALL = {"channels": (4, 8, 16, 32, 64)}


def _ctx(step: int = 0, iterations: int = 10, weight: float = 0.1) -> StepContext:
    return cpu_context(step=step, iterations=iterations, weight=weight)


def _method(**options):
    cls = get_method("fixmatch")
    spec = NetworkSpec(model="unet", in_channels=1, num_classes=3, dim=2, patch_size=(32, 32), seed=0,
                       model_options=dict(SMALL))
    m = cls(cls.Config(**options), spec)
    m.build()
    return m


def _batch(n_l: int = 2, n_u: int = 2, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(labeled_image=torch.rand(n_l, 1, 32, 32, generator=g),
                 labeled_label=torch.randint(0, 3, (n_l, 32, 32), generator=g),
                 unlabeled_image=torch.rand(n_u, 1, 32, 32, generator=g))


def test_unsup_loss_masks_low_confidence_pixels():
    torch.manual_seed(0)
    # Weak probabilities: left half confident (0.97), right half not (0.6).
    q = torch.zeros(2, 3, 4, 4)
    q[:, 0, :, :2], q[:, 1, :, :2], q[:, 2, :, :2] = 0.97, 0.02, 0.01
    q[:, 0, :, 2:], q[:, 1, :, 2:], q[:, 2, :, 2:] = 0.2, 0.6, 0.2
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss, pl = fixmatch_unsup_loss(z, q, 0.95, "ce")
    assert pl.mask[:, :, :2].all() and not pl.mask[:, :, 2:].any()
    assert (pl.labels[:, :, 2:] == IGNORE_INDEX).all() and (pl.labels[:, :, :2] == 0).all()
    # Paper: sum over confident voxels / all voxels.
    ce = F.cross_entropy(z, torch.zeros(2, 4, 4, dtype=torch.long), reduction="none")
    assert loss.item() == pytest.approx((ce[:, :, :2].sum() / ce.numel()).item(), rel=1e-6)
    loss.backward()
    assert z.grad[..., 2:].abs().max() == 0 and z.grad[..., :2].abs().max() > 0
    # Low-confidence pixels change nothing, whatever the strong prediction says there.
    z2 = z.detach().clone()
    z2[..., 2:] = 50.0 * torch.randn(2, 3, 4, 2)
    assert fixmatch_unsup_loss(z2, q, 0.95, "ce")[0].item() == pytest.approx(loss.item(), rel=1e-6)
    # With threshold 0 every pixel counts (SSL4MIS-CTA's unmasked variant): plain CE against argmax.
    loss0, _ = fixmatch_unsup_loss(z.detach(), q, 0.0, "ce")
    assert loss0.item() == pytest.approx(F.cross_entropy(z.detach(), q.argmax(1)).item(), rel=1e-6)
    # 0.5 (CE + Dice) variant differs from CE alone and also ignores the right half.
    lcd, _ = fixmatch_unsup_loss(z2, q, 0.95, "ce_dice")
    lcd_ref, _ = fixmatch_unsup_loss(z.detach(), q, 0.95, "ce_dice")
    assert lcd.item() == pytest.approx(lcd_ref.item(), rel=1e-6)
    assert lcd.item() != pytest.approx(loss.item())


def test_probe_proximity_is_fixmatch_l1_reward():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(3, 4, 5, 5), 1)
    y = torch.randint(0, 4, (3, 5, 5))
    onehot = F.one_hot(y, 4).movedim(-1, 1).float()
    expected = 1 - 0.5 * (p - onehot).abs().sum(1).flatten(1).mean(1)
    assert torch.allclose(probe_proximity(p, y), expected, atol=1e-6)


def test_step_with_unreachable_threshold_has_no_unlabeled_loss():
    m = _method(threshold=1.0, policy="randaugment")
    out = m.step(_batch(), _ctx())
    assert out.logs["mask_ratio"].item() == 0.0
    assert out.logs["loss_unsup"].item() == pytest.approx(0.0, abs=1e-6)
    assert out.loss.item() == pytest.approx(out.logs["loss_sup"].item(), rel=1e-6)
    # With no threshold every pixel is pseudo-labelled.
    m0 = _method(threshold=0.0, policy="randaugment")
    out0 = m0.step(_batch(), _ctx())
    assert out0.logs["mask_ratio"].item() == 1.0 and out0.logs["loss_unsup"].item() > 0


@pytest.mark.parametrize("policy", ["ctaugment", "randaugment"])
def test_strong_views_change_intensities_only_and_are_seeded(policy):
    a, b = _method(policy=policy, cutout=0.0), _method(policy=policy, cutout=0.0)
    x = _batch(n_u=4).unlabeled_image
    sa, sb = a.make_strong_views(x), b.make_strong_views(x)
    assert sa.shape == x.shape and torch.equal(sa, sb)  # same seed, same views
    assert not torch.equal(sa, x)
    assert not torch.equal(a.make_strong_views(x), sa)  # the generator advances


def test_ctaugment_rates_follow_probe_accuracy_and_resume_exactly():
    m = _method(policy="ctaugment", cta_update_every=2)
    ones = {k: v.copy() for k, v in m.cta.rates.items()}
    batch = _batch()
    m.step(batch, _ctx(0))
    m.step(batch, _ctx(1))
    assert len(m.cta.pending) == 2
    assert all((m.cta.rates[k] == ones[k]).all() for k in ones)  # deferred: no sync per step
    state = m.extra_state()
    weights = {k: v.clone() for k, v in m.nets.state_dict().items()}
    torch.manual_seed(7)  # dropout draws (they move BatchNorm statistics, hence the probe)
    out = m.step(batch, _ctx(2))  # flushes the two pending probe rewards, then probes again
    assert len(m.cta.pending) == 1
    changed = [k for k in ones if (m.cta.rates[k] != ones[k]).any()]
    assert changed, "CTAugment rates did not move"
    # Rewards are probe accuracies in [0, 1]: updated rates stay in [0, 1].
    assert all(0.0 <= m.cta.rates[k].min() and m.cta.rates[k].max() <= 1.0 for k in changed)
    # A fresh method restored from the state before step 2 redoes step 2 exactly.
    r = _method(policy="ctaugment", cta_update_every=2)
    r.nets.load_state_dict(weights)
    r.load_extra_state(state)
    torch.manual_seed(7)
    r_out = r.step(batch, _ctx(2))
    assert all((r.cta.rates[k] == m.cta.rates[k]).all() for k in ones)
    assert torch.equal(r.generator.get_state(), m.generator.get_state())
    assert len(r.cta.pending) == 1 and torch.equal(r.cta.pending[0][1], m.cta.pending[0][1])
    assert r_out.loss.item() == out.loss.item()


def test_ema_teacher_makes_pseudo_labels_and_is_evaluated():
    m = _method(ema_teacher=True, policy="randaugment")
    assert m.eval_model() is m.teachers["teacher"]
    assert _method(policy="randaugment").eval_model() is not None
    assert "teacher" not in _method(policy="randaugment").teachers
    calls = []
    m.teachers["teacher"].register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    m.step(_batch(n_u=3), _ctx())
    assert calls == [3]  # the teacher sees the weak unlabeled view only


def test_config_validation():
    cls = get_method("fixmatch")
    with pytest.raises(ValueError, match="policy"):
        cls.Config(policy="autoaugment")
    with pytest.raises(ValueError, match="threshold"):
        cls.Config(threshold=2.0)
    with pytest.raises(ValueError, match="unsup_loss"):
        cls.Config(unsup_loss="mse")
