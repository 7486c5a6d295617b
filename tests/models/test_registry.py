"""The model registry: names, filtering, option validation and error messages."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sslseg.models._registry as registry
from sslseg.models import create_model, list_models, model_info, register_model

EXPECTED_2D = {
    "attention_unet", "efficient_unet", "enet", "nnunet", "pnet", "swin_unet",
    "unet", "unet_cct", "unet_ds", "unet_urpc",
}  # fmt: skip
EXPECTED_3D = {"attention_unet_3d", "nnunet_3d", "unet_3d", "unet_3d_urpc", "vnet", "vnet_sdf", "voxresnet"}


def test_issue_names_exist_with_their_dims():
    assert set(list_models(dim=2, task="segmentation")) == EXPECTED_2D
    assert set(list_models(dim=3, task="segmentation")) == EXPECTED_3D
    assert list_models(task="discriminator") == ["discriminator", "discriminator_3d"]
    assert list_models() == sorted(EXPECTED_2D | EXPECTED_3D | {"discriminator", "discriminator_3d"})
    assert list_models(dim=3, task="discriminator") == ["discriminator_3d"]


def test_list_models_rejects_bad_filters():
    with pytest.raises(ValueError, match="dim must be 2, 3 or None, got 4"):
        list_models(dim=4)
    with pytest.raises(ValueError, match="task must be one of"):
        list_models(task="classification")


def test_unknown_name_suggests_and_lists():
    with pytest.raises(ValueError, match=r"Unknown model 'unet3d'\. Did you mean 'unet_3d'") as info:
        create_model("unet3d", 1, 2)
    assert "Available models: attention_unet," in str(info.value)
    with pytest.raises(ValueError, match="Unknown model 'transformer'. Available models"):
        model_info("transformer")


def test_unknown_option_lists_accepted_ones():
    expected = r"unexpected option\(s\) 'channel' \(did you mean 'channels'\?\); accepted options: channels, dropout"
    with pytest.raises(TypeError, match=expected):
        create_model("unet", 1, 2, channel=(8, 16))
    with pytest.raises(TypeError, match="accepted options: none"):
        create_model("enet", 1, 2, width=3)


@pytest.mark.parametrize(
    "arg, value", [("in_channels", 0), ("num_classes", -1), ("in_channels", 1.0), ("num_classes", True)]
)
def test_channel_arguments_are_validated(arg, value):
    kwargs = {"in_channels": 1, "num_classes": 2, arg: value}
    with pytest.raises(ValueError, match=f"{arg} must be a positive int, got {value!r}"):
        create_model("pnet", **kwargs)


def test_seed_must_be_an_int():
    with pytest.raises(ValueError, match="seed must be an int or None, got '0'"):
        create_model("pnet", 1, 2, seed="0")


def test_manual_seed_before_create_is_reproducible():
    torch.manual_seed(3)
    a = create_model("pnet", 1, 2)
    torch.manual_seed(3)
    b = create_model("pnet", 1, 2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(ValueError, match=r"'unet' is already registered by sslseg\.models\.unet\.unet"):

        @register_model("unet", dim=2)
        def unet(in_channels: int, num_classes: int) -> nn.Module:
            return nn.Conv2d(in_channels, num_classes, 1)


def test_register_and_create_a_new_model():
    @register_model("test_toy_net", dim=3)
    def test_toy_net(in_channels: int, num_classes: int, width: int = 4) -> nn.Module:
        """A toy network."""
        return nn.Conv3d(in_channels, num_classes, 1)

    try:
        info = model_info("test_toy_net")
        assert (info.dim, info.task, info.options, info.summary) == (3, "segmentation", ("width",), "A toy network.")
        assert "test_toy_net" in list_models(dim=3)
        assert isinstance(create_model("test_toy_net", 1, 2, width=8), nn.Conv3d)
    finally:
        registry._REGISTRY.pop("test_toy_net")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "UNet", "dim": 2}, "lower-case"),
        ({"name": "toy", "dim": 1}, "dim must be 2 or 3, got 1"),
        ({"name": "toy", "dim": 2, "task": "cls"}, "task must be one of"),
    ],
)
def test_register_model_validates_its_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        register_model(**kwargs)


def test_builder_signature_is_checked():
    with pytest.raises(TypeError, match=r"must take \(in_channels, num_classes, \.\.\.\)"):

        @register_model("test_bad_builder", dim=2)
        def bad(channels: int, classes: int) -> nn.Module:
            return nn.Identity()

    assert "test_bad_builder" not in list_models()


def test_model_options_are_reported():
    assert model_info("swin_unet").options[0] == "img_size"
    assert "img_size" in model_info("swin_unet").options
    assert model_info("unet_3d").summary.startswith("3D U-Net")


def test_size_hook_fits_a_patch_for_fixed_size_models_only():
    from sslseg.models._registry import fit_input_size, options_for_size

    # Swin-UNet takes multiples of 4 * 2**(stages - 1), rounded down, at least one multiple.
    assert fit_input_size("swin_unet", (80, 100)) == (64, 96)
    assert fit_input_size("swin_unet", (20, 200)) == (32, 192)
    assert fit_input_size("swin_unet", (80, 80), {"depths": (2, 2, 2)}) == (80, 80)  # 3 stages: multiples of 16
    assert fit_input_size("swin_unet", (80, 80), {"img_size": 96}) == (96, 96)  # an explicit size is fixed
    assert fit_input_size("unet", (80, 72)) == (80, 72)  # no hook: the size is checked at forward
    assert options_for_size("swin_unet", (64, 96), {"embed_dim": 12}) == {"embed_dim": 12, "img_size": (64, 96)}
    assert options_for_size("unet", (80, 72), {"channels": (4, 8)}) == {"channels": (4, 8)}
    with pytest.raises(ValueError, match=r"'swin_unet' cannot take inputs of size \[80, 80\].*is \[64, 64\]"):
        options_for_size("swin_unet", (80, 80))
    with pytest.raises(ValueError, match=r"'swin_unet' cannot take inputs of size \[64, 64\].*is \[96, 96\]"):
        options_for_size("swin_unet", (64, 64), {"img_size": 96})
    with pytest.raises(ValueError, match=r"fit_input_size\('swin_unet'\): size must be 2 positive ints"):
        fit_input_size("swin_unet", (64, 64, 64))
    # What the hook gives builds a network for that size.
    net = create_model("swin_unet", 1, 2, **options_for_size("swin_unet", (32, 64), {"embed_dim": 12,
                                                                                     "num_heads": (1, 1, 1, 1)}))
    assert net(torch.zeros(1, 1, 32, 64)).shape == (1, 2, 32, 64)


def test_register_model_checks_its_size_hook():
    with pytest.raises(TypeError, match="fit_size must be callable or None"):
        register_model("test_bad_hook", dim=2, fit_size=3)
    assert model_info("unet").fit_size is None and model_info("swin_unet").fit_size is not None
