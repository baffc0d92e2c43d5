"""The canvas: one column of mask logits per token, [B, K, N], shared by the heads of an early-exit model.

Each head overwrites the columns of the tokens it saw (those still active); a halted token keeps the
logits of the head it halted at, so the final prediction covers every token. Training paints by mask
(static shapes); inference paints by index, into a canvas with one extra dump column for padding slots.
"""

from __future__ import annotations

import torch


def paint_active(canvas: torch.Tensor | None, logits: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Training: ``logits`` [B, K, N] replace the canvas columns of ``active`` [B, N] tokens."""
    return logits if canvas is None else torch.where(active[:, None], logits, canvas)


def paint_slots(canvas: torch.Tensor | None, logits: torch.Tensor, slot: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Inference: ``logits`` [B, K, L] of the surviving tokens go to their canvas columns ``slot`` [B, L]
    (column ``num_tokens`` is the dump for padding slots). Returns the [B, K, num_tokens + 1] canvas."""
    if canvas is None:
        canvas = logits.new_zeros(logits.shape[0], logits.shape[1], num_tokens + 1)
    return canvas.scatter(2, slot[:, None].expand_as(logits), logits)
