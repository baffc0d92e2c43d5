import pytest
import torch

from step_lightning.tokens.layout import (
    TOKEN_SIZES,
    cts_k_for_grid,
    cts_layout,
    dcts_layout,
    identity_layout,
    layout_from_size_map,
    unshare,
)
from step_lightning.tokens.tau import WINDOW_SIZES, parse_tau

PAPER_TAUS = (6999, 6899, 4999, 4899, 4799, 4699, 4599, 4499)
GRIDS = [(8, 8), (20, 13), (13, 20), (17, 33), (3, 5), (1, 1), (16, 16)]


def random_scores(b, hp, wp, seed, ceil=False, discrete=False):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for s in WINDOW_SIZES:
        h, w = (-(-hp // s), -(-wp // s)) if ceil else (hp // s, wp // s)
        x = torch.rand(b, h, w, generator=g)
        out[s] = (x * 10).round() / 10 if discrete else x  # discrete: scores equal to tau occur
    return out


def naive_dcts(scores, b, hp, wp, thresholds):
    """Literal reading of the rule, one window at a time: sorted (row, col, size) tokens."""
    covered = torch.zeros(hp, wp, dtype=torch.bool)
    tokens = []
    for s, tau in sorted(zip(WINDOW_SIZES, thresholds, strict=True), reverse=True):
        for i in range(hp // s):
            for j in range(wp // s):
                window = covered[i * s : (i + 1) * s, j * s : (j + 1) * s]
                # Compared as a tensor so the test uses the same dtype semantics as the code.
                if bool(scores[s][b, i, j] > tau) and not window.any():
                    window[:] = True
                    tokens.append((i * s, j * s, s))
    tokens += [(r, c, 1) for r in range(hp) for c in range(wp) if not covered[r, c]]
    return sorted(tokens)


def tokens_of(layout, b):
    n = int(layout.num_tokens[b])
    return [(*layout.token_pos[b, t].tolist(), int(layout.token_size[b, t])) for t in range(n)]


def check_partition(layout):
    """Every cell covered exactly once by an aligned in-grid square; cell_to_token consistent;
    raster order; padding only at the end; N = max count."""
    hp, wp = layout.grid
    b, n = layout.valid.shape
    assert layout.cell_to_token.shape == (b, hp * wp)
    assert layout.token_pos.shape == (b, n, 2) and layout.token_size.shape == (b, n)
    assert n == int(layout.num_tokens.max())
    for i in range(b):
        count = int(layout.num_tokens[i])
        assert layout.valid[i, :count].all() and not layout.valid[i, count:].any()
        assert (layout.token_size[i, count:] == 0).all()
        painted = torch.full((hp, wp), -1, dtype=torch.long)
        keys = []
        for t, (r, c, s) in enumerate(tokens_of(layout, i)):
            assert s in TOKEN_SIZES and r % s == 0 and c % s == 0 and r + s <= hp and c + s <= wp
            assert (painted[r : r + s, c : c + s] == -1).all(), "overlap"
            painted[r : r + s, c : c + s] = t
            keys.append(r * wp + c)
        assert (painted >= 0).all(), "gap"
        assert keys == sorted(keys), "not raster order"
        assert torch.equal(layout.cell_to_token[i], painted.flatten())
    assert torch.equal(layout.counts_per_size.sum(1), layout.num_tokens)


@pytest.mark.parametrize("tau", PAPER_TAUS)
@pytest.mark.parametrize("grid", GRIDS)
def test_dcts_partitions_grid_and_matches_literal_rule(tau, grid):
    hp, wp = grid
    thresholds = parse_tau(tau)
    for seed, (ceil, discrete) in enumerate([(False, False), (True, False), (False, True)]):
        scores = random_scores(3, hp, wp, seed, ceil=ceil, discrete=discrete)
        layout = dcts_layout(scores, grid, thresholds)
        check_partition(layout)
        for b in range(3):
            assert tokens_of(layout, b) == naive_dcts(scores, b, hp, wp, thresholds)


def test_border_windows_never_merge():
    # 20x13 grid, every window scores 1: 8x8 at rows 0 and 8 (col 0 only), 4x4 windows in the
    # remaining whole-window area, leftover column 12 stays 1x1.
    layout = dcts_layout(
        random_scores(1, 20, 13, 0, ceil=True) | {s: torch.ones(1, -(-20 // s), -(-13 // s)) for s in WINDOW_SIZES},
        (20, 13),
        parse_tau(4499),
    )
    check_partition(layout)
    expected = sorted(
        [(0, 0, 8), (8, 0, 8)]
        + [(r, 8, 4) for r in (0, 4, 8, 12)]
        + [(16, c, 4) for c in (0, 4, 8)]
        + [(r, 12, 1) for r in range(20)]
    )
    assert tokens_of(layout, 0) == expected
    assert layout.counts_per_size.tolist() == [[20, 0, 7, 2, 0]]


def test_threshold_is_strict_and_missing_sizes_never_merge():
    hp = wp = 16
    scores = {16: torch.full((1, 1, 1), 0.9), 2: torch.full((1, 8, 8), 0.4)}
    layout = dcts_layout(scores, (hp, wp), (0.4, 0.0, 0.0, 0.9))
    assert layout.counts_per_size.tolist() == [[256, 0, 0, 0, 0]]
    layout = dcts_layout(scores, (hp, wp), (0.3, 0.0, 0.0, 0.95))
    assert layout.counts_per_size.tolist() == [[0, 64, 0, 0, 0]]


def test_inner_windows_of_an_accepted_window_are_skipped():
    # A 16x16 window accepted; all inner 8/4/2 windows score 1 but must not split it.
    scores = {s: torch.ones(1, 32 // s, 32 // s) for s in WINDOW_SIZES}
    scores[16][0, 0, 1] = 0.0
    scores[16][0, 1, 0] = 0.0
    scores[16][0, 1, 1] = 0.0
    layout = dcts_layout(scores, (32, 32), parse_tau(6899))
    check_partition(layout)
    assert layout.counts_per_size.tolist() == [[0, 0, 0, 12, 1]]


@pytest.mark.parametrize("grid", [(20, 13), (32, 32), (17, 33)])
def test_lowering_a_threshold_never_adds_tokens(grid):
    """Lowering any tau coarsens the partition: each old token lies inside a new one."""
    hp, wp = grid
    for seed in range(4):
        scores = random_scores(2, hp, wp, seed)
        for tau in PAPER_TAUS:
            base = list(parse_tau(tau))
            old = dcts_layout(scores, grid, base)
            for i in range(4):
                for lower in (0.0, base[i] / 2, base[i] - 0.1):
                    new_t = base.copy()
                    new_t[i] = max(lower, 0.0)
                    new = dcts_layout(scores, grid, new_t)
                    assert (new.num_tokens <= old.num_tokens).all()
                    # Coarsening: the new token of an old token's top-left cell also covers its other corner.
                    for b in range(2):
                        r, c = old.token_pos[b, : int(old.num_tokens[b])].unbind(-1)
                        s = old.token_size[b, : int(old.num_tokens[b])]
                        first = new.cell_to_token[b, r * wp + c]
                        last = new.cell_to_token[b, (r + s - 1) * wp + (c + s - 1)]
                        assert torch.equal(first, last)


def test_score_map_shape_is_checked():
    with pytest.raises(ValueError, match="score map for 2x2"):
        dcts_layout({2: torch.rand(1, 5, 5)}, (8, 8), parse_tau(6899))


@pytest.mark.parametrize("grid", [(32, 32), (20, 13), (64, 64), (3, 5)])
def test_cts_keeps_exactly_n_minus_3k_tokens(grid):
    hp, wp = grid
    k = cts_k_for_grid(hp, wp)
    score2 = torch.rand(4, hp // 2, wp // 2, generator=torch.Generator().manual_seed(1))
    layout = cts_layout(score2, grid, k)
    check_partition(layout)
    assert layout.valid.all() and (layout.num_tokens == hp * wp - 3 * k).all()
    assert (layout.counts_per_size[:, 1] == k).all()
    # The merged windows are the top-k by score.
    for b in range(4):
        merged = sorted((r // 2) * (wp // 2) + c // 2 for r, c, s in tokens_of(layout, b) if s == 2)
        assert merged == sorted(score2[b].flatten().topk(k).indices.tolist())


def test_cts_k_scaling():
    assert cts_k_for_grid(32, 32) == 103  # 512x512: 1024 - 309 = 715 tokens, as in CTS
    assert cts_k_for_grid(64, 64) == 412  # 1024x1024: the 412 merged patches quoted by the paper
    assert cts_k_for_grid(20, 13) == 26
    assert cts_k_for_grid(3, 3) == 1  # capped by the number of 2x2 windows
    with pytest.raises(ValueError):
        cts_layout(torch.rand(1, 2, 2), (4, 4), 5)


def test_identity_layout_and_unshare():
    layout = identity_layout(2, 5, 7)
    check_partition(layout)
    assert layout.counts_per_size.tolist() == [[35, 0, 0, 0, 0]] * 2
    x = torch.randn(2, 3, 35)
    assert torch.equal(unshare(x, layout), x)
    assert torch.equal(unshare(x.transpose(1, 2), layout, dim=1), x.transpose(1, 2))
    # The identity size map goes through the general builder to the same layout.
    built = layout_from_size_map(torch.ones(2, 5, 7, dtype=torch.long))
    for name in ("cell_to_token", "token_size", "token_pos", "valid"):
        assert torch.equal(getattr(built, name), getattr(layout, name))


def test_unshare_copies_each_token_to_its_cells():
    hp, wp = 20, 13
    layout = dcts_layout(random_scores(2, hp, wp, 3), (hp, wp), parse_tau(4499))
    n = layout.valid.shape[1]
    values = torch.arange(n).repeat(2, 4, 1).float()  # [B, 4, N]: value = token index
    cells = unshare(values, layout)
    assert cells.shape == (2, 4, hp * wp)
    assert torch.equal(cells[:, 0].long(), layout.cell_to_token)
    with pytest.raises(ValueError):
        unshare(values, layout, dim=0)
