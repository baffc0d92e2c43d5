"""Token budgets for dCTS: exactly a given number of tokens per image, with static shapes and no host read.

Public API
----------
``parse_budget(value)``               ``budget=0.6`` (a fraction of the patch count) or ``budget=700`` (tokens).
``budget_tokens(budget, grid, sizes)``  the token count of a parsed budget on one patch grid.
``min_token_count(grid, sizes)``      tokens of the coarsest partition: the smallest reachable count.
``budget_size_map(scores, grid, thresholds, budget_tokens, floor)``  the size map and per-image counts.

The rule (``budget_size_map``)
------------------------------
Every whole window w of size s gets the key ``score_w - tau_s``, its margin above its own threshold. dCTS merges
the maximal windows of A = {key > 0} (a window inside a coarser member of A is covered by it, so coarse wins).
The budget shifts all thresholds of an image by one offset: A_j = its j highest-key windows (ties: coarser
first), layout L_j = the maximal windows of A_j. Growing A only coarsens L_j, so its token count c(j) falls
with j; the rule takes the largest j with c(j) >= budget. Windows of all sizes compete in one ranking (a sure
2x2 window merges before an unsure 16x16 one) while the thresholds set how sure each size must be, and a budget
equal to an image's dCTS count gives exactly its dCTS layout, for any scores.

The next window in the ranking would overshoot: merging a window saves (tokens inside it) - 1. Every merge
saves a multiple of 3 (a window's token count is 1 mod 3: s^2 = 1 mod 3 for every size), so the gap is closed
with merges that save exactly 3: windows whose four quarters are already tokens, fine to coarse, the best key
first within a size. The overshooting window decomposes into such merges, so enough exist, and every image
ends at ``budget - (budget - Hp*Wp) mod 3`` tokens: the caller pads with the same 0, 1 or 2 tokens per image.

``floor=True``: windows at or below their threshold never merge. An image whose dCTS count exceeds the budget
then keeps its dCTS layout (more tokens than the budget); otherwise, where the above-threshold windows cannot
close the gap, the overshooting window is merged and more padding is needed. Static shapes need floor=False.

Vectorised: c(j) for all j at once (w is maximal in A_j iff rank(w) < j <= the lowest rank among its
ancestors, so its saving counts over an interval of j: a difference array and one cumulative sum), one
argsort over all windows, Python loops over the four window sizes only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from step_lightning.core import ConfigError
from step_lightning.tokens.layout import expand_windows, window_scores
from step_lightning.tokens.tau import WINDOW_SIZES

_EXPECTED = (
    "a fraction of the patch count in (0, 1], e.g. budget=0.6 (1.0 = every patch its own token), "
    "or a token count > 1, e.g. budget=700"
)


def parse_budget(value: float | int) -> float | int:
    """A float in (0, 1] (a fraction of the patch count) or an int > 1 (tokens); ConfigError otherwise."""
    # bool is an int subclass; True would otherwise read as a count.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"budget={value!r} is not a number; give {_EXPECTED}.")
    if isinstance(value, int):
        if value <= 1:
            raise ConfigError(f"budget={value} is no token count; give {_EXPECTED}.")
        return value
    if not 0.0 < value <= 1.0:  # also refuses nan
        raise ConfigError(f"budget={value} is a float outside (0, 1]; give {_EXPECTED}.")
    return float(value)


def min_token_count(grid: tuple[int, int], sizes: Sequence[int] = WINDOW_SIZES) -> int:
    """Tokens of the coarsest partition of an Hp x Wp grid into aligned windows of ``sizes`` and 1x1 cells: each
    size tiles its whole-window area less the area the larger sizes tiled; 1x1 cells fill the rest."""
    hp, wp = grid
    count, tiled = 0, 0
    for s in sorted(sizes, reverse=True):
        area = (hp // s * s) * (wp // s * s)
        count += (area - tiled) // (s * s)
        tiled = area
    return count + hp * wp - tiled


def budget_tokens(budget: float | int, grid: tuple[int, int], sizes: Sequence[int] = WINDOW_SIZES) -> int:
    """The token count of a ``parse_budget`` value on an Hp x Wp patch grid (a fraction is rounded); ConfigError
    when it lies outside [``min_token_count``, Hp*Wp]."""
    hp, wp = grid
    tokens = round(budget * hp * wp) if isinstance(budget, float) else budget
    lowest = min_token_count(grid, sizes)
    if not lowest <= tokens <= hp * wp:
        raise ConfigError(
            f"budget={budget} means {tokens} tokens on a {hp}x{wp} patch grid, outside the reachable "
            f"[{lowest}, {hp * wp}] (all windows merged .. none); give a budget in that range for this image size."
        )
    return tokens


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
    budget_tokens: int,
    floor: bool = False,
) -> tuple[Tensor, Tensor]:
    """The budget rule of the module doc. scores {s: float [B, Hp//s, Wp//s]} for s = 2, 4, ... up to the
    largest size used (a prefix of WINDOW_SIZES, as a policy gives; ceil-sized maps are cropped), thresholds
    (tau2, tau4, tau8, tau16), budget_tokens in [min_token_count, Hp*Wp].

    Returns the size map int64 [B, Hp, Wp] (an aligned partition, see ``layout_from_size_map``) and the token
    counts int64 [B]: ``budget_tokens - (budget_tokens - Hp*Wp) % 3`` for every image when floor=False.
    """
    hp, wp = grid
    if len(thresholds) != len(WINDOW_SIZES):
        raise ValueError(f"thresholds must be (tau2, tau4, tau8, tau16), got {thresholds!r}")
    if not scores or sorted(scores) != list(WINDOW_SIZES[: len(scores)]):
        raise ValueError(f"budget layouts need scores for the sizes 2, 4, ... up to the largest, got {sorted(scores)}")
    lowest = min_token_count(grid, tuple(scores))
    if not lowest <= budget_tokens <= hp * wp:
        raise ValueError(f"budget_tokens={budget_tokens} lies outside [{lowest}, {hp * wp}] for a {hp}x{wp} grid")
    ref = next(iter(scores.values()))
    b, device = ref.shape[0], ref.device
    tau = dict(zip(WINDOW_SIZES, thresholds, strict=True))
    # Coarse first (rank ties go to the coarser window); sizes without a whole window in the grid drop out.
    sizes = [s for s in sorted(scores, reverse=True) if hp // s and wp // s]
    keys = {s: window_scores(scores[s], s, hp, wp) - tau[s] for s in sizes}
    if not keys:
        return _size_map({}, grid, b, device), torch.full((b,), hp * wp, dtype=torch.long, device=device)
    rank, ancestor, total = _ranks(keys, grid)

    # Token count c(j), j = 0..W: window w saves s^2 - 1 tokens for rank(w) < j <= ancestor(w).
    delta = torch.zeros(b, total + 2, dtype=torch.long, device=device)
    for s in keys:
        saving = (s * s - 1) * (ancestor[s] > rank[s]).long().flatten(1)
        delta.scatter_add_(1, rank[s].flatten(1) + 1, saving)
        delta.scatter_add_(1, ancestor[s].flatten(1) + 1, -saving)
    count = hp * wp - delta.cumsum(1)[:, : total + 1]
    # With the floor, A never grows past the windows above their thresholds (they rank first).
    largest = sum((k > 0).flatten(1).sum(1) for k in keys.values()) if floor else torch.full_like(count[:, 0], total)
    j = torch.minimum((count >= budget_tokens).sum(1) - 1, largest)

    def layout(j: Tensor) -> Tensor:
        jj = j.view(b, 1, 1)
        return _size_map({s: (rank[s] < jj) & (ancestor[s] >= jj) for s in keys}, grid, b, device)

    count_j = count.gather(1, j.unsqueeze(1)).squeeze(1)
    merges = torch.div(count_j - budget_tokens + 2, 3, rounding_mode="floor")
    allowed = {s: k > 0 for s, k in keys.items()} if floor else None
    size_map, undone = _fill(layout(j), rank, allowed, merges)
    counts = count_j - 3 * (merges - undone)
    if floor:
        # Too few windows above threshold to close the gap: merge the overshooting window instead.
        short = undone > 0
        after = torch.minimum(j + 1, largest)
        size_map = torch.where(short.view(b, 1, 1), layout(after), size_map)
        counts = torch.where(short, count.gather(1, after.unsqueeze(1)).squeeze(1), counts)
    return size_map, counts
