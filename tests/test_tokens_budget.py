"""Compute budgets. dCTS: the budget's token count, the smallest reachable count, and the budget rule's layouts
(exact counts for random, oracle and saturated scores; a valid partition; plain patches, dCTS and CTS as special
cases; the floor; no host read, one static program, one graph). Exits: the halting budget (see also
tests/test_models_halting.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from step_lightning.core import ConfigError
from step_lightning.data.io import read_label
from step_lightning.measure.dispatch import DispatchCounter
from step_lightning.models.halting import BudgetHalting, budget_halting_mask, class_keepers
from step_lightning.tokens.budget import budget_size_map, budget_tokens, check_budget, fewest_tokens
from step_lightning.tokens.layout import cts_k_for_grid, cts_size_map, dcts_layout, dcts_size_map, layout_from_size_map
from step_lightning.tokens.policy import OraclePolicy
from step_lightning.tokens.tau import WINDOW_SIZES, parse_tau
from tests.data_builders import REALDATA
from tests.test_tokens_layout import PAPER_TAUS, check_partition, random_scores, tokens_of

GRIDS = [(32, 32), (40, 24), (24, 40), (20, 13), (17, 33), (3, 5), (1, 1), (64, 48)]
ZERO_TAU = (0.0, 0.0, 0.0, 0.0)


def budgets(grid, sizes=WINDOW_SIZES, steps=13):
    """The reachable range's ends and ``steps`` budgets in between, all three residues mod 3 included."""
    lowest, plain = fewest_tokens(grid, sizes), grid[0] * grid[1]
    inner = {lowest + (plain - lowest) * i // steps for i in range(steps + 1)}
    return sorted(inner | {lowest, plain, max(lowest, plain - 1), max(lowest, plain - 2)})


def expected_count(grid, budget):
    plain = grid[0] * grid[1]
    return budget - (budget - plain) % 3


def checked_budget(scores, grid, thresholds, budget, floor=False):
    """The size map is an aligned partition; without the floor it has exactly the expected count and the layout
    padded to the budget has ``budget`` slots. Returns (size_map, token counts)."""
    size_map = budget_size_map(scores, grid, thresholds, budget, floor=floor)
    layout = layout_from_size_map(size_map)
    check_partition(layout)
    counts = layout.num_tokens
    if not floor:
        assert (counts == expected_count(grid, budget)).all()
        padded = layout_from_size_map(size_map, num_slots=budget)
        assert padded.valid.shape[1] == budget and torch.equal(padded.num_tokens, counts)
    return size_map, counts


# ---------------------------------------------------------------- token counts and the reachable range


def test_budget_values_are_checked():
    assert budget_tokens(0.4, (32, 32)) == 410 and budget_tokens(300, (32, 32)) == 300
    assert budget_tokens(1.0, (40, 24)) == 960 and budget_tokens(5000, (32, 32)) == 1024
    for bad in (0, -0.1, True, "x"):
        with pytest.raises(ConfigError, match="budget"):
            budget_tokens(bad, (32, 32))


def test_a_budget_below_the_fewest_tokens_is_refused_with_one_line():
    check_budget(4, (32, 32), WINDOW_SIZES)
    with pytest.raises(ConfigError, match=r"below the 4 .* >= 0\.004") as err:
        check_budget(3, (32, 32), WINDOW_SIZES)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="below the 256"):
        check_budget(255, (32, 32), (2,))


