"""The halting rules against literal per-token readings: DToP's threshold rule and the halting budget (exact
counts, most confident first, the keep set kept, and what gives way when too few tokens may halt); no host
read, one graph."""

from __future__ import annotations

import pytest
import torch

from step_lightning.measure.dispatch import DispatchCounter
from step_lightning.models.halting import budget_halting_mask, forced_halting_mask, halting_mask

FRACTIONS = (0.0, 0.1, 0.3, 0.5, 0.77, 0.95, 1.0)


def random_case(seed: int, batch: int = 6, classes: int = 4, tokens: int = 40):
    """Scores [B, K, N] and valid masks with very different counts per image (all, none, one, random)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(batch, classes, tokens, generator=g)
    valid = torch.rand(batch, tokens, generator=g) < torch.linspace(0.1, 1.0, batch)[:, None]
    valid[0] = True
    valid[1] = False
    valid[2] = torch.arange(tokens) == 3
    return scores, valid


def keep_ranks(scores, candidate, k):
    """{token: rank among its class's candidates} for the k most confident candidates of every class."""
    conf, cls = scores.max(0)
    ranks = {}
    for c in range(scores.shape[0]):
        members = sorted((t for t in range(scores.shape[1]) if candidate[t] and cls[t] == c), key=lambda t: -conf[t])
        ranks |= {t: r for r, t in enumerate(members[:k])}
    return ranks


def literal_budget(scores, valid, fraction, k):
    conf = scores.max(0).values
    n = int(valid.sum())
    halts = max(min(round(fraction * n), n - 1), 0)
    kept = keep_ranks(scores, valid, k)
    tokens = [t for t in range(scores.shape[1]) if valid[t]]
    order = sorted(tokens, key=lambda t: (k - kept[t] if t in kept else 0, -conf[t]))
    return set(order[:halts]), n - halts


def literal_dtop(scores, valid, threshold, k):
    conf = scores.max(0).values
    candidate = valid & (conf > threshold)
    kept = keep_ranks(scores, candidate, k)
    return {t for t in range(scores.shape[1]) if candidate[t] and t not in kept}


def halted(mask_row):
    return set(mask_row.nonzero().flatten().tolist())


@pytest.mark.parametrize("k", [0, 1, 3, 5])
def test_halting_budget_matches_its_literal_reading(k):
    for seed in range(3):
        scores, valid = random_case(seed)
        for fraction in FRACTIONS:
            halt, survivors = budget_halting_mask(scores, valid, fraction, k)
            for b in range(scores.shape[0]):
                expected, survive = literal_budget(scores[b], valid[b], fraction, k)
                assert halted(halt[b]) == expected
                assert int(survivors[b]) == survive


def test_halting_budget_counts_are_exact_and_follow_from_the_valid_count():
    scores, valid = random_case(4)
    count = valid.sum(1)
    for fraction in FRACTIONS:
        halt, survivors = budget_halting_mask(scores, valid, fraction, keep_top_k=5)
        expected = torch.minimum((fraction * count).round().long(), count - 1).clamp(min=0)
        assert torch.equal(halt.sum(1), expected) and torch.equal(survivors, count - expected)
        assert not (halt & ~valid).any()
    assert budget_halting_mask(scores, valid, 1.0)[1].tolist() == [1, 0, 1] + [1] * 3  # one token stays


def test_halting_budget_keeps_the_keep_set_while_others_can_halt():
    """Class 0 has six tokens, class 1 three; k=2 keeps 0.99, 0.97 (class 0) and 0.96, 0.94 (class 1). Halting 4
    of the 9: the four most confident of the other five. Halting 7: all five others, then the second of each
    class (the more confident first), then the best of each class; one token always stays."""
    conf = torch.tensor([0.99, 0.97, 0.95, 0.93, 0.91, 0.89, 0.96, 0.94, 0.92])
    cls = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1])
    scores = (conf * 0.5).repeat(2, 1)
    scores[cls, torch.arange(9)] = conf
    valid = torch.ones(1, 9, dtype=torch.bool)
    halt, survivors = budget_halting_mask(scores[None], valid, 4 / 9, keep_top_k=2)
    assert halted(halt[0]) == {2, 3, 4, 8} and survivors.tolist() == [5]
    halt, _ = budget_halting_mask(scores[None], valid, 6 / 9, keep_top_k=2)
    assert halted(halt[0]) == {2, 3, 4, 5, 8, 1}
    halt, _ = budget_halting_mask(scores[None], valid, 7 / 9, keep_top_k=2)
    assert halted(halt[0]) == {2, 3, 4, 5, 8, 1, 7}
    halt, survivors = budget_halting_mask(scores[None], valid, 1.0, keep_top_k=2)
    assert halted(halt[0]) == set(range(9)) - {6} and survivors.tolist() == [1]  # one token always stays


def test_forced_halting_is_the_budget_without_a_keep_set():
    scores, valid = random_case(5)
    for fraction in FRACTIONS:
        forced = forced_halting_mask(scores, valid, fraction)
        assert torch.equal(forced, budget_halting_mask(scores, valid, fraction, keep_top_k=0)[0])


def test_halting_budget_refuses_a_fraction_outside_zero_one():
    scores, valid = random_case(0)
    for fraction in (-0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            budget_halting_mask(scores, valid, fraction)


@pytest.mark.parametrize("k", [0, 2, 5, 50])
def test_threshold_rule_matches_its_literal_reading(k):
    for seed in range(3):
        scores, valid = random_case(seed)
        for threshold in (0.0, 0.5, 0.8, 0.95):
            halt = halting_mask(scores, valid, threshold, k)
            for b in range(scores.shape[0]):
                assert halted(halt[b]) == literal_dtop(scores[b], valid[b], threshold, k)


def test_halting_rules_read_nothing_back_and_trace_as_one_graph():
    scores, valid = random_case(1)
    with DispatchCounter() as counter:
        budget_halting_mask(scores, valid, 0.4, 5)
        halting_mask(scores, valid, 0.8, 5)
    assert counter.host_reads == []
    budget = torch.compile(budget_halting_mask, fullgraph=True, backend="eager")
    threshold = torch.compile(halting_mask, fullgraph=True, backend="eager")
    for got, expected in zip(budget(scores, valid, 0.4, 5), budget_halting_mask(scores, valid, 0.4, 5), strict=True):
        assert torch.equal(got, expected)
    assert torch.equal(threshold(scores, valid, 0.8, 5), halting_mask(scores, valid, 0.8, 5))
