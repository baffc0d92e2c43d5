"""A token budget for dCTS: at most a fixed number of tokens per image, with static shapes and no host read.

dCTS accepts a window of size s when its score exceeds tau_s and no larger accepted window contains it. Shifting
every threshold by the same delta keeps that rule and its coarse-to-fine nesting, and orders windows by their
margin score - tau_s: lowering delta only adds accepted windows, each of which coarsens the partition, so the
token count is nondecreasing in delta. Per image, ``budget_size_map`` finds the largest delta whose layout has at
most ``budget`` tokens by a bracketing search: ``ROUNDS`` rounds of ``CANDIDATES`` deltas evaluated at once
(vectorised over images and candidates, a fixed number of ops: no host read, no loop over windows). The caller
pads each image to exactly ``budget`` tokens; the padding never attends or is read. Windows whose margins tie
(an oracle's 0/1 scores) merge together, so the real count may stay a merge step below the budget.

delta = 0 is the threshold layout: a budget equal to an image's own dCTS count reproduces it whenever no other
layout with that count lies between (``tests/test_tokens_budget.py``). A budget of every patch is plain patches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from step_lightning.core import ConfigError
from step_lightning.tokens.layout import dcts_size_map

ROUNDS = 3
CANDIDATES = 32  # deltas per round: the bracket shrinks 31x per round (resolution 2.02 / 31^3 ~ 7e-5)
SPAN = 1.01  # scores and thresholds lie in [0, 1]: delta = -SPAN merges every window, +SPAN none


def budget_tokens(budget: float, grid: tuple[int, int]) -> int:
    """Tokens per image of ``budget``: a fraction of the patch count (0 < budget <= 1) or a count (> 1)."""
    patches = grid[0] * grid[1]
    if isinstance(budget, bool) or not isinstance(budget, int | float) or budget <= 0:
        raise ConfigError(f"budget={budget} must be a fraction of the patches in (0, 1] or a token count, "
                          "e.g. budget=0.4.")
    return min(patches, max(1, round(budget * patches))) if budget <= 1 else min(patches, int(budget))


def fewest_tokens(grid: tuple[int, int], sizes: Sequence[int]) -> int:
    """The fewest tokens a layout with windows of ``sizes`` has on an Hp x Wp grid: every cell in the largest
    window that fits there. The windows of size s tile the rectangle [0, Hp - Hp mod s) x [0, Wp - Wp mod s);
    these rectangles shrink as s grows, so each size adds its windows outside the next larger size's rectangle,
    and cells outside every rectangle stay single patches. Python ints from shapes."""
    hp, wp = grid
    count, inner = 0, (0, 0)  # the next larger size's rectangle
    for s in sorted(sizes, reverse=True):
        rows, cols = hp - hp % s, wp - wp % s
        count += (rows // s) * (cols // s) - (inner[0] // s) * (inner[1] // s)
        inner = (rows, cols)
    return count + hp * wp - inner[0] * inner[1]


def check_budget(tokens: int, grid: tuple[int, int], sizes: Sequence[int]) -> None:
    fewest = fewest_tokens(grid, sizes)
    if tokens < fewest:
        raise ConfigError(
            f"a budget of {tokens} tokens is below the {fewest} that a {grid[0]}x{grid[1]} patch grid keeps with "
            f"every window of sizes {list(sizes)} merged; raise the budget to >= {fewest / (grid[0] * grid[1]):.3f}."
        )


def _counts(size_map: Tensor) -> Tensor:
    """int64 [B]: tokens of each size map (cells that are their token's top-left cell)."""
    _, hp, wp = size_map.shape
    rows = torch.arange(hp, device=size_map.device).view(1, hp, 1) % size_map
    cols = torch.arange(wp, device=size_map.device).view(1, 1, wp) % size_map
    return ((rows == 0) & (cols == 0)).flatten(1).sum(1)


def _shifted_size_maps(scores: Mapping[int, Tensor], grid, thresholds: Sequence[float], deltas: Tensor) -> Tensor:
    """Size maps [B * C, Hp, Wp] of every image under every threshold shift ``deltas`` [B, C]: the scores
    minus the shift against the plain thresholds (the same comparison as score > tau + delta)."""
    b, c = deltas.shape
    shifted = {s: (v[:, None] - deltas[..., None, None].to(v.dtype)).flatten(0, 1) for s, v in scores.items()}
    return dcts_size_map(shifted, grid, thresholds)


def budget_size_map(scores: Mapping[int, Tensor], grid: tuple[int, int], thresholds: Sequence[float],
                    budget: int) -> Tensor:
    """The dCTS size map [B, Hp, Wp] of each image with at most ``budget`` tokens, as close to it as the
    window margins allow (see the module doc); ``budget`` must be at least ``fewest_tokens``."""
    ref = next(iter(scores.values()))
    b, device = ref.shape[0], ref.device
    lo = torch.full((b, 1), -SPAN, device=device)
    hi = torch.full((b, 1), SPAN, device=device)
    steps = torch.linspace(0.0, 1.0, CANDIDATES, device=device)
    for _ in range(ROUNDS):
        deltas = lo + (hi - lo) * steps  # [B, C], ascending
        counts = _counts(_shifted_size_maps(scores, grid, thresholds, deltas)).view(b, CANDIDATES)
        fits = (counts <= budget).sum(1, keepdim=True)  # a prefix: counts grow with delta; >= 1 (delta = lo fits)
        lo = deltas.gather(1, (fits - 1).clamp(min=0))
        hi = deltas.gather(1, fits.clamp(max=CANDIDATES - 1))
    return _shifted_size_maps(scores, grid, thresholds, lo).view(b, *grid)
