"""A token budget for dCTS: a fixed number of tokens per image, with static shapes and no host read.

Public API
----------
``budget_tokens(budget, grid)``       the token count of ``budget=`` (a fraction of the patches, or a count).
``fewest_tokens(grid, sizes)``        tokens of the coarsest partition: the smallest reachable count.
``check_budget(tokens, grid, sizes)`` ConfigError when a count lies below it.
``budget_size_map(scores, grid, thresholds, budget, floor)``  the size map of the rule below.

The rule
--------
Every whole window w of size s gets the key ``score_w - tau_s``, its margin above its own threshold. dCTS merges
the maximal windows of A = {key > 0} (a window inside a coarser member of A is covered by it, so coarse wins).
The budget shifts all thresholds of an image by one offset: A_j = its j highest-key windows (ties: coarser, then
raster order), layout L_j = the maximal windows of A_j. Growing A only coarsens L_j, so its token count c(j)
falls with j; the rule takes the largest j with c(j) >= budget. Windows of all sizes compete in one ranking (a
sure 2x2 window merges before an unsure 16x16 one) while the thresholds set how sure each size must be, and a
budget equal to an image's dCTS count gives exactly its dCTS layout, for any scores.

The next window in the ranking would overshoot: merging a window saves (tokens inside it) - 1. Every merge
saves a multiple of 3 (a window's token count is 1 mod 3: s^2 = 1 mod 3 for every size), so the gap is closed
with merges that save exactly 3: windows whose four quarters are already tokens, fine to coarse, the best key
first within a size. The overshooting window decomposes into such merges, so enough exist, and every image ends
at ``budget - (budget - Hp*Wp) mod 3`` tokens, ties or not: the caller pads with the same 0, 1 or 2 tokens per
image (padding attends to nothing and is never read).

``floor=True``: windows at or below their threshold never merge. An image whose dCTS count exceeds the budget
then keeps its dCTS layout (more tokens than the budget: not a static count); otherwise, where the windows above
threshold cannot close the gap, the overshooting window merges and more padding is needed.

Vectorised: c(j) for all j at once (w is maximal in A_j iff rank(w) < j <= the lowest rank among its
ancestors, so its saving counts over an interval of j: a difference array and one cumulative sum), one argsort
over all windows, Python loops over the four window sizes only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from step_lightning.core import ConfigError
from step_lightning.tokens.layout import expand_windows, window_scores
from step_lightning.tokens.tau import WINDOW_SIZES


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


def _first_k(mask: Tensor, order: Tensor, k: Tensor) -> Tensor:
    """bool [B, ...]: the ``k`` [B] entries of ``mask`` with the smallest ``order`` (distinct per image), all of
    them when fewer. The k-th smallest is found with one sort and a gather (no host read)."""
    flat_order = torch.where(mask, order, torch.iinfo(order.dtype).max).flatten(1)
    ranked = flat_order.sort(dim=1).values
    cutoff = ranked.gather(1, (k - 1).clamp(0, ranked.shape[1] - 1).unsqueeze(1)).view(-1, *[1] * (mask.ndim - 1))
    return mask & (order <= cutoff) & (k > 0).view_as(cutoff)


def _size_map(accept: dict[int, Tensor], grid: tuple[int, int], batch: int, device: torch.device) -> Tensor:
    """int64 [B, Hp, Wp] from disjoint accepted windows {s: bool [B, nh, nw]}."""
    hp, wp = grid
    size_map = torch.ones(batch, hp, wp, dtype=torch.long, device=device)
    for s, acc in accept.items():
        size_map = size_map.masked_fill(expand_windows(acc, s, hp, wp), s)
    return size_map


def _ranks(keys: dict[int, Tensor], grid: tuple[int, int]) -> tuple[dict[int, Tensor], dict[int, Tensor], int]:
    """Every window's rank among all windows of its image (key descending, ties: coarser, then raster order;
    ``keys`` is ordered coarse first), the lowest rank among the windows containing it (W = none), and W."""
    hp, wp = grid
    sizes = list(keys)
    b = keys[sizes[0]].shape[0]
    device = keys[sizes[0]].device
    flat_keys = torch.cat([k.flatten(1) for k in keys.values()], 1)
    total = flat_keys.shape[1]
    order = flat_keys.argsort(dim=1, descending=True, stable=True)
    flat_rank = torch.empty_like(order).scatter_(1, order, torch.arange(total, device=device).expand(b, total))
    splits = flat_rank.split([k[0].numel() for k in keys.values()], 1)
    rank = {s: r.reshape(keys[s].shape) for s, r in zip(sizes, splits, strict=True)}
    ancestor = {}
    lowest = torch.full((b, hp, wp), total, dtype=torch.long, device=device)  # per cell, over the sizes so far
    for s in sizes:
        nh, nw = keys[s].shape[1:]
        ancestor[s] = lowest[:, ::s, ::s][:, :nh, :nw]
        lowest = torch.minimum(lowest, expand_windows(rank[s], s, hp, wp, fill=total))
    return rank, ancestor, total


def _fill(
    size_map: Tensor, rank: dict[int, Tensor], allowed: dict[int, Tensor] | None, merges: Tensor
) -> tuple[Tensor, Tensor]:
    """Merge ``merges`` [B] more windows whose four quarters are tokens (3 tokens saved each), fine to coarse,
    the lowest rank first within a size, only ``allowed`` ones where given. Returns the size map and the merges
    left undone (non-zero only when too few such windows exist)."""
    b, hp, wp = size_map.shape
    for s in sorted(rank):
        nh, nw = rank[s].shape[1:]
        half = s // 2
        quarters = size_map[:, ::half, ::half][:, : 2 * nh, : 2 * nw] == half
        candidate = quarters.view(b, nh, 2, nw, 2).all(4).all(2)
        if allowed is not None:
            candidate = candidate & allowed[s]
        take = _first_k(candidate, rank[s], merges)
        merges = merges - take.flatten(1).sum(1)
        size_map = size_map.masked_fill(expand_windows(take, s, hp, wp), s)
    return size_map, merges


def budget_size_map(
    scores: Mapping[int, Tensor],
    grid: tuple[int, int],
    thresholds: Sequence[float],
    budget: int,
    floor: bool = False,
) -> Tensor:
    """The size map int64 [B, Hp, Wp] (an aligned partition, see ``layout_from_size_map``) of the rule in the
    module doc: ``budget - (budget - Hp*Wp) % 3`` tokens per image (floor=False). scores {s: float [B, Hp//s,
    Wp//s]} for s = 2, 4, ... up to the largest size used (a prefix of WINDOW_SIZES, as a policy gives; ceil-sized
    maps are cropped), thresholds (tau2, tau4, tau8, tau16), budget in [``fewest_tokens``, Hp*Wp]."""
    hp, wp = grid
    if len(thresholds) != len(WINDOW_SIZES):
        raise ValueError(f"thresholds must be (tau2, tau4, tau8, tau16), got {thresholds!r}")
    if not scores or sorted(scores) != list(WINDOW_SIZES[: len(scores)]):
        raise ValueError(f"budget layouts need scores for the sizes 2, 4, ... up to the largest, got {sorted(scores)}")
    fewest = fewest_tokens(grid, tuple(scores))
    if not fewest <= budget <= hp * wp:
        raise ValueError(f"budget={budget} tokens lies outside [{fewest}, {hp * wp}] for a {hp}x{wp} grid")
    ref = next(iter(scores.values()))
    b, device = ref.shape[0], ref.device
    tau = dict(zip(WINDOW_SIZES, thresholds, strict=True))
    # Coarse first (rank ties go to the coarser window); sizes without a whole window in the grid drop out.
    sizes = [s for s in sorted(scores, reverse=True) if hp // s and wp // s]
    keys = {s: window_scores(scores[s], s, hp, wp) - tau[s] for s in sizes}
    if not keys:
        return _size_map({}, grid, b, device)
    rank, ancestor, total = _ranks(keys, grid)

    # Token count c(j), j = 0..W: window w saves s^2 - 1 tokens for rank(w) < j <= ancestor(w).
    delta = torch.zeros(b, total + 2, dtype=torch.long, device=device)
    for s in keys:
        saving = (s * s - 1) * (ancestor[s] > rank[s]).long().flatten(1)
        delta.scatter_add_(1, rank[s].flatten(1) + 1, saving)
        delta.scatter_add_(1, ancestor[s].flatten(1) + 1, -saving)
    count = hp * wp - delta.cumsum(1)[:, : total + 1]  # [B, W + 1]
    # With the floor, A never grows past the windows above their thresholds (they rank first).
    largest = sum((k > 0).flatten(1).sum(1) for k in keys.values()) if floor else torch.full_like(count[:, 0], total)
    j = torch.minimum((count >= budget).sum(1) - 1, largest)

    def layout(j: Tensor) -> Tensor:
        jj = j.view(b, 1, 1)
        return _size_map({s: (rank[s] < jj) & (ancestor[s] >= jj) for s in keys}, grid, b, device)

    count_j = count.gather(1, j.unsqueeze(1)).squeeze(1)
    merges = torch.div(count_j - budget + 2, 3, rounding_mode="floor")
    allowed = {s: k > 0 for s, k in keys.items()} if floor else None
    size_map, undone = _fill(layout(j), rank, allowed, merges)
    if floor:
        # Too few windows above threshold to close the gap: merge the overshooting window instead.
        after = torch.minimum(j + 1, largest)
        size_map = torch.where((undone > 0).view(b, 1, 1), layout(after), size_map)
    return size_map
