"""Supertoken embedding: superpatches -> tokens with the ViT's own patch embedding (STEP eq. 1).

A superpatch of s x s patches (16s x 16s px) is resized to 16 x 16 px with bilinear interpolation and
embedded by the same 16x16/16 conv as ordinary patches. ``embed_pyramid`` does this for all
superpatches at once with an image pyramid: level s is the whole image bilinearly downsampled by s
(``antialias=False, align_corners=False``), patch-embedded; the token of an aligned window (i, j) of
size s is the level-s embedding at (i, j).

Why the pyramid equals the per-superpatch resize: with align_corners=False, output pixel u of a
resize by factor s samples the source at x = s*(u + 0.5) - 0.5, i.e. between pixels floor(x) and
floor(x)+1 with weight frac(x) (s = 1: x = u exactly; even s: frac = 1/2). For the 16x16 resize of a
crop starting at pixel 16*s*i, u in [0, 15] gives x in [s/2 - 1/2, 16s - s/2 - 1/2] within the crop,
so both neighbours lie inside the crop ([0, 16s - 1]) and PyTorch's border clamps never trigger. In
the whole-image downsample, output pixel 16*i + u samples 16*s*i + s*(u + 0.5) - 0.5: the same two
pixels with the same weight. Hence the two agree up to float rounding, with no border effect for any
s in 1, 2, 4, 8, 16 (tests/test_tokens_embed.py checks it against the literal crop-resize-conv).

Position embedding (our choice; the paper is silent): a supertoken gets the mean of the ViT's
position-embedding grid over the cells it covers, i.e. avg_pool2d(pos_grid, s) at the window,
added per pyramid level before the gather. It reduces to the ordinary position embedding for 1x1
tokens and needs no new parameters.

Cost (our choice: always compute every level that fits the grid, no host sync to find which sizes
are present): levels 2..16 add 1/4 + 1/16 + 1/64 + 1/256 = 0.33x the patch-embedding FLOPs of level 1,
which is itself negligible next to the ViT blocks. Measured on an H100 (bf16, ViT-B's 768-ch conv,
8 images of 512x512): plain patch embedding 0.6 ms, this pyramid embedding 1.9 ms (launch-bound
small kernels), a ViT-B forward 7.9 ms; skipping absent levels would need a host sync per batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from step_lightning.tokens.layout import TOKEN_SIZES


def embed_pyramid(images: Tensor, grid: tuple[int, int], proj: nn.Conv2d, pos_grid: Tensor) -> Tensor:
    """Every level's embedded windows with their position embedding, token-major: [B, S, C], S = the sum of
    the level sizes, levels in TOKEN_SIZES order, raster order inside a level (see ``feature_index``).
    ``proj`` is the encoder's 16x16 stride-16 Conv2d, ``pos_grid`` [1, C, Hp, Wp] its position embedding
    resized to the grid; the modules are passed at call time so the model's state dict holds them once."""
    hp, wp = grid
    h, w = images.shape[-2:]
    if (h, w) != (16 * hp, 16 * wp):
        raise ValueError(f"images are {h}x{w} px but the layout grid {hp}x{wp} needs {16 * hp}x{16 * wp}")
    levels = []
    for s in TOKEN_SIZES:
        if hp // s == 0 or wp // s == 0:  # no window of this size fits: no token can use the level
            continue
        level = (
            images
            if s == 1
            else F.interpolate(images, size=(h // s, w // s), mode="bilinear", align_corners=False, antialias=False)
        )
        pos = pos_grid if s == 1 else F.avg_pool2d(pos_grid, s)
        levels.append((proj(level) + pos).flatten(2).transpose(1, 2))
    return torch.cat(levels, 1)


def feature_index(size: Tensor, row: Tensor, col: Tensor, grid: tuple[int, int]) -> Tensor:
    """Index into ``embed_pyramid``'s S entries of the token of side ``size`` (patches) whose
    top-left cell is (row, col); any shape. Python scalars only (a lookup tensor built from a list would be a
    blocking host-to-device copy); size 0 (padding) reads entry 0."""
    hp, wp = grid
    size = size.clamp(min=1)
    # A tensor numerator: the ONNX exporter cannot convert int // tensor (aten.floor_divide with a scalar first).
    index = (row // size) * (torch.full_like(size, wp) // size) + col // size
    for s in TOKEN_SIZES:
        count = (hp // s) * (wp // s)
        index = index + (size > s) * count  # skip the levels before the token's own
    return index
