"""Compute budgets: dCTS at most a fixed number of tokens per image (an exact partition, padded to the budget),
and exits that halt an exact fraction, with static shapes and no host read."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from step_lightning.core import ConfigError
from step_lightning.measure.dispatch import DispatchCounter
from step_lightning.models.halting import BudgetHalting, budget_halting_mask, class_keepers
from step_lightning.tokens.budget import budget_size_map, budget_tokens, fewest_tokens
from step_lightning.tokens.layout import cts_size_map, dcts_size_map, layout_from_size_map
from step_lightning.tokens.policy import OraclePolicy
from step_lightning.tokens.tau import WINDOW_SIZES, parse_tau
from tests.data_builders import REALDATA

THRESHOLDS = parse_tau(6899)


def random_scores(b, hp, wp, seed, sizes=WINDOW_SIZES):
    g = torch.Generator().manual_seed(seed)
    return {s: torch.rand(b, hp // s, wp // s, generator=g) for s in sizes if hp // s and wp // s}


def check_partition(size_map: torch.Tensor) -> torch.Tensor:
    """Every cell is covered by exactly one aligned square of its size; returns the token counts."""
    layout = layout_from_size_map(size_map)
    b, hp, wp = size_map.shape
    for i in range(b):
        covered = torch.zeros(hp, wp, dtype=torch.long)
        for t in range(int(layout.num_tokens[i])):
            s = int(layout.token_size[i, t])
            r, c = layout.token_pos[i, t].tolist()
            assert r % s == 0 and c % s == 0
            covered[r : r + s, c : c + s] += 1
            assert (size_map[i, r : r + s, c : c + s] == s).all()
        assert (covered == 1).all()
    return layout.num_tokens


@pytest.mark.parametrize(("grid", "fraction"), [((32, 32), 0.4), ((40, 24), 0.25), ((17, 33), 0.6), ((64, 64), 0.1)])
def test_at_most_the_budget_and_a_partition_of_the_grid(grid, fraction):
    scores = random_scores(3, *grid, seed=grid[0])
    scores = {s: v * torch.tensor([1.0, 0.3, 1.0])[:, None, None] for s, v in scores.items()}  # different content
    tokens = budget_tokens(fraction, grid)
    counts = check_partition(budget_size_map(scores, grid, THRESHOLDS, tokens))
    assert (counts <= tokens).all()
    assert (counts > tokens - 16 * 16).all()  # within one merge of the largest window of the budget


def test_saturated_and_tied_scores_stay_within_the_budget():
    """Tied margins merge together: with every score 1, the 2x2 windows (margin 0.4 over tau) all merge before
    any 4x4 one (margin 0.2), so a budget of 512 gets 256 tokens; the fewest tokens are always reachable."""
    grid = (32, 32)
    scores = {s: torch.ones(2, 32 // s, 32 // s) for s in WINDOW_SIZES}
    scores[16][1] = 0.0  # image 1: its 16x16 windows rank last
    counts = check_partition(budget_size_map(scores, grid, THRESHOLDS, 512))
    assert counts.tolist() == [256, 256]
    fewest = fewest_tokens(grid, WINDOW_SIZES)
    assert fewest == 4 and check_partition(budget_size_map(scores, grid, THRESHOLDS, fewest)).tolist() == [4, 4]


@pytest.mark.skipif(not REALDATA.is_dir(), reason=f"no real samples at {REALDATA}")
def test_oracle_scores_of_real_frames():
    names = sorted((REALDATA / "cityscapes").glob("gtFine/train/*/*_labelTrainIds.png"))[:3]
    labels = torch.stack([torch.from_numpy(np.asarray(Image.open(p))[:1024, :1024].astype(np.int64)) for p in names])
    grid = (64, 64)
    scores = OraclePolicy()(labels, grid)
    for fraction in (0.1, 0.3, 0.6):
        tokens = budget_tokens(fraction, grid)
        counts = check_partition(budget_size_map(scores, grid, THRESHOLDS, tokens))
        assert (counts <= tokens).all()


def test_budget_of_every_patch_is_plain_patches():
    scores = random_scores(2, 16, 24, seed=1)
    assert (budget_size_map(scores, (16, 24), THRESHOLDS, 16 * 24) == 1).all()


def test_an_images_own_dcts_count_reproduces_its_threshold_layout():
    grid = (32, 48)
    scores = random_scores(4, *grid, seed=7)
    threshold_maps = dcts_size_map(scores, grid, THRESHOLDS)
    own = layout_from_size_map(threshold_maps).num_tokens
    for i in range(4):
        single = {s: v[i : i + 1] for s, v in scores.items()}
        assert torch.equal(budget_size_map(single, grid, THRESHOLDS, int(own[i]))[0], threshold_maps[i])


def test_cts_is_the_2x2_case():
    """With 2x2 windows only and a budget of Hp*Wp - 3k tokens, the budget merges CTS's top-k windows."""
    grid, k = (16, 16), 20
    scores = random_scores(3, *grid, seed=3, sizes=(2,))
    budget = budget_size_map(scores, grid, THRESHOLDS, 16 * 16 - 3 * k)
    assert torch.equal(budget, cts_size_map(scores[2], grid, k))


