"""The halting rules against literal per-token readings on random scores, with very different valid counts per
image: DToP's threshold rule, the halting budget (exact count among the tokens outside the class context, most
confident first; fewer when the context leaves too few) and the forced fraction; no host read, one graph."""

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


def rounded(fraction: float, n: int) -> int:
    """round(fraction x n) as the rules compute it (float32, half to even)."""
    return int((fraction * torch.tensor(n)).round())


def keepers(scores, candidate, k):
    """The k most confident candidates of every predicted class."""
    conf, cls = scores.max(0)
    kept = set()
    for c in range(scores.shape[0]):
        members = sorted((t for t in range(scores.shape[1]) if candidate[t] and cls[t] == c), key=lambda t: -conf[t])
        kept |= set(members[:k])
    return kept


def by_confidence(scores, tokens):
    conf = scores.max(0).values
    return sorted(tokens, key=lambda t: -conf[t])


def literal_budget(scores, valid, fraction, k):
    kept = keepers(scores, valid, k)
    others = by_confidence(scores, [t for t in range(scores.shape[1]) if valid[t] and t not in kept])
    return set(others[: rounded(fraction, int(valid.sum()))])


def literal_forced(scores, valid, fraction):
    n = int(valid.sum())
    tokens = by_confidence(scores, [t for t in range(scores.shape[1]) if valid[t]])
    return set(tokens[: max(min(rounded(fraction, n), n - 1), 0)])


def literal_dtop(scores, valid, threshold, k):
    candidate = valid & (scores.max(0).values > threshold)
    kept = keepers(scores, candidate, k)
    return {t for t in range(scores.shape[1]) if candidate[t] and t not in kept}


def halted(mask_row):
    return set(mask_row.nonzero().flatten().tolist())


@pytest.mark.parametrize("k", [0, 1, 3, 5])
def test_halting_budget_matches_its_literal_reading(k):
    for seed in range(3):
        scores, valid = random_case(seed)
        for fraction in FRACTIONS:
            halt = budget_halting_mask(scores, valid, fraction, k)
            for b in range(scores.shape[0]):
                assert halted(halt[b]) == literal_budget(scores[b], valid[b], fraction, k)


def test_halting_budget_halts_fewer_only_when_the_class_context_leaves_too_few():
    """Class 0 has six tokens, class 1 three; k=2 keeps 0.99, 0.97 (class 0) and 0.96, 0.94 (class 1). Halting 4
    of 9: the four most confident others. Asking for 6: the five others halt, the context stays."""
    conf = torch.tensor([0.99, 0.97, 0.95, 0.93, 0.91, 0.89, 0.96, 0.94, 0.92])
    cls = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1])
    scores = (conf * 0.5).repeat(2, 1)
    scores[cls, torch.arange(9)] = conf
    valid = torch.ones(1, 9, dtype=torch.bool)
    assert halted(budget_halting_mask(scores[None], valid, 4 / 9, k=2)[0]) == {2, 3, 4, 8}
    assert halted(budget_halting_mask(scores[None], valid, 6 / 9, k=2)[0]) == {2, 3, 4, 5, 8}


def test_forced_halting_matches_its_literal_reading():
    for seed in range(3):
        scores, valid = random_case(seed)
        for fraction in FRACTIONS:
            halt = forced_halting_mask(scores, valid, fraction)
            for b in range(scores.shape[0]):
                assert halted(halt[b]) == literal_forced(scores[b], valid[b], fraction)


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
    rules = [
        (budget_halting_mask, (scores, valid, 0.4, 5)),
        (halting_mask, (scores, valid, 0.8, 5)),
        (forced_halting_mask, (scores, valid, 0.4)),
    ]
    for rule, args in rules:
        with DispatchCounter() as counter:
            rule(*args)
        assert counter.host_reads == []
        assert torch.equal(torch.compile(rule, fullgraph=True, backend="eager")(*args), rule(*args))
