"""Which tokens halt at an exit head: DToP's confidence rule, and the halting budget (an exact fraction).

Both take per-class scores [B, K, N] (presence x sigmoid(mask logit)) and ``valid`` [B, N] (tokens that may
halt: active, not padding) and return bool [B, N], True = halts now. Vectorised: no host read, no loop over
classes; both keep, for every class, the k most confident tokens predicted as it as context
(``_class_ranks``: a per-class top-k over a [B, K, N] matrix that holds each token's score in the row of its
predicted class only).
"""

from __future__ import annotations

import torch


def _class_ranks(scores: torch.Tensor, cls: torch.Tensor, candidate: torch.Tensor, k: int) -> torch.Tensor:
    """int64 [B, N]: each candidate's rank among the candidates predicted as its class ``cls`` [B, N], most
    confident first, for the ``k`` first of every class; ``k`` for all other tokens."""
    num_classes, n = scores.shape[1], scores.shape[2]
    own_row = cls.unsqueeze(1) == torch.arange(num_classes, device=scores.device)[:, None]
    ranked = torch.where(own_row & candidate.unsqueeze(1), scores, float("-inf"))
    top = ranked.topk(min(k, n), dim=-1)
    # A class with fewer than k candidates also returns -inf fillers (possibly other classes' tokens): they go to
    # a spare slot n, dropped after. A real pick appears in one class row only.
    dest = torch.where(torch.isfinite(top.values), top.indices, n).flatten(1)
    ranks = torch.arange(top.indices.shape[-1], device=scores.device).expand_as(top.indices).flatten(1)
    keep_rank = torch.full((scores.shape[0], n + 1), k, dtype=torch.long, device=scores.device)
    return keep_rank.scatter_reduce_(1, dest, ranks, "amin")[:, :n]


def halting_mask(scores: torch.Tensor, valid: torch.Tensor, threshold: float, k: int = 5) -> torch.Tensor:
    """DToP's halting rule: a valid token is a candidate when its confidence max_c score[c, t] exceeds
    ``threshold``; for every class the ``min(k, count)`` most confident candidates predicted as that class stay
    as context, the other candidates halt."""
    conf, cls = scores.max(dim=1)
    candidate = valid & (conf > threshold)
    return candidate & (_class_ranks(scores, cls, candidate, k) >= k)


def budget_halting_mask(
    scores: torch.Tensor, valid: torch.Tensor, fraction: float, keep_top_k: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """The halting budget: exactly h = round(fraction x n) of each image's n valid tokens halt (rounded half to
    even, at most n - 1: one token always stays), so the survivors n - h follow from n alone. Returns the halt
    mask and the survivors int64 [B].

    Order: the valid tokens outside the keep set (each class's ``keep_top_k`` most confident tokens, as in
    ``halting_mask`` with every valid token a candidate), most confident first. When those are fewer than h,
    the count stays exact and the keep set gives way from its least confident rank: every class's k-th token
    (most confident first among them), then every (k-1)-th, ..., each class's most confident token last.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction} must lie in [0, 1]")
    conf, cls = scores.max(dim=1)
    keep_rank = _class_ranks(scores, cls, valid, keep_top_k)
    count = valid.sum(1)
    halt_count = torch.minimum((fraction * count).round().long(), count - 1).clamp(min=0)
    # Groups halt in turn: 0 = not kept, then kept rank k-1 (group 1) .. rank 0 (group k); padding never.
    group = torch.where(valid, keep_top_k - keep_rank, keep_top_k + 1)
    by_conf = conf.argsort(dim=1, descending=True, stable=True)
    order = by_conf.gather(1, group.gather(1, by_conf).argsort(dim=1, stable=True))
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    return rank < halt_count[:, None], count - halt_count


def forced_halting_mask(scores: torch.Tensor, valid: torch.Tensor, fraction: float) -> torch.Tensor:
    """Speed-study knob: the halting budget without a keep set (exactly round(fraction x valid tokens) of the
    most confident valid tokens halt, at least one stays)."""
    return budget_halting_mask(scores, valid, fraction, keep_top_k=0)[0]