def test_budget_values_are_checked():
    assert budget_tokens(0.4, (32, 32)) == 410 and budget_tokens(300, (32, 32)) == 300
    assert budget_tokens(5000, (32, 32)) == 1024
    for bad in (0, -0.1, True, "x"):
        with pytest.raises(ConfigError, match="budget"):
            budget_tokens(bad, (32, 32))


def test_no_host_read_and_one_graph():
    import torch._dynamo

    grid = (32, 32)
    scores = random_scores(2, *grid, seed=5)
    with DispatchCounter() as counter:
        budget_size_map(scores, grid, THRESHOLDS, 300)
    assert counter.host_reads == []
    torch._dynamo.reset()
    compiled = torch.compile(budget_size_map, fullgraph=True, backend="eager")
    assert torch.equal(compiled(scores, grid, THRESHOLDS, 300), budget_size_map(scores, grid, THRESHOLDS, 300))


# ---------------------------------------------------------------- halting budget


def test_halting_budget_halts_an_exact_fraction_most_confident_first_and_keeps_class_context():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 3, 20, generator=g)
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, 15:] = False
    halt = budget_halting_mask(scores, valid, 0.4, k=2)
    assert halt.sum(1).tolist() == [8, 6]  # round(0.4 x 20), round(0.4 x 15)
    keepers = class_keepers(scores, valid, 2)
    assert not (halt & keepers).any() and not (halt & ~valid).any()
    conf = scores.amax(1)
    for i in range(2):
        others = valid[i] & ~keepers[i] & ~halt[i]
        assert conf[i][halt[i]].min() >= conf[i][others].max()  # the most confident halt first


def test_halting_budget_bounds_survivors_from_shapes():
    rule = BudgetHalting(0.3, keep_top_k=2, num_classes=3)
    g = torch.Generator().manual_seed(1)
    for length in (5, 10, 40):
        for n in range(1, length + 1):
            valid = torch.arange(length)[None] < n
            scores = torch.rand(1, 3, length, generator=g)
            kept = int((valid & ~rule.decide(0, scores, valid)).sum())
            assert kept <= rule.survivors(0, length)
    with pytest.raises(ConfigError, match="halt_budget"):
        BudgetHalting(1.0)


@pytest.mark.parametrize("grid", [(32, 32), (17, 33), (40, 24), (5, 70), (3, 3)])
@pytest.mark.parametrize("sizes", [WINDOW_SIZES, (2, 4, 8), (2,)])
def test_fewest_tokens_is_every_window_merged(grid, sizes):
    scores = {s: torch.ones(1, grid[0] // s, grid[1] // s) for s in sizes}
    merged = layout_from_size_map(dcts_size_map(scores, grid, (-1.0,) * 4)).num_tokens
    assert fewest_tokens(grid, sizes) == int(merged[0])
