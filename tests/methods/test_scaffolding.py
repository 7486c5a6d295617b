"""The shared method scaffolding of ``sslseg.methods.base``: batch splitting, EMA teachers, networks, options."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

import sslseg
import sslseg.methods
from sslseg.data import Batch, RandAugment, StrongAugment
from sslseg.methods import NetworkSpec, get_method, list_methods, split_labeled
from sslseg.ops import ema_decay

from tests.methods._context import cpu_context

SMALL_UNET = {"channels": (4, 8, 16, 32, 64)}
TINY_SWIN = {"embed_dim": 12, "num_heads": (1, 1, 1, 1)}


def _spec(model: str = "unet", patch=(32, 32), **kw) -> NetworkSpec:
    return NetworkSpec(model=model, in_channels=1, num_classes=3, dim=len(patch), patch_size=tuple(patch), **kw)


# ---- split_labeled --------------------------------------------------------------------------------


def test_split_labeled_cuts_at_the_labeled_count_into_views():
    x = torch.arange(10.0).view(5, 2)
    batch = Batch(labeled_image=torch.zeros(2, 1, 4, 4), labeled_label=torch.zeros(2, 4, 4, dtype=torch.long),
                  unlabeled_image=torch.zeros(3, 1, 4, 4))
    for labeled in (batch, 2):
        x_l, x_u = split_labeled(x, labeled)
        assert torch.equal(x_l, x[:2]) and torch.equal(x_u, x[2:])
        assert x_l.data_ptr() == x.data_ptr()  # views, no copies
    empty_l, all_u = split_labeled(x, 0)
    assert empty_l.shape[0] == 0 and torch.equal(all_u, x)
    with pytest.raises(ValueError, match=r"labeled count must be an int in \[0, 5\].*got 6"):
        split_labeled(x, 6)
    with pytest.raises(ValueError, match="got True"):
        split_labeled(x, True)


def test_no_method_slices_at_the_labeled_count_by_hand():
    root = pathlib.Path(sslseg.methods.__file__).parent
    for path in root.glob("*.py"):
        text = path.read_text()
        for pattern in ("[:n_l]", "[n_l:]", "[:batch.labeled_bs]", "[batch.labeled_bs:]", "[: batch.labeled_bs]"):
            assert pattern not in text, f"{path.name} slices {pattern} by hand; use split_labeled"


# ---- EMA teachers ---------------------------------------------------------------------------------


def test_ema_teacher_is_a_frozen_copy_in_its_mode_and_follows_the_student():
    cls = get_method("supervised")
    m = cls(cls.Config(), _spec(model_options=SMALL_UNET))
    m.build()
    teacher = m.add_ema_teacher("slow", decay=0.9, include_buffers=False, train_mode=False)
    assert m.teachers["slow"] is teacher
    student = m.nets["student"]
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(t, s) for t, s in zip(teacher.parameters(), student.parameters()))
    m.train()
    assert student.training and not teacher.training
    with pytest.raises(ValueError, match="teacher named 'slow' already exists"):
        m.add_ema_teacher("slow", decay=0.9)
    # after_step: t = d t + (1 - d) s with Mean Teacher's warm-up decay; buffers left alone.
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before_t = [p.clone() for p in teacher.parameters()]
    before_b = [b.clone() for b in teacher.buffers()]
    ctx = cpu_context(step=5)
    m.after_step(ctx)
    d = ema_decay(5, 0.9)
    for t0, t, s in zip(before_t, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t, d * t0 + (1 - d) * s)
    assert all(torch.equal(a, b) for a, b in zip(before_b, teacher.buffers()))


@pytest.mark.parametrize("name, options, mode", [
    ("mean_teacher", {}, True), ("mean_teacher", {"teacher_train_mode": False}, False), ("ict", {}, True),
    ("uamt", {}, True), ("bcp", {}, True), ("fixmatch", {"ema_teacher": True, "policy": "randaugment"}, True),
])
def test_teacher_methods_use_the_shared_ema_teacher(name, options, mode):
    cls = get_method(name)
    m = cls(cls.Config(**options), _spec(model_options=SMALL_UNET))
    m.build()
    assert set(m._ema_teachers) == {"teacher"}
    m.nets.eval()
    m.teachers.eval()
    m.train()
    assert m.teachers["teacher"].training is mode


# ---- networks ---------------------------------------------------------------------------------------


def test_model_options_reach_only_the_network_they_are_meant_for():
    cls = get_method("supervised")
    m = cls(cls.Config(), _spec(model_options=SMALL_UNET))
    assert m.create_network().encoder is not None  # the run's unet takes its options
    with pytest.raises(TypeError, match="unexpected option"):
        m.create_network("discriminator")  # inherited unet options do not fit a discriminator
    disc = m.create_network("discriminator", inherit_options=False)
    assert disc(torch.rand(1, 3, 32, 32), torch.rand(1, 1, 32, 32)).shape == (1, 2)
    # The adversarial method builds its discriminator without the segmenter's options.
    adv = get_method("adversarial")
    a = adv(adv.Config(), _spec(model_options=SMALL_UNET))
    a.build()
    assert set(a.nets) == {"student", "discriminator"}


def test_networks_draw_successive_derived_seeds():
    cls = get_method("supervised")
    a, b = (cls(cls.Config(), _spec(seed=4, model_options=SMALL_UNET)) for _ in range(2))
    first, second = a.create_network(), a.create_network("discriminator", inherit_options=False)
    assert not torch.equal(next(first.parameters()), next(a.create_network().parameters()))
    assert torch.equal(next(first.parameters()), next(b.create_network().parameters()))
    assert torch.equal(next(second.parameters()),
                       next(b.create_network("discriminator", inherit_options=False).parameters()))


def test_a_fixed_size_network_is_built_for_the_patch_or_refused():
    cls = get_method("supervised")
    m = cls(cls.Config(), _spec(model="swin_unet", patch=(64, 96), model_options=TINY_SWIN))
    net = m.create_network()
    assert net.img_size == (64, 96)
    m80 = cls(cls.Config(), _spec(model="swin_unet", patch=(80, 80), model_options=TINY_SWIN))
    with pytest.raises(ValueError, match=r"'swin_unet' cannot take inputs of size \[80, 80\].*\[64, 64\]"):
        m80.create_network()
    assert cls.fit_patch((80, 80), cls.Config(), "swin_unet", TINY_SWIN) == (64, 64)
    assert cls.fit_patch((80, 80), cls.Config(), "unet", {}) == (80, 80)


def test_ctct_rounds_the_patch_for_its_transformer_and_keeps_options_apart():
    cls = get_method("ctct")
    cfg = cls.Config(transformer_options=dict(TINY_SWIN))
    # The default patch of synthetic ACDC (80 x 80) suits the CNN but not the Swin-UNet (multiples of 32).
    patch = cls.fit_patch((80, 80), cfg, "unet", {})
    assert patch == (64, 64)
    m = cls(cfg, _spec(patch=patch, model_options=SMALL_UNET))
    m.build()
    assert m.nets["transformer"].img_size == (64, 64)
    x = torch.rand(2, 1, *patch)
    assert m.nets["cnn"](x).shape == m.nets["transformer"](x).shape == (2, 3, *patch)
    with pytest.raises(ValueError, match="Unknown model 'swin'"):
        cls.Config(transformer="swin")
    with pytest.raises(ValueError, match="2D segmentation model, got 'unet_3d'"):
        cls.Config(transformer="unet_3d")


def test_ctct_fits_with_the_default_patch(tmp_path):
    # The default patch of an 80 x 80 dataset is 80 x 80: CTCT's Swin-UNet needs a multiple of 32.
    run = sslseg.fit("ctct", "synthetic:acdc?cases=6&slices=2&size=80", labeled=2, iterations=1, out_dir=tmp_path,
                     engine_options=dict(batch_size=2, labeled_bs=1, val_every=1, progress=False,
                                         model_options=SMALL_UNET),
                     transformer_options=dict(TINY_SWIN))
    assert run.history and run.model is not None


# ---- options and registration ---------------------------------------------------------------------


@pytest.mark.parametrize("name, options, message", [
    ("ict", {"alpha": 0.0}, "alpha must be > 0"),
    ("ict", {"pairing": "shuffle"}, "pairing must be one of"),
    ("uamt", {"mc_passes": 0}, "mc_passes must be an int >= 1"),
    ("uamt", {"threshold_start": 1.5}, r"threshold_start must be in \[0, 1\]"),
    ("unimatch", {"strong_aug": "cutout"}, "strong_aug must be one of"),
])
def test_bad_options_fail_when_the_config_is_made(name, options, message):
    with pytest.raises(ValueError, match=message):
        get_method(name).Config(**options)


def test_unimatch_strong_augmentation_is_a_config_choice():
    cls = get_method("unimatch")
    default = cls(cls.Config(), _spec()).strong_augment()
    assert isinstance(default, StrongAugment) and default.cutout_prob == 0.0  # its own CutMix instead
    ra = cls(cls.Config(strong_aug="randaugment"), _spec()).strong_augment()
    assert isinstance(ra, RandAugment) and ra.cutout_size == 0.0
    plain = get_method("mean_teacher")
    assert plain(plain.Config(), _spec()).strong_augment() is False


def test_every_method_module_is_imported_explicitly():
    root = pathlib.Path(sslseg.methods.__file__).parent
    modules = {p.stem for p in root.glob("*.py") if not p.stem.startswith("_") and p.stem != "base"}
    init = (root / "__init__.py").read_text()
    assert "pkgutil" not in init and "importlib" not in init
    for stem in modules:
        assert f"sslseg.methods.{stem}" in sys.modules, f"sslseg/methods/{stem}.py is not imported by the package"
        assert f"    {stem},\n" in init
    assert len(list_methods()) == len(modules)