@pytest.mark.parametrize("grid", GRIDS + [(5, 70), (3, 3)])
@pytest.mark.parametrize("sizes", [WINDOW_SIZES, (2, 4, 8), (2,)])
def test_fewest_tokens_is_every_window_merged(grid, sizes):
    hp, wp = grid
    everything = {s: torch.ones(1, hp // s, wp // s) for s in sizes}
    assert fewest_tokens(grid, sizes) == int(dcts_layout(everything, grid, ZERO_TAU).num_tokens)


def test_fewest_tokens_by_hand():
    assert fewest_tokens((32, 32), WINDOW_SIZES) == 4
    assert fewest_tokens((40, 24), WINDOW_SIZES) == 2 + 7  # two 16x16, seven 8x8
    assert fewest_tokens((20, 13), WINDOW_SIZES) == 20 + 7 + 2  # as test_border_windows_never_merge
    assert fewest_tokens((32, 32), ()) == 1024


# ---------------------------------------------------------------- exact counts and partitions


@pytest.mark.parametrize("grid", GRIDS)
def test_random_scores_give_exactly_the_budget(grid):
    hp, wp = grid
    for seed, (ceil, discrete) in enumerate([(False, False), (True, False), (False, True)]):
        scores = random_scores(4, hp, wp, seed, ceil=ceil, discrete=discrete)
        for budget in budgets(grid):
            checked_budget(scores, grid, parse_tau(PAPER_TAUS[seed]), budget)


@pytest.mark.parametrize("grid", [(32, 32), (40, 24), (17, 33)])
@pytest.mark.parametrize("sizes", [(2,), (2, 4), (2, 4, 8)])
def test_fewer_window_sizes_still_give_exactly_the_budget(grid, sizes):
    hp, wp = grid
    scores = {s: v for s, v in random_scores(3, hp, wp, 5).items() if s in sizes}
    for budget in budgets(grid, sizes, steps=11):
        size_map, _ = checked_budget(scores, grid, parse_tau(6899), budget)
        assert set(size_map.unique().tolist()) <= {1, *sizes}


@pytest.mark.parametrize("grid", [(32, 32), (40, 24), (20, 13)])
def test_saturated_scores_give_exactly_the_budget(grid):
    """All-one, all-zero and 0/1 scores: ties everywhere, keys all equal within a size."""
    hp, wp = grid
    g = torch.Generator().manual_seed(3)
    shapes = {s: (hp // s, wp // s) for s in WINDOW_SIZES}
    batches = [
        {s: torch.ones(2, *shape) for s, shape in shapes.items()},
        {s: torch.zeros(2, *shape) for s, shape in shapes.items()},
        {s: torch.randint(0, 2, (2, *shape), generator=g).float() for s, shape in shapes.items()},
    ]
    for scores in batches:
        for tau in (ZERO_TAU, parse_tau(6899), parse_tau(9999)):
            for budget in budgets(grid, steps=7):
                checked_budget(scores, grid, tau, budget)


def real_labels(size: tuple[int, int]) -> torch.Tensor:
    """ADE20K, Cityscapes and COCO-Stuff label maps resized (nearest) to ``size``, plus one uniform and one
    noise map: very different homogeneity in one batch. ADE20K's 0 ("other") is ignored, as its loader does."""
    if not REALDATA.is_dir():
        pytest.skip(f"no real samples at {REALDATA}")
    ade = sorted((REALDATA / "ade20k/ADEChallengeData2016/annotations/validation").glob("*.png"))
    city = sorted((REALDATA / "cityscapes/gtFine/train/aachen").glob("*labelTrainIds.png"))[:2]
    coco = sorted((REALDATA / "cocostuff/stuffthingmaps_trainval2017/val2017").glob("*.png"))[:2]
    maps = []
    for path in ade + city + coco:
        label = torch.from_numpy(read_label(path).astype("int64"))
        if path in ade:
            label = torch.where(label == 0, 255, label - 1)
        maps.append(F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long())
    maps.append(torch.full(size, 3))
    maps.append(torch.randint(0, 5, size, generator=torch.Generator().manual_seed(0)))
    assert len(maps) == 9
    return torch.stack(maps)


@pytest.mark.parametrize("size", [(512, 512), (640, 384), (256, 208)])
def test_oracle_scores_on_real_labels_give_exactly_the_budget(size):
    grid = (size[0] // 16, size[1] // 16)
    scores = OraclePolicy()(real_labels(size), grid)
    thresholds = parse_tau(6899)
    dcts_counts = layout_from_size_map(dcts_size_map(scores, grid, thresholds)).num_tokens
    assert len(set(dcts_counts.tolist())) >= 6  # the batch's content differs widely
    for budget in budgets(grid, steps=17):
        checked_budget(scores, grid, thresholds, budget)


@pytest.mark.parametrize("size", [(512, 512), (640, 384)])
def test_oracle_budget_at_the_dcts_count_reproduces_dcts(size):
    grid = (size[0] // 16, size[1] // 16)
    scores = OraclePolicy()(real_labels(size), grid)
    for tau in (6899, 4499):
        dcts = dcts_size_map(scores, grid, parse_tau(tau))
        for i, count in enumerate(layout_from_size_map(dcts).num_tokens.tolist()):
            one = {s: v[i : i + 1] for s, v in scores.items()}
            size_map = budget_size_map(one, grid, parse_tau(tau), count)
            assert torch.equal(size_map[0], dcts[i])


# ---------------------------------------------------------------- special cases: plain patches, dCTS, CTS


@pytest.mark.parametrize("grid", GRIDS)
def test_full_budget_is_plain_patches(grid):
    hp, wp = grid
    for scores in (random_scores(3, hp, wp, 1), {s: torch.ones(3, hp // s, wp // s) for s in WINDOW_SIZES}):
        assert (budget_size_map(scores, grid, ZERO_TAU, budget_tokens(1.0, grid)) == 1).all()


@pytest.mark.parametrize("grid", [(32, 32), (40, 24), (20, 13), (17, 33)])
@pytest.mark.parametrize("tau", PAPER_TAUS)
def test_budget_at_the_dcts_count_reproduces_dcts(grid, tau):
    """Any scores: the key (margin above the size's threshold) ranks every above-threshold window first; with
    discrete scores some equal their threshold and must not merge."""
    hp, wp = grid
    for seed, discrete in enumerate([False, True]):
        scores = random_scores(3, hp, wp, seed, discrete=discrete)
        layout = dcts_layout(scores, grid, parse_tau(tau))
        for i in range(3):
            one = {s: v[i : i + 1] for s, v in scores.items()}
            size_map = budget_size_map(one, grid, parse_tau(tau), int(layout.num_tokens[i]))
            assert tokens_of(layout_from_size_map(size_map), 0) == tokens_of(layout, i)


@pytest.mark.parametrize("grid", [(32, 32), (64, 64), (20, 13), (3, 5)])
def test_two_by_two_windows_only_is_cts(grid):
    hp, wp = grid
    score2 = torch.rand(4, hp // 2, wp // 2, generator=torch.Generator().manual_seed(2))
    for k in {cts_k_for_grid(hp, wp), 0, 1, (hp // 2) * (wp // 2)}:
        size_map = budget_size_map({2: score2}, grid, ZERO_TAU, hp * wp - 3 * k)
        assert torch.equal(size_map, cts_size_map(score2, grid, k))


# ---------------------------------------------------------------- the ranking and the fill, by hand


def test_windows_of_all_sizes_compete_by_margin():
    """8x8 grid. Margins: the 8x8 window -0.5; the 4x4 windows +0.4 (top left), +0.1 (bottom right), 0 (the
    other two, top right first); the 2x2 window at cell (0, 4) +0.3, the other 2x2 windows -0.3."""
    scores = {8: torch.full((1, 1, 1), 0.4), 4: torch.full((1, 2, 2), 0.5), 2: torch.full((1, 4, 4), 0.1)}
    scores[4][0, 0, 0], scores[4][0, 1, 1] = 0.9, 0.6
    scores[2][0, 0, 2] = 0.7
    tau = (0.4, 0.5, 0.9, 0.9)
    layout = lambda budget: sorted(t for t in tokens_of(layout_from_size_map(  # noqa: E731
        budget_size_map(scores, (8, 8), tau, budget)), 0) if t[2] > 1)
    assert layout(64 - 15) == [(0, 0, 4)]
    assert layout(64 - 18) == [(0, 0, 4), (0, 4, 2)]  # the 2x2 (+0.3) before the second 4x4 (+0.1)
    assert layout(64 - 33) == [(0, 0, 4), (0, 4, 2), (4, 4, 4)]
    # The top right 4x4 absorbs the 2x2 merged before it: it saves 15 - 3.
    assert layout(64 - 45) == [(0, 0, 4), (0, 4, 4), (4, 4, 4)]
    # 64 - 21: the bottom right 4x4 would overshoot (46 -> 31); the best free 2x2 closes the gap (all -0.3: the
    # first in raster order).
    assert layout(64 - 21) == [(0, 0, 4), (0, 4, 2), (0, 6, 2)]
    assert layout(64 - 63) == [(0, 0, 8)]


def test_fill_uses_windows_whose_quarters_are_tokens():
    """4x4 grid, the 4x4 window ranks first: it alone saves 15. Budgets 13 and 10 are reached with 2x2 windows
    (best first), 4 with the four 2x2 windows, 1 with the 4x4; 11 (not 1 mod 3 from 16) gets one padding token."""
    scores = {2: torch.tensor([[[0.3, 0.1], [0.2, 0.4]]]), 4: torch.full((1, 1, 1), 0.9)}
    def merged(budget):
        layout = layout_from_size_map(budget_size_map(scores, (4, 4), ZERO_TAU, budget))
        return sorted(t for t in tokens_of(layout, 0) if t[2] > 1), int(layout.num_tokens[0])
    assert merged(13) == ([(2, 2, 2)], 13)
    assert merged(10) == ([(0, 0, 2), (2, 2, 2)], 10)
    assert merged(11) == ([(0, 0, 2), (2, 2, 2)], 10)
    assert merged(4) == ([(0, 0, 2), (0, 2, 2), (2, 0, 2), (2, 2, 2)], 4)
    assert merged(1) == ([(0, 0, 4)], 1)


# ---------------------------------------------------------------- floor: nothing below its threshold merges


@pytest.mark.parametrize("grid", [(32, 32), (40, 24), (20, 13)])
def test_floor_merges_only_windows_above_their_thresholds(grid):
    hp, wp = grid
    thresholds = parse_tau(6899)
    scores = random_scores(4, hp, wp, 7)
    dcts_counts = layout_from_size_map(dcts_size_map(scores, grid, thresholds)).num_tokens
    for budget in budgets(grid, steps=13):
        size_map, counts = checked_budget(scores, grid, thresholds, budget, floor=True)
        assert (counts >= dcts_counts).all()
        assert (counts <= budget)[dcts_counts <= budget].all()
        assert (counts == dcts_counts)[dcts_counts >= budget].all()
        layout = layout_from_size_map(size_map)
        for i in range(4):
            for r, c, s in tokens_of(layout, i):
                if s > 1:
                    assert scores[s][i, r // s, c // s] > thresholds[WINDOW_SIZES.index(s)]


def test_floor_merges_the_overshooting_window_when_the_fill_cannot_close_the_gap():
    """The 4x4 window is the only one above its threshold: budget 10 cannot be met with 2x2 windows, so the
    4x4 merges (1 token, 9 padding)."""
    scores = {2: torch.full((1, 2, 2), 0.1), 4: torch.full((1, 1, 1), 0.9)}
    assert (budget_size_map(scores, (4, 4), (0.5, 0.5, 0.5, 0.5), 10, floor=True) == 4).all()
    size_map = budget_size_map(scores, (4, 4), (0.5, 0.5, 0.5, 0.5), 10)
    assert layout_from_size_map(size_map).num_tokens.tolist() == [10]


# ---------------------------------------------------------------- bad arguments


def test_bad_arguments_are_refused():
    scores = random_scores(1, 8, 8, 0)
    with pytest.raises(ValueError, match="sizes 2, 4"):
        budget_size_map({4: scores[4], 8: scores[8]}, (8, 8), ZERO_TAU, 40)
    with pytest.raises(ValueError, match=r"outside \[1, 64\]"):
        budget_size_map(scores, (8, 8), ZERO_TAU, 65)
    with pytest.raises(ValueError, match="thresholds"):
        budget_size_map(scores, (8, 8), (0.5,), 40)


# ---------------------------------------------------------------- static: no host read, one program, one graph


def test_no_host_read_and_one_program_for_different_content():
    grid = (40, 24)
    sequences = set()
    for seed in range(3):
        scores = random_scores(4, *grid, seed)
        if seed == 2:
            scores = {s: torch.ones_like(v) for s, v in scores.items()}
        for floor in (False, True):
            with DispatchCounter(record=True) as counter:
                budget_size_map(scores, grid, parse_tau(6899), 500, floor=floor)
            assert counter.host_reads == []
            if not floor:
                sequences.add(tuple(counter.sequence))
    assert len(sequences) == 1


@pytest.mark.parametrize("floor", [False, True])
def test_traces_as_one_graph(floor):
    grid = (20, 13)
    scores = random_scores(2, *grid, 4)
    compiled = torch.compile(budget_size_map, fullgraph=True, backend="eager")
    for budget in (200, 101):
        expected = budget_size_map(scores, grid, parse_tau(6899), budget, floor=floor)
        got = compiled(scores, grid, parse_tau(6899), budget, floor=floor)
        assert torch.equal(got, expected)


def test_tied_scores_still_give_exactly_the_budget():
    """Every score 1: all 2x2 windows tie (margin 0.4 over tau), all 4x4 windows too (0.2); the fill still ends
    at 512 - (512 - 1024) % 3 = 511 tokens for a budget of 512. Image 1's 16x16 windows rank last."""
    grid = (32, 32)
    scores = {s: torch.ones(2, 32 // s, 32 // s) for s in WINDOW_SIZES}
    scores[16][1] = 0.0
    _, counts = checked_budget(scores, grid, parse_tau(6899), 512)
    assert counts.tolist() == [511, 511]
    _, counts = checked_budget(scores, grid, parse_tau(6899), fewest_tokens(grid, WINDOW_SIZES))
    assert counts.tolist() == [4, 4]


def test_oracle_scores_of_native_real_frames():
    """Cityscapes frames at native resolution (a 1024x1024 crop, 64x64 patches)."""
    if not REALDATA.is_dir():
        pytest.skip(f"no real samples at {REALDATA}")
    names = sorted((REALDATA / "cityscapes").glob("gtFine/train/*/*_labelTrainIds.png"))[:3]
    labels = torch.stack([torch.from_numpy(read_label(p)[:1024, :1024].astype("int64")) for p in names])
    grid = (64, 64)
    scores = OraclePolicy()(labels, grid)
    for fraction in (0.1, 0.3, 0.6):
        checked_budget(scores, grid, parse_tau(6899), budget_tokens(fraction, grid))


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
