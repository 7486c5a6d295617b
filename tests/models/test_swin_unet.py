"""Swin-UNet specifics: window padding is invisible to the real tokens, and img_size is validated."""

from __future__ import annotations

import pytest
import torch

from sslseg.models import create_model
from sslseg.models.swin_unet import SwinBlock, _window_mask


def _block(resolution: tuple[int, int], shifted: bool = False) -> SwinBlock:
    torch.manual_seed(0)
    block = SwinBlock(
        dim=8, resolution=resolution, num_heads=2, window_size=7, shifted=shifted, mlp_ratio=2.0, drop_path=0.0
    )
    return block.eval()


def test_padded_windows_equal_unpadded_attention():
    """On an 8x8 grid with window 7 the grid is padded to 14x14; each real token must see exactly
    the real tokens of its window, as a block built for that window's real extent does."""
    padded = _block((8, 8))
    assert padded.padded and padded.use_mask
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        out = padded(x)
        for rows, cols in [(slice(0, 7), slice(0, 7)), (slice(7, 8), slice(0, 7)), (slice(0, 7), slice(7, 8))]:
            part = x[:, rows, cols]
            reference = _block(tuple(part.shape[1:3]))
            reference.load_state_dict(padded.state_dict())
            torch.testing.assert_close(out[:, rows, cols], reference(part), rtol=1e-5, atol=1e-5)


def test_shift_mask_matches_swin_when_no_padding():
    # 14x14 tokens, window 7, shift 3: the classic Swin mask; the centre window is unmasked.
    mask = _window_mask((14, 14), (14, 14), (7, 7), (3, 3))
    assert mask.shape == (4, 49, 49)
    assert torch.all(mask[0] == 0)
    assert (mask[3] != 0).any()
    assert torch.all(_window_mask((14, 14), (14, 14), (7, 7), (0, 0)) == 0)


def test_small_stages_use_a_smaller_window_without_shift():
    block = _block((4, 4), shifted=True)
    assert (block.wh, block.ww, block.sh, block.sw) == (4, 4, 0, 0)
    assert not block.use_mask


@pytest.mark.parametrize("img_size", [0, 48, (64,), (64, 100)])
def test_img_size_is_validated(img_size):
    with pytest.raises(ValueError, match="img_size must be an int or \\(H, W\\), each a positive multiple of .* = 32"):
        create_model("swin_unet", 1, 2, img_size=img_size)


def test_224_and_256_both_work():
    assert create_model("swin_unet", 1, 2).input_size == (224, 224)  # SSL4MIS's size is the default
    model = create_model("swin_unet", 1, 2, img_size=256, embed_dim=12).eval()  # 64x64 tokens: padded windows
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 256, 256)).shape == (1, 2, 256, 256)
