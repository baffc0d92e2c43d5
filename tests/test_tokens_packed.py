"""Packed supertoken layouts: the same partition as the padded TokenLayout, one row list for the batch."""

from __future__ import annotations

import pytest
import torch

from step_lightning.tokens.embed import embed_pyramid, feature_index
from step_lightning.tokens.layout import dcts_size_map, layout_from_size_map
from step_lightning.tokens.packed import pack_layout, pyramid_size, token_starts
from step_lightning.tokens.tau import WINDOW_SIZES


def random_size_map(b, hp, wp, seed):
    g = torch.Generator().manual_seed(seed)
    scores = {s: torch.rand(b, hp // s, wp // s, generator=g) for s in WINDOW_SIZES}
    return dcts_size_map(scores, (hp, wp), (0.5, 0.6, 0.6, 0.5))


@pytest.mark.parametrize(("grid", "extra"), [((16, 16), 0), ((17, 33), 5), ((8, 12), 64)])
def test_packed_layout_matches_padded_layout(grid, extra):
    hp, wp = grid
    size_map = random_size_map(3, hp, wp, seed=hp)
    layout = layout_from_size_map(size_map)
    is_start, counts, offset = token_starts(size_map)
    assert torch.equal(counts, layout.num_tokens)
    rows = int(counts.sum()) + extra
    packed = pack_layout(size_map, is_start, counts, offset, rows)
    cu = torch.cat((torch.zeros(1, dtype=torch.long), counts.cumsum(0)))
    for b in range(3):
        n = int(counts[b])
        span = slice(int(cu[b]), int(cu[b + 1]))
        assert torch.equal(packed.row_size[span], layout.token_size[b, :n])
        assert torch.equal(packed.row_pos[span], layout.token_pos[b, :n])
        assert torch.equal(packed.cell_row[b] - cu[b], layout.cell_to_token[b])
    dummies = slice(int(cu[-1]), rows)  # copies of a real row: valid sizes and pyramid entries
    assert (packed.row_size[dummies] >= 1).all() and (packed.row_feature[dummies] >= 0).all()


def test_packed_rows_read_the_same_pyramid_entries_as_the_padded_embedding():
    hp, wp = 9, 20
    size_map = random_size_map(2, hp, wp, seed=3)
    layout = layout_from_size_map(size_map)
    is_start, counts, offset = token_starts(size_map)
    packed = pack_layout(size_map, is_start, counts, offset, int(counts.sum()) + 7)
    proj = torch.nn.Conv2d(3, 4, 16, 16)
    images, pos = torch.randn(2, 3, 16 * hp, 16 * wp), torch.randn(1, 4, hp, wp)
    feats = embed_pyramid(images, (hp, wp), proj, pos)
    assert feats.shape[1] == pyramid_size(hp, wp)
    rows = feats.reshape(-1, 4).index_select(0, packed.row_feature)
    total = int(counts.sum())
    row, col = layout.token_pos.unbind(-1)
    index = feature_index(layout.token_size, row, col, (hp, wp))  # the padded layout's own pyramid entries
    padded = feats.gather(1, index[..., None].expand(-1, -1, 4))
    torch.testing.assert_close(rows[:total], padded[layout.valid], rtol=0, atol=0)


def test_padded_rows_hold_each_image_from_its_own_offset():
    """``stride``: image b's tokens from row b * stride on, the same tokens as the padded layout's [b, :n]."""
    hp, wp = 9, 20
    size_map = random_size_map(3, hp, wp, seed=4)
    layout = layout_from_size_map(size_map)
    is_start, counts, offset = token_starts(size_map)
    stride = int(counts.max()) + 2
    padded = pack_layout(size_map, is_start, counts, offset, 3 * stride, stride=stride)
    for b in range(3):
        n = int(counts[b])
        span = slice(b * stride, b * stride + n)
        assert torch.equal(padded.row_size[span], layout.token_size[b, :n])
        assert torch.equal(padded.row_pos[span], layout.token_pos[b, :n])
        assert torch.equal(padded.cell_row[b] - b * stride, layout.cell_to_token[b])
