"""Dataset-level validation metrics, all torchmetrics ``Metric``s (synced exactly under DDP).

``SegMetrics``: mIoU / aAcc / per-class IoU (mmseg's definition) from a confusion matrix.
``TokenStats``: tokens per image and per supertoken size (paper Table 2).
``ExitStats``: tokens halted per exit head (paper Table 7).
"""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.classification import MulticlassConfusionMatrix
from torchmetrics.utilities import dim_zero_cat

from step_lightning.tokens.layout import TOKEN_SIZES, TokenLayout


class SegMetrics(MulticlassConfusionMatrix):
    """Accumulates the confusion matrix over a dataset (synced under DDP by torchmetrics).

    mIoU = mean over classes with a non-empty union of I_c / U_c (nanmean, as mmseg), ignore pixels
    excluded; aAcc = correct / labelled pixels. torchmetrics' MulticlassJaccardIndex (1.9) skips such classes in
    its macro average too but reports them as IoU 0 per class; this wrapper gives NaN there, and aAcc.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        super().__init__(num_classes=num_classes, ignore_index=ignore_index, normalize="none", validate_args=False)

    def compute(self) -> dict[str, torch.Tensor]:
        cm = self.confmat.double()  # rows: target, cols: prediction
        intersection = cm.diagonal()
        union = cm.sum(0) + cm.sum(1) - intersection
        iou = torch.where(union > 0, intersection / union.clamp(min=1), torch.full_like(union, float("nan")))
        return {
            "mIoU": 100 * iou.nanmean(),
            "aAcc": 100 * intersection.sum() / cm.sum().clamp(min=1),
            "IoU": 100 * iou,
        }


class TokenStats(Metric):
    """``update(layout)`` per batch; ``compute()`` ->

    {"images": int,
     "size_1": {"mean", "max", "min"}, ..., "size_16": {...},   tokens of that size per image
     "total":  {"mean", "max", "min"},                          tokens per image
     "grid_cells_mean": float,                                  Hp*Wp per image, averaged
     "reduction": mean grid cells / mean tokens,
     "reduction_per_image": {"mean", "max", "min"}}             Hp*Wp / tokens of each image
    All values are Python ints/floats (JSON-ready). The raw counts stay available as
    ``dim_zero_cat(self.counts)`` int64 [images, 5] (columns 1, 2, 4, 8, 16) and ``self.cells``.
    """

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("counts", default=[], dist_reduce_fx="cat")
        self.add_state("cells", default=[], dist_reduce_fx="cat")

    def update(self, layout: TokenLayout) -> None:
        counts = layout.counts_per_size
        self.counts.append(counts)
        self.cells.append(torch.full((counts.shape[0],), layout.grid[0] * layout.grid[1], device=counts.device))

    def compute(self) -> dict:
        counts = dim_zero_cat(self.counts).double()
        cells = dim_zero_cat(self.cells).double()
        total = counts.sum(1)

        def summary(x: torch.Tensor) -> dict[str, float]:
            return {"mean": x.mean().item(), "max": x.max().item(), "min": x.min().item()}

        out: dict = {"images": int(counts.shape[0])}
        for i, s in enumerate(TOKEN_SIZES):
            out[f"size_{s}"] = summary(counts[:, i])
        out["total"] = summary(total)
        out["grid_cells_mean"] = cells.mean().item()
        out["reduction"] = (cells.mean() / total.mean()).item()
        out["reduction_per_image"] = summary(cells / total)
        return out

    def per_image_tokens(self) -> list[int]:
        """Tokens of every model forward seen, in update order, gathered over processes."""
        with self.sync_context():
            return [int(t) for t in dim_zero_cat(self.counts).sum(1).tolist()]


class ExitStats(Metric):
    """Tokens halted per exit head over a dataset (paper Table 7).

    ``update(halted [B, E], tokens [B])`` with ``extras["halted"]`` and ``SegmenterOutput.tokens``;
    ``compute()`` -> ``{"per_head": [{"halted_mean", "halted_max", "halted_min"}, ...] (one per exit),
    "halted_fraction": halted tokens / all tokens}`` as Python floats. Raw per-image states are
    concatenated across processes under DDP, so the result is exact.
    """

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("halted", default=[], dist_reduce_fx="cat")
        self.add_state("tokens", default=[], dist_reduce_fx="cat")

    def update(self, halted: torch.Tensor, tokens: torch.Tensor) -> None:
        self.halted.append(halted.long())
        self.tokens.append(tokens.long())

    def compute(self) -> dict:
        halted = dim_zero_cat(self.halted).double()
        tokens = dim_zero_cat(self.tokens).double()
        per_head = [
            {"halted_mean": h.mean().item(), "halted_max": h.max().item(), "halted_min": h.min().item()}
            for h in halted.unbind(1)
        ]
        return {"per_head": per_head, "halted_fraction": (halted.sum() / tokens.sum().clamp(min=1)).item()}

    def per_image_active(self) -> list[list[int]]:
        """Tokens still active after each exit, per model forward, in update order, gathered over processes."""
        with self.sync_context():
            tokens, halted = dim_zero_cat(self.tokens), dim_zero_cat(self.halted)
            return (tokens[:, None] - halted.cumsum(1)).tolist()
