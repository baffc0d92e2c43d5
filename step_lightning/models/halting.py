"""Which tokens halt at an exit head: DToP's confidence rule, and a forced fraction for speed studies.

Both take per-class scores [B, K, N] (presence x sigmoid(mask logit)) and ``valid`` [B, N] (tokens that
may halt) and return bool [B, N], True = halts now. Vectorised: no host sync, no loop over classes.
"""

from __future__ import annotations

import torch


def halting_mask(scores: torch.Tensor, valid: torch.Tensor, threshold: float, k: int = 5) -> torch.Tensor:
    """DToP's halting rule. scores [B, K, N] (presence x sigmoid(mask logit)), valid [B, N] (tokens that
    may halt: active, not padding) -> bool [B, N], True = halts now.

    A valid token is a candidate when its confidence max_c score[c, t] exceeds ``threshold``; for every
    class the ``min(k, count)`` most confident candidates predicted as that class stay as context, the
    other candidates halt. Vectorised as a per-class top-k over a [B, K, N] matrix that holds each
    candidate's confidence in the row of its predicted class only (-inf elsewhere).
    """
    num_classes, n = scores.shape[1], scores.shape[2]
    conf, cls = scores.max(dim=1)
    candidate = valid & (conf > threshold)
    own_row = cls.unsqueeze(1) == torch.arange(num_classes, device=scores.device)[:, None]
    ranked = torch.where(own_row & candidate.unsqueeze(1), scores, float("-inf"))
    top = ranked.topk(min(k, n), dim=-1)
    # A class with fewer than k candidates also returns -inf fillers (possibly other classes' tokens);
    # scatter_add counts only real picks so duplicates cannot erase them.
    picks = torch.isfinite(top.values).flatten(1).long()
    keep = torch.zeros_like(conf, dtype=torch.long).scatter_add_(1, top.indices.flatten(1), picks) > 0
    return candidate & ~keep


def forced_halting_mask(scores: torch.Tensor, valid: torch.Tensor, fraction: float) -> torch.Tensor:
    """Speed-study knob, not the method: halt exactly round(fraction x valid tokens) of each image's
    valid tokens, the most confident ones (at least one token stays). Same shapes as ``halting_mask``."""
    conf = torch.where(valid, scores.amax(dim=1), float("-inf"))
    count = valid.sum(1)
    halt_count = torch.minimum((fraction * count).round().long(), count - 1)
    order = conf.argsort(dim=1, descending=True, stable=True)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    return valid & (rank < halt_count[:, None])
