"""Token layouts: how an Hp x Wp patch grid is partitioned into square supertokens.

A window of size s (s in 2, 4, 8, 16 patches) is an s x s block of patches whose top-left cell is at
a multiple of s in both directions. Because the sizes are powers of two and windows are aligned, two
windows are either disjoint or nested, so a set of accepted windows in which no window lies inside
another partitions the grid together with the remaining 1x1 cells.

Public API
----------
``TokenLayout``                       batched, padded description of the partition (see the class).
``identity_layout(B, Hp, Wp, device)``  every cell its own token (the plain SegViT case).
``dcts_layout(scores, grid, thresholds)``  STEP's dCTS: coarse-to-fine thresholding of per-size scores.
``cts_layout(score2, grid, k)``       CTS baseline: exactly the top-k 2x2 windows merged.
``cts_k_for_grid(Hp, Wp)``            CTS's k=103 at 32x32 patches, scaled with the patch count.
``dcts_size_map`` / ``cts_size_map``  the per-cell size maps the two builders start from (no host sync);
                                     ``step_lightning.tokens.packed`` packs them for the inference engine.
``unshare(values, layout, dim)``      copy per-token values back to every cell they cover.

All builders are vectorised over images and windows (one Python loop over the four window sizes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from step_lightning.tokens.tau import WINDOW_SIZES

TOKEN_SIZES = (1, 2, 4, 8, 16)


@dataclass
class TokenLayout:
    """Batched, padded partition of the patch grid into square tokens.

    cell_to_token: int64 [B, Hp*Wp]  index (into that image's token list) of the token covering each
                                     cell; cells in raster order, cell index = r*Wp + c.
    token_size:    int64 [B, N]      side length s in patches (1, 2, 4, 8, 16); 0 for padding tokens.
    token_pos:     int64 [B, N, 2]   (row, col) of the token's top-left cell; (0, 0) for padding.
                                     Real tokens come first, in raster order of that cell.
    valid:         bool  [B, N]      False for padding tokens.
    grid:          (Hp, Wp)
    N is the largest token count in the batch.
    """

    cell_to_token: Tensor
    token_size: Tensor
    token_pos: Tensor
    valid: Tensor
    grid: tuple[int, int]

    @property
    def num_tokens(self) -> Tensor:
        """int64 [B]: real tokens per image."""
        return self.valid.sum(1)

    @property
    def counts_per_size(self) -> Tensor:
        """int64 [B, 5]: tokens of size 1, 2, 4, 8, 16 per image (columns follow TOKEN_SIZES)."""
        return torch.stack([(self.token_size == s).sum(1) for s in TOKEN_SIZES], 1)

    def to(self, device: torch.device | str) -> TokenLayout:
        return TokenLayout(
            self.cell_to_token.to(device),
            self.token_size.to(device),
            self.token_pos.to(device),
            self.valid.to(device),
            self.grid,
        )


def identity_layout(batch_size: int, hp: int, wp: int, device: torch.device | str | None = None) -> TokenLayout:
    """Every cell is its own 1x1 token."""
    n = hp * wp
    cells = torch.arange(n, device=device)
    pos = torch.stack((cells // wp, cells % wp), -1)
    return TokenLayout(
        cell_to_token=cells.repeat(batch_size, 1),
        token_size=torch.ones(batch_size, n, dtype=torch.long, device=device),
        token_pos=pos.repeat(batch_size, 1, 1),
        valid=torch.ones(batch_size, n, dtype=torch.bool, device=device),
        grid=(hp, wp),
    )


def layout_from_size_map(size_map: Tensor, num_slots: int | None = None) -> TokenLayout:
    """Build the padded token list from a per-cell map of the covering square's size.

    ``size_map`` int64 [B, Hp, Wp] must describe a partition into aligned squares (every cell of an
    aligned s x s window holds s); the builders below guarantee this. Each cell's owner is the
    top-left cell of its square, (r - r mod s, c - c mod s); a cell starts a token iff it is its own
    owner. A cumulative sum over start cells in raster order numbers the tokens, a gather at the owner
    gives cell_to_token, and a scatter of the start cells fills token_size / token_pos.

    ``num_slots`` is N when the caller knows it (CTS); otherwise N = max count over the batch, read
    with ``counts.max().item()``: the one host sync of this function, needed because N is a shape.
    """
    b, hp, wp = size_map.shape
    device = size_map.device
    rows = torch.arange(hp, device=device).view(1, hp, 1)
    cols = torch.arange(wp, device=device).view(1, 1, wp)
    top = rows - rows % size_map
    left = cols - cols % size_map
    is_start = ((top == rows) & (left == cols)).flatten(1)
    rank = is_start.cumsum(1) - 1
    cell_to_token = rank.gather(1, (top * wp + left).flatten(1))
    counts = is_start.sum(1)
    n = counts.max().item() if num_slots is None else num_slots
    if isinstance(n, torch.SymInt):
        # torch.export traces N as a data-dependent size (dCTS exports with a dynamic token count); two slots
        # at least, so that attention never has to treat a one-token sequence as a broadcast.
        n = torch.sym_max(n, 2)
    # Non-start cells are scattered into an extra slot n, which is then dropped.
    dest = torch.where(is_start, rank, n)

    def scatter(src: Tensor) -> Tensor:
        out = torch.zeros(b, n + 1, dtype=torch.long, device=device)
        return out.scatter_(1, dest, src.expand(b, hp, wp).flatten(1))[:, :n]

    valid = torch.arange(n, device=device) < counts.unsqueeze(1)
    return TokenLayout(
        cell_to_token=cell_to_token,
        token_size=scatter(size_map),
        token_pos=torch.stack((scatter(rows), scatter(cols)), -1),
        valid=valid,
        grid=(hp, wp),
    )


def window_scores(scores: Tensor, s: int, hp: int, wp: int) -> Tensor:
    """Crop a [B, h, w] score map to the floor(Hp/s) x floor(Wp/s) windows that lie inside the grid.

    Maps with ceil(Hp/s) x ceil(Wp/s) entries (partial border windows included) are accepted: the
    partial windows are dropped because they are never merged.
    """
    nh, nw = hp // s, wp // s
    h, w = scores.shape[-2:]
    if not (nh <= h <= -(-hp // s) and nw <= w <= -(-wp // s)):
        raise ValueError(
            f"score map for {s}x{s} windows has shape {tuple(scores.shape)}; a {hp}x{wp} patch grid needs "
            f"[B, {nh}, {nw}] (floor) or [B, {-(-hp // s)}, {-(-wp // s)}] (ceil)"
        )
    return scores[:, :nh, :nw]


def expand_windows(values: Tensor, s: int, hp: int, wp: int, fill: int = 0) -> Tensor:
    """[B, nh, nw] per window -> [B, Hp, Wp] per cell (border cells outside whole windows hold ``fill``).
    One copy (expand + reshape), plus one pad when the windows do not tile the grid."""
    b, nh, nw = values.shape
    cells = values[:, :, None, :, None].expand(b, nh, s, nw, s).reshape(b, nh * s, nw * s)
    if (nh * s, nw * s) != (hp, wp):
        cells = torch.nn.functional.pad(cells, (0, wp - nw * s, 0, hp - nh * s), value=fill)
    return cells


def dcts_layout(scores: Mapping[int, Tensor], grid: tuple[int, int], thresholds: Sequence[float]) -> TokenLayout:
    """dCTS merging (STEP §3.2.1): coarse to fine, a window merges iff score > tau and it lies inside
    no window accepted at a larger size.

    scores:     {s: float [B, Hp//s, Wp//s]} homogeneity probabilities per window size s in 2, 4, 8,
                16 (ceil-sized maps are cropped, see ``window_scores``). A missing size never merges.
    grid:       (Hp, Wp).
    thresholds: (tau2, tau4, tau8, tau16), e.g. ``parse_tau(6899)``.

    Nesting test: accepted windows are aligned squares of larger power-of-two size, so a window of
    size s lies inside an accepted larger one iff its top-left cell is already covered.
    One host sync (N, see ``layout_from_size_map``).
    """
    return layout_from_size_map(dcts_size_map(scores, grid, thresholds))


def dcts_size_map(scores: Mapping[int, Tensor], grid: tuple[int, int], thresholds: Sequence[float]) -> Tensor:
    """The per-cell size map [B, Hp, Wp] of ``dcts_layout`` (static shapes, no host sync)."""
    if not scores:
        raise ValueError("dcts_layout needs at least one score map")
    if len(thresholds) != len(WINDOW_SIZES):
        raise ValueError(f"thresholds must be (tau2, tau4, tau8, tau16), got {thresholds!r}")
    hp, wp = grid
    ref = next(iter(scores.values()))
    size_map = torch.ones(ref.shape[0], hp, wp, dtype=torch.long, device=ref.device)
    for s, tau in sorted(zip(WINDOW_SIZES, thresholds, strict=True), reverse=True):
        nh, nw = hp // s, wp // s
        if s not in scores or nh == 0 or nw == 0:
            continue
        free = size_map[:, ::s, ::s][:, :nh, :nw] == 1  # top-left cell not covered by a larger window
        accept = expand_windows((window_scores(scores[s], s, hp, wp) > tau) & free, s, hp, wp)
        size_map = size_map.masked_fill(accept, s)
    return size_map


def cts_k_for_grid(hp: int, wp: int, k_at_32x32: int = 103) -> int:
    """CTS's number of merged 2x2 windows: 103 at 32x32 patches (512x512 px), scaled with the
    patch count and capped by the number of 2x2 windows in the grid."""
    return min(round(k_at_32x32 * hp * wp / 1024), (hp // 2) * (wp // 2))


def cts_layout(score2: Tensor, grid: tuple[int, int], k: int) -> TokenLayout:
    """CTS merging: the k highest-scoring 2x2 windows of each image are merged, so every image has
    exactly Hp*Wp - 3k tokens (no padding, no host sync). score2: float [B, Hp//2, Wp//2]."""
    hp, wp = grid
    return layout_from_size_map(cts_size_map(score2, grid, k), num_slots=hp * wp - 3 * k)


def cts_size_map(score2: Tensor, grid: tuple[int, int], k: int) -> Tensor:
    """The per-cell size map [B, Hp, Wp] of ``cts_layout``."""
    hp, wp = grid
    flat = window_scores(score2, 2, hp, wp).flatten(1)
    if not 0 <= k <= flat.shape[1]:
        raise ValueError(f"k={k} must lie in [0, {flat.shape[1]}] for a {hp}x{wp} grid")
    top = flat.topk(k, dim=1).indices
    # A tensor source (not a Python bool) keeps this traceable by fvcore's jit trace.
    accept = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, top, torch.ones_like(top, dtype=torch.bool))
    cells = expand_windows(accept.view(-1, hp // 2, wp // 2), 2, hp, wp)
    return torch.ones_like(cells, dtype=torch.long).masked_fill(cells, 2)


def unshare(values: Tensor, layout: TokenLayout, dim: int = -1) -> Tensor:
    """Copy per-token values to every cell each token covers: size N along ``dim`` -> Hp*Wp.

    ``values`` has the batch first, e.g. [B, C, N] with dim=-1 or [B, N, C] with dim=1. Padding tokens
    are never read. unshare(x, identity_layout(...)) == x.
    """
    dim = dim % values.ndim
    if dim == 0:
        raise ValueError("dim 0 is the batch; the token dimension must come after it")
    shape = [1] * values.ndim
    shape[0], shape[dim] = layout.cell_to_token.shape
    size = list(values.shape)
    size[dim] = shape[dim]
    return values.gather(dim, layout.cell_to_token.view(shape).expand(size))
