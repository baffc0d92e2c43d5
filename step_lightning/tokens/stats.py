"""Token statistics over a dataset (paper Table 2): per-size token counts, totals, reduction factor.

``TokenStats`` is a torchmetrics ``Metric`` whose states are the raw per-image counts (list states,
concatenated across processes under DDP), so ``compute()`` is exact after a distributed sync and
works the same on one device.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from step_lightning.tokens.layout import TOKEN_SIZES, TokenLayout


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
