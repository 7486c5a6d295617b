"""Swin-UNet (Cao et al., ECCV-W 2022) as in SSL4MIS (``vision_transformer.SwinUnet`` with the
``swin_tiny_patch4_window7_224_lite`` config): ``swin_unet``.

Tiny configuration: patch 4, embedding 96, encoder depths 2-2-2-2 with 3-6-12-24 heads, window 7,
MLP ratio 4, qkv bias, drop-path 0.2 (linear over the 8 encoder blocks), no absolute position
embedding, "expand_first" final upsampling. The decoder mirrors the encoder depths (SSL4MIS ignores
its YAML's ``DECODER_DEPTHS`` too). Tokens are kept as ``(B, H, W, C)`` throughout.

Differences from SSL4MIS (parameter count identical for the same ``in_channels``: 27,168,420 with
3 input channels and 4 classes):

* ``img_size`` is a constructor option (SSL4MIS always uses 224 from its config, whatever the
  patch size). Any multiple of 32 works: windows that do not tile a stage are handled by padding
  the stage to a multiple of the window and masking the padded tokens out of the attention (as
  the Swin detection backbone pads), so the 256x256 patches of the other 2D methods can be used.
* A stage smaller than the window uses a window of the stage's size without shift (as in Swin);
  its relative-position bias is read from the same (2*7-1)^2 table, so parameter shapes do not
  depend on ``img_size``.
* A 1-channel input is embedded by a 1-channel patch embedding (SSL4MIS repeats it to 3 channels,
  which is the same function with 2*96*16 = 3,072 more parameters).
* No ImageNet weights are loaded (no downloads); initialisation is Swin's (truncated normal 0.02
  for linear layers and the bias tables).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Dict, List, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import SegmentationModel
from ._layers import DropPath
from ._registry import register_model

__all__ = ["SwinUNet"]


def _window_mask(
    size: Tuple[int, int], padded: Tuple[int, int], window: Tuple[int, int], shift: Tuple[int, int]
) -> Tensor:
    """Additive attention mask ``(num_windows, N, N)`` for shifted and/or padded windows.

    Tokens attend only within their region: the shifted-window regions of Swin (so that the
    cyclically rolled border never mixes with the opposite side) and, separately, the padding.
    """
    (h, w), (hp, wp), (wh, ww), (sh, sw) = size, padded, window, shift
    labels = torch.zeros(hp, wp)
    h_slices = [slice(0, hp - wh), slice(hp - wh, hp - sh), slice(hp - sh, hp)] if sh > 0 else [slice(0, hp)]
    w_slices = [slice(0, wp - ww), slice(wp - ww, wp - sw), slice(wp - sw, wp)] if sw > 0 else [slice(0, wp)]
    region = 0
    for hs in h_slices:
        for ws in w_slices:
            labels[hs, ws] = region
            region += 1
    valid = torch.zeros(hp, wp, dtype=torch.bool)
    valid[:h, :w] = True
    valid = torch.roll(valid, shifts=(-sh, -sw), dims=(0, 1))  # where the real tokens are after the shift
    labels[~valid] = -1
    windows = labels.reshape(hp // wh, wh, wp // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    different = windows[:, None, :] != windows[:, :, None]
    # -100 rather than -inf, as in Swin: exp(-100) vanishes in float32 and bfloat16 alike, and a row
    # can never become all -inf (a token always sees itself).
    return different.float() * -100.0


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative-position bias.

    Args:
        dim: Token channels.
        num_heads: Attention heads.
        window: Effective window ``(wh, ww)``; at most ``table_window`` per axis.
        table_window: Window the bias table is sized for; smaller windows index a sub-table.
        qkv_bias: Whether the qkv projection has a bias.
    """

    def __init__(
        self, dim: int, num_heads: int, window: Tuple[int, int], table_window: int, qkv_bias: bool = True
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        t = table_window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * t - 1) ** 2, num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window[0]), torch.arange(window[1]), indexing="ij")).flatten(1)
        rel = coords[:, :, None] - coords[:, None, :]
        index = (rel[0] + t - 1) * (2 * t - 1) + (rel[1] + t - 1)
        self.register_buffer("relative_position_index", index.reshape(-1), persistent=False)
        self.tokens = window[0] * window[1]
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: Tensor, mask: Tensor, use_mask: bool) -> Tensor:
        """``x``: ``(B, num_windows, N, C)``; ``mask``: ``(num_windows, N, N)`` additive."""
        b, nw, n, c = x.shape
        qkv = self.qkv(x).reshape(b, nw, n, 3, self.num_heads, c // self.num_heads).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, nW, heads, N, hd)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index].reshape(n, n, -1).permute(2, 0, 1)
        attn = attn + bias.unsqueeze(0).unsqueeze(0)
        if use_mask:
            attn = attn + mask.unsqueeze(1).unsqueeze(0)
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(2, 3).reshape(b, nw, n, c))


