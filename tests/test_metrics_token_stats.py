import json

import pytest
import torch

from step_lightning.metrics import TokenStats
from step_lightning.tokens.layout import identity_layout, layout_from_size_map


def layout_with(sizes_at):
    """8x8 grid with the given (row, col, size) squares merged, the rest 1x1."""
    size_map = torch.ones(1, 8, 8, dtype=torch.long)
    for r, c, s in sizes_at:
        size_map[0, r : r + s, c : c + s] = s
    return layout_from_size_map(size_map)


def test_stats_aggregate_per_image_counts():
    stats = TokenStats()
    stats.update(identity_layout(2, 8, 8))  # 64 tokens each
    stats.update(layout_with([(0, 0, 8)]))  # 1 token
    stats.update(layout_with([(0, 0, 4), (4, 4, 2), (6, 6, 2)]))  # 1 + 2 + 40 = 43 tokens
    out = stats.compute()
    json.dumps(out)
    assert out["images"] == 4
    assert out["size_1"] == {"mean": pytest.approx((64 + 64 + 0 + 40) / 4), "max": 64, "min": 0}
    assert out["size_2"] == {"mean": 0.5, "max": 2, "min": 0}
    assert out["size_4"]["mean"] == 0.25 and out["size_8"]["max"] == 1 and out["size_16"]["max"] == 0
    assert out["total"] == {"mean": pytest.approx(172 / 4), "max": 64, "min": 1}
    assert out["grid_cells_mean"] == 64
    assert out["reduction"] == pytest.approx(64 / 43)
    assert out["reduction_per_image"]["max"] == 64 and out["reduction_per_image"]["min"] == 1
    assert torch.equal(torch.cat(stats.counts).sum(1), torch.tensor([64, 64, 1, 43]))


def test_stats_reset_and_mixed_grids():
    stats = TokenStats()
    stats.update(identity_layout(1, 8, 8))
    stats.reset()
    stats.update(identity_layout(1, 4, 4))
    stats.update(identity_layout(1, 2, 8))
    out = stats.compute()
    assert out["images"] == 2 and out["reduction"] == 1.0 and out["grid_cells_mean"] == 16
