"""CCT: the consistency between main and auxiliary decoders, what is supervised, what is exported."""

from __future__ import annotations


import pytest
import torch

from sslseg.data import Batch
from sslseg.losses.segmentation import supervised_loss
from sslseg.methods import NetworkSpec, StepContext, get_method
from sslseg.methods.cct import cct_consistency
from sslseg.models import create_model

from tests.methods._context import cpu_context

SMALL = {"channels": (4, 8, 16, 32, 64)}


def _ctx(weight: float = 0.1) -> StepContext:
    return cpu_context(weight=weight)


def _method(model: str = "unet_cct", model_options=SMALL, **options):
    cls = get_method("cct")
    spec = NetworkSpec(model=model, in_channels=1, num_classes=3, dim=2, patch_size=(32, 32), seed=0,
                       model_options=dict(model_options))
    m = cls(cls.Config(**options), spec)
    m.build()
    return m


def _batch() -> Batch:
    g = torch.Generator().manual_seed(0)
    return Batch(labeled_image=torch.rand(2, 1, 32, 32, generator=g),
                 labeled_label=torch.randint(0, 3, (2, 32, 32), generator=g),
                 unlabeled_image=torch.rand(2, 1, 32, 32, generator=g))


def test_consistency_value_and_detached_main():
    torch.manual_seed(0)
    main = torch.randn(2, 3, 4, 4, requires_grad=True)
    aux = [torch.randn(2, 3, 4, 4, requires_grad=True) for _ in range(3)]
    p = torch.softmax(main, 1)
    expected = sum((torch.softmax(a, 1) - p).pow(2).mean() for a in aux) / 3
    loss = cct_consistency(main, aux)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert main.grad is None  # the paper: the main decoder is a fixed target
    assert all(a.grad.abs().max() > 0 for a in aux)
    # SSL4MIS: gradients reach the main decoder too.
    main2 = main.detach().clone().requires_grad_(True)
    cct_consistency(main2, [a.detach() for a in aux], detach_main=False).backward()
    assert main2.grad.abs().max() > 0
    # Agreeing decoders: no loss.
    assert cct_consistency(main.detach(), [main.detach()] * 3).item() == 0.0


def test_default_unet_cct_is_trained_evaluated_and_exported_as_itself():
    assert get_method("cct").default_model == {2: "unet_cct"}
    m = _method()
    student = m.nets["student"]
    assert "aux" in student.output_keys and len(student.aux_decoders) == 3
    assert m.eval_model() is student  # best_val.pt records unet_cct and its own state dict
    # In eval mode the forward is the encoder and the main decoder: a plain unet with those weights.
    plain = create_model("unet", 1, 3, **SMALL).eval()
    plain.load_state_dict({k: v for k, v in student.state_dict().items() if not k.startswith("aux_decoders.")})
    x = torch.rand(1, 1, 32, 32)
    student.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), student(x))
    assert sum(p.numel() for p in m.trainable_parameters()) == sum(p.numel() for p in student.parameters())


def test_models_without_aux_are_rejected():
    with pytest.raises(ValueError, match="auxiliary decoders.*'unet_cct' \\(the default\\); model 'unet'"):
        _method("unet")
    with pytest.raises(ValueError, match="auxiliary decoders"):
        _method("pnet", model_options={})


def test_supervision_of_main_only_or_all_decoders():
    batch = _batch()
    losses = {}
    for aux in (False, True):
        m = _method(supervise_aux=aux)
        torch.manual_seed(0)
        out = m.step(batch, _ctx())
        torch.manual_seed(0)
        o = m.nets["student"].forward_all(batch.images())
        y = batch.labeled_label
        main_sup = supervised_loss(o["logits"][:2], y)
        all_sup = (main_sup + sum(supervised_loss(a[:2], y) for a in o["aux"])) / 4
        losses[aux] = (out.logs["loss_sup"].item(), (all_sup if aux else main_sup).item())
        assert out.loss.item() == pytest.approx(
            out.logs["loss_sup"].item() + 0.1 * out.logs["loss_cons"].item(), rel=1e-6)
    for got, expected in losses.values():
        assert got == pytest.approx(expected, rel=1e-5)
    assert losses[True][0] != pytest.approx(losses[False][0])