class SwinBlock(nn.Module):
    """Pre-norm Swin transformer block: (shifted) window attention and MLP, each residual.

    Args:
        dim: Token channels.
        resolution: Token grid ``(H, W)`` of the stage.
        num_heads: Attention heads.
        window_size: Window (and bias-table) size.
        shifted: Whether this block shifts the windows by ``window_size // 2``.
        mlp_ratio: Hidden width of the MLP relative to ``dim``.
        drop_path: Stochastic-depth probability.
    """

    def __init__(
        self,
        dim: int,
        resolution: Tuple[int, int],
        num_heads: int,
        window_size: int,
        shifted: bool,
        mlp_ratio: float,
        drop_path: float,
    ) -> None:
        super().__init__()
        h, w = resolution
        wh, ww = min(window_size, h), min(window_size, w)
        sh = window_size // 2 if shifted and h > window_size else 0
        sw = window_size // 2 if shifted and w > window_size else 0
        hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
        self.h, self.w, self.hp, self.wp = h, w, hp, wp
        self.wh, self.ww, self.sh, self.sw = wh, ww, sh, sw
        self.padded = hp != h or wp != w
        self.use_mask = self.padded or sh > 0 or sw > 0
        self.register_buffer("attn_mask", _window_mask((h, w), (hp, wp), (wh, ww), (sh, sw)), persistent=False)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, (wh, ww), window_size)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[0], x.shape[3]
        y = self.norm1(x)
        if self.padded:
            y = F.pad(y, [0, 0, 0, self.wp - self.w, 0, self.hp - self.h])
        if self.sh > 0 or self.sw > 0:
            y = torch.roll(y, shifts=[-self.sh, -self.sw], dims=[1, 2])
        nh, nw = self.hp // self.wh, self.wp // self.ww
        windows = y.reshape(b, nh, self.wh, nw, self.ww, c).permute(0, 1, 3, 2, 4, 5)
        windows = windows.reshape(b, nh * nw, self.wh * self.ww, c)
        windows = self.attn(windows, self.attn_mask, self.use_mask)
        y = windows.reshape(b, nh, nw, self.wh, self.ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b, self.hp, self.wp, c)
        if self.sh > 0 or self.sw > 0:
            y = torch.roll(y, shifts=[self.sh, self.sw], dims=[1, 2])
        if self.padded:
            y = y[:, : self.h, : self.w, :]
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concatenation -> LayerNorm(4C) -> Linear(4C, 2C): halves the grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class PatchExpand(nn.Module):
    """Linear(C, s*s*C_out) then pixel shuffle by ``scale`` and LayerNorm(C_out).

    ``PatchExpand(C, 2, C // 2)`` is Swin-UNet's ``PatchExpand``; ``PatchExpand(C, 4, C)`` its
    ``FinalPatchExpand_X4``.
    """

    def __init__(self, dim: int, scale: int, out_dim: int) -> None:
        super().__init__()
        self.scale = scale
        self.out_dim = out_dim
        self.expand = nn.Linear(dim, scale * scale * self.out_dim, bias=False)
        self.norm = nn.LayerNorm(self.out_dim)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w = x.shape[0], x.shape[1], x.shape[2]
        s = self.scale
        x = self.expand(x).reshape(b, h, w, s, s, self.out_dim).permute(0, 1, 3, 2, 4, 5)
        return self.norm(x.reshape(b, h * s, w * s, self.out_dim))


