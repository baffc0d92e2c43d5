"""Supertoken layouts packed for the inference engine: the tokens of a whole batch in one row list.

Rows are image-major, and inside an image in raster order of the token's top-left cell (the order of
``TokenLayout``), so row r of image b is that image's token ``r - cu_seqlens[b]``. The first ``total`` rows
are real; the list is padded to ``rows`` (a bucket the caller picked after reading ``total``) with dummy
rows that belong to no image (their values are copies of real rows: finite, never read back).

``token_starts(size_map)``            start cells and per-image counts: everything before the host read.
``pack_layout(size_map, *starts, rows)``  the packed rows (size, position, pyramid index) and, per cell,
                                      the row of the token covering it; static shapes for a given ``rows``.

Both are vectorised over the batch (one cumulative sum over all images' start cells numbers the rows),
without host syncs, boolean indexing or per-image loops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from step_lightning.tokens.embed import feature_index
from step_lightning.tokens.layout import TOKEN_SIZES


@dataclass
class PackedLayout:
    """A batch's partition into square tokens, packed. Dummy rows hold some real token's values (callers mask
    them with the packing: nothing in the engine reads them back).

    cell_row:  int64 [B, Hp*Wp]  packed row of the token covering each cell.
    row_size:  int64 [rows]      token side in patches.
    row_pos:   int64 [rows, 2]   (row, col) of the token's top-left cell.
    row_feature: int64 [rows]    index into ``embed_pyramid`` of the whole batch flattened to
                                 [B * S, C] (image-major).
    counts:    int64 [B]         tokens per image.
    grid:      (Hp, Wp)
    """

    cell_row: Tensor
    row_size: Tensor
    row_pos: Tensor
    row_feature: Tensor
    counts: Tensor
    grid: tuple[int, int]


def token_starts(size_map: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """size_map int64 [B, Hp, Wp] (an aligned-square partition, see ``layout_from_size_map``) -> bool [B, Hp*Wp]
    True where a cell is its token's top-left cell, the int64 [B] token counts and int64 [B, Hp*Wp] each
    cell's offset from its token's top-left cell in raster order. No host sync."""
    _, hp, wp = size_map.shape
    rows = torch.arange(hp, device=size_map.device).view(1, hp, 1) % size_map
    cols = torch.arange(wp, device=size_map.device).view(1, 1, wp) % size_map
    is_start = ((rows == 0) & (cols == 0)).flatten(1)
    return is_start, is_start.sum(1), (rows * wp + cols).flatten(1)


def pack_layout(size_map: Tensor, is_start: Tensor, counts: Tensor, offset: Tensor, rows: int,
                stride: int | None = None) -> PackedLayout:
    """Pack the tokens of ``size_map`` [B, Hp, Wp] into ``rows`` >= counts.sum() rows (see the module doc);
    ``is_start``, ``counts``, ``offset`` from ``token_starts``. ``stride``: padded rows instead, image b's tokens
    from row b * stride on (rows = B * stride, stride >= every count; the rows after an image's tokens are
    padding, holding copies of a real row).

    A cumulative sum over the start cells of all images (image-major) gives each token its row; a gather
    at each cell's owner (its token's top-left cell: the cell minus its offset) gives ``cell_row``; an
    index_copy with distinct destinations (non-start cells go past the end) inverts it into each row's start
    cell.
    """
    b, hp, wp = size_map.shape
    n = hp * wp
    device = size_map.device
    cells = torch.arange(b * n, device=device)
    flat_start = is_start.flatten()
    if stride is None:
        rank = flat_start.cumsum(0) - 1  # packed row of every start cell
    else:
        rank = (is_start.cumsum(1) - 1 + torch.arange(b, device=device)[:, None] * stride).flatten()
    cell_row = rank.gather(0, cells - offset.flatten()).view(b, n)
    dest = torch.where(flat_start, rank, rows + cells)
    row_cell = torch.zeros(rows + b * n, dtype=torch.long, device=device).index_copy_(0, dest, cells)[:rows]
    row_size = size_map.flatten().index_select(0, row_cell)
    within = row_cell % n
    row_pos = torch.stack((within // wp, within % wp), -1)
    feature = feature_index(row_size, row_pos[:, 0], row_pos[:, 1], (hp, wp))
    row_feature = (row_cell // n) * pyramid_size(hp, wp) + feature
    return PackedLayout(cell_row, row_size, row_pos, row_feature, counts, (hp, wp))


def pyramid_size(hp: int, wp: int) -> int:
    """S: the number of windows over all levels of ``embed_pyramid`` for an Hp x Wp grid."""
    return sum((hp // s) * (wp // s) for s in TOKEN_SIZES)