class SwinStage(nn.Module):
    """Swin blocks (alternating plain and shifted windows) followed by an optional resampling."""

    def __init__(
        self,
        dim: int,
        resolution: Tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        drop_path: Sequence[float],
        resample: nn.Module,
    ) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *[
                SwinBlock(dim, resolution, num_heads, window_size, i % 2 == 1, mlp_ratio, drop_path[i])
                for i in range(depth)
            ]
        )
        self.resample = resample

    def forward(self, x: Tensor) -> Tensor:
        return self.resample(self.blocks(x))


class SwinUNet(SegmentationModel):
    """Swin-UNet: a Swin transformer encoder, a symmetric Swin decoder with patch expanding, and
    linear skip fusions. ``forward_all`` returns ``{"logits"}`` only.

    The network is built for one input size, ``img_size`` (attention masks depend on it); other
    sizes raise a ``ValueError`` that says so. See the module docstring for the differences from
    SSL4MIS.

    Args:
        in_channels: Input channels.
        num_classes: Output classes.
        img_size: Input size, an int or ``(H, W)``; each a multiple of
            ``patch_size * 2**(len(depths) - 1)`` (32 by default).
        patch_size: Patch embedding stride.
        embed_dim: Channels after the patch embedding (doubled at each stage).
        depths: Swin blocks per encoder stage (mirrored in the decoder).
        num_heads: Attention heads per encoder stage.
        window_size: Attention window.
        mlp_ratio: MLP width relative to the token channels.
        drop_path: Maximum stochastic-depth probability (linear over the encoder blocks).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        img_size: Union[int, Sequence[int]] = 224,
        patch_size: int = 4,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.2,
    ) -> None:
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(int(s) for s in img_size)
        n = len(depths)
        divisor = patch_size * 2 ** (n - 1)
        if len(size) != 2 or any(s < divisor or s % divisor for s in size):
            raise ValueError(
                f"SwinUNet: img_size must be an int or (H, W), each a positive multiple of "
                f"patch_size * 2**(len(depths) - 1) = {divisor}, got {img_size!r}"
            )
        if len(num_heads) != n or any(embed_dim * 2**i % h for i, h in enumerate(num_heads)):
            raise ValueError(
                f"SwinUNet: num_heads must have one entry per stage ({n}) dividing that stage's width "
                f"(embed_dim * 2**i), got num_heads={tuple(num_heads)}, embed_dim={embed_dim}"
            )
        if n < 2 or patch_size < 1:
            raise ValueError(
                f"SwinUNet: need >= 2 stages and patch_size >= 1, got depths={tuple(depths)}, patch_size={patch_size}"
            )
        if window_size < 1 or not 0.0 <= drop_path < 1.0:
            raise ValueError(
                f"SwinUNet: window_size must be >= 1 and drop_path in [0, 1), got {window_size}, {drop_path}"
            )
        super().__init__(
            dim=2, in_channels=in_channels, num_classes=num_classes, size_divisor=divisor, input_size=size
        )
        self.img_size = size
        grid = (size[0] // patch_size, size[1] // patch_size)
        rates = torch.linspace(0, drop_path, sum(depths)).tolist()

        def res(i: int) -> Tuple[int, int]:
            return (grid[0] // 2**i, grid[1] // 2**i)

        def rates_of(i: int) -> List[float]:
            return rates[sum(depths[:i]) : sum(depths[: i + 1])]

        self.patch_embed = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)
        self.patch_norm = nn.LayerNorm(embed_dim)
        self.layers = nn.ModuleList(
            SwinStage(
                embed_dim * 2**i, res(i), depths[i], num_heads[i], window_size, mlp_ratio, rates_of(i),
                PatchMerging(embed_dim * 2**i) if i < n - 1 else nn.Identity(),
            )
            for i in range(n)
        )
        self.norm = nn.LayerNorm(embed_dim * 2 ** (n - 1))
        # Decoder: the first "stage" is only a patch expansion; stage i (1..n-1) fuses the skip of
        # encoder stage n-1-i (linear 2C -> C), runs that stage's depth mirrored, then expands.
        up: List[nn.Module] = [PatchExpand(embed_dim * 2 ** (n - 1), 2, embed_dim * 2 ** (n - 2))]
        fuse: List[nn.Module] = [nn.Identity()]
        for i in range(1, n):
            j = n - 1 - i
            d = embed_dim * 2**j
            fuse.append(nn.Linear(2 * d, d))
            up.append(
                SwinStage(d, res(j), depths[j], num_heads[j], window_size, mlp_ratio, rates_of(j),
                          PatchExpand(d, 2, d // 2) if i < n - 1 else nn.Identity())
            )
        self.layers_up = nn.ModuleList(up)
        self.concat_back_dim = nn.ModuleList(fuse)
        self.norm_up = nn.LayerNorm(embed_dim)
        self.up = PatchExpand(embed_dim, patch_size, embed_dim)
        self.output = nn.Conv2d(embed_dim, num_classes, 1, bias=False)
        self.apply(self._init_linear)

    @staticmethod
    def _init_linear(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        x = self.patch_norm(self.patch_embed(x).permute(0, 2, 3, 1))
        skips: List[Tensor] = []
        for stage in self.layers:
            skips.append(x)
            x = stage(x)
        x = self.norm(x)
        n = len(skips)
        for i, (fuse, stage) in enumerate(zip(self.concat_back_dim, self.layers_up)):
            if i > 0:
                x = fuse(torch.cat([x, skips[n - 1 - i]], dim=-1))
            x = stage(x)
        x = self.up(self.norm_up(x))
        return self.output(x.permute(0, 3, 1, 2))


#: Patch embedding stride and stage depths of the registered ``swin_unet`` (its size divisor is
#: ``_SWIN_PATCH * 2**(len(depths) - 1)``).
_SWIN_PATCH, _SWIN_DEPTHS = 4, (2, 2, 2, 2)


def _fit_size(size: Tuple[int, ...], options: Dict[str, Any]) -> Tuple[Tuple[int, ...], Dict[str, Any]]:
    """Swin-UNet's registry size hook: it is built for one size, a multiple of ``4 * 2**(stages - 1)``.

    An explicit ``img_size`` fixes the size; otherwise each axis of ``size`` is rounded down to the
    multiple (at least one multiple) and becomes ``img_size``.
    """
    fixed = options.get("img_size")
    if fixed is not None:
        return ((fixed, fixed) if isinstance(fixed, int) else tuple(int(s) for s in fixed)), options
    stages = len(options.get("depths", _SWIN_DEPTHS))
    divisor = _SWIN_PATCH * 2 ** (stages - 1)
    fitted = tuple(max(divisor, s // divisor * divisor) for s in size)
    return fitted, {**options, "img_size": fitted}


@register_model("swin_unet", dim=2, fit_size=_fit_size)
def swin_unet(
    in_channels: int,
    num_classes: int,
    img_size: Union[int, Sequence[int]] = 224,
    embed_dim: int = 96,
    depths: Sequence[int] = _SWIN_DEPTHS,
    num_heads: Sequence[int] = (3, 6, 12, 24),
    window_size: int = 7,
    drop_path: float = 0.2,
) -> SwinUNet:
    """Swin-UNet tiny (SSL4MIS ``ViT_Seg``): patch 4, window 7, embed 96, depths 2-2-2-2; fixed ``img_size``."""
    return SwinUNet(
        in_channels,
        num_classes,
        img_size=img_size,
        patch_size=_SWIN_PATCH,
        embed_dim=embed_dim,
        depths=depths,
        num_heads=num_heads,
        window_size=window_size,
        drop_path=drop_path,
    )
