"""Which tokens halt at an exit head: halting rules as objects with their settings.

A rule sees per-class scores [B, K, L] (presence x sigmoid(mask logit)) of one exit head and ``valid`` [B, L]
(the tokens that may halt: active, not padding) and returns bool [B, L], True = halts now. Rules are vectorised:
no host sync, no loop over classes. ``settings()`` is what a captured graph bakes in.

Adding a rule: subclass ``HaltingRule`` and ``register_rule`` it under a name; ``ModelSpec(halting=<name>)``
builds it through ``build_rule`` (its ``from_spec`` reads the settings it needs from the spec).
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

import torch

from step_lightning.core import ConfigError


class HaltingRule:
    """Base: never halts anything. ``static``: the rule bounds each image's survivors from shapes alone
    (``survivors``), so halted tokens leave without a host read and a forward with static shapes stays static."""

    name = "none"
    static = False

    @classmethod
    def from_spec(cls, spec) -> HaltingRule:
        return cls()

    def can_halt(self, exit_index: int) -> bool:
        """Whether this exit may halt tokens (inference skips the head of an exit that cannot)."""
        return False

    def decide(self, exit_index: int, scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(valid)

    def survivors(self, exit_index: int, length: int) -> int:
        """Static rules: the most tokens an image of at most ``length`` tokens keeps at this exit."""
        return length

    def settings(self) -> tuple:
        fields = astuple(self) if hasattr(self, "__dataclass_fields__") else ()
        return (type(self).__name__, *fields)


@dataclass(frozen=True)
class ConfidenceHalting(HaltingRule):
    """DToP's rule: a token whose confidence max_c score exceeds ``threshold`` halts, except that for every
    class the ``keep_top_k`` most confident such tokens stay as context. Scores are at most 1, so a threshold of
    1 or more halts nothing (DToP's first phase)."""

    threshold: float = 0.9
    keep_top_k: int = 5
    name = "confidence"

    @classmethod
    def from_spec(cls, spec) -> HaltingRule:
        return cls(spec.prune_threshold, spec.keep_top_k)

    def can_halt(self, exit_index: int) -> bool:
        return self.threshold < 1.0

    def decide(self, exit_index: int, scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return halting_mask(scores, valid, self.threshold, self.keep_top_k)


@dataclass(frozen=True)
class ForcedHalting(HaltingRule):
    """Speed-study knob, not the method: the first exit halts exactly round(fraction x valid tokens) of each
    image, the most confident (at least one token stays); later exits halt nothing."""

    fraction: float = 0.4
    name = "forced"

    def __post_init__(self):
        if not 0.0 <= self.fraction < 1.0:
            raise ConfigError(f"force_halt={self.fraction} must be a fraction in [0, 1), e.g. force_halt=0.4.")

    def can_halt(self, exit_index: int) -> bool:
        return exit_index == 0

    def decide(self, exit_index: int, scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if exit_index != 0:
            return torch.zeros_like(valid)
        return forced_halting_mask(scores, valid, self.fraction)


@dataclass(frozen=True)
class BudgetHalting(HaltingRule):
    """A compute budget for the exits: every exit halts round(fraction x its valid tokens) of each image, the
    most confident first, while the ``keep_top_k`` most confident tokens of each class stay as context. The
    survivors are bounded from shapes (a static rule: no host read)."""

    fraction: float = 0.3
    keep_top_k: int = 5
    num_classes: int = 0  # bounds the class keepers (0: unknown, the bound is then the whole length)
    name = "budget"
    static = True

    def __post_init__(self):
        if not 0.0 <= self.fraction < 1.0:
            raise ConfigError(f"halt_budget={self.fraction} must be a fraction in [0, 1), e.g. halt_budget=0.3.")

    @classmethod
    def from_spec(cls, spec) -> HaltingRule:
        return cls(spec.halt_budget, spec.keep_top_k, spec.num_classes)

    def can_halt(self, exit_index: int) -> bool:
        return self.fraction > 0.0

    def decide(self, exit_index: int, scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return budget_halting_mask(scores, valid, self.fraction, self.keep_top_k)

    def survivors(self, exit_index: int, length: int) -> int:
        # n - halted is largest at n = length, unless the class keepers (at most K x k) hold more
        keepers = length if self.num_classes == 0 else min(length, self.num_classes * self.keep_top_k)
        return max(length - round(self.fraction * length), keepers)


RULES: dict[str, type[HaltingRule]] = {}


def register_rule(rule: type[HaltingRule]) -> type[HaltingRule]:
    RULES[rule.name] = rule
    return rule


for _rule in (HaltingRule, ConfidenceHalting, BudgetHalting):
    register_rule(_rule)


def build_rule(spec) -> HaltingRule:
    """The halting rule a ``ModelSpec`` names (``spec.halting``)."""
    if spec.halting not in RULES:
        raise ConfigError(f"halting={spec.halting} must be one of {', '.join(RULES)}.")
    return RULES[spec.halting].from_spec(spec)


def halting_mask(scores: torch.Tensor, valid: torch.Tensor, threshold: float, k: int = 5) -> torch.Tensor:
    """DToP's halting rule. scores [B, K, N] (presence x sigmoid(mask logit)), valid [B, N] (tokens that
    may halt: active, not padding) -> bool [B, N], True = halts now.

    A valid token is a candidate when its confidence max_c score[c, t] exceeds ``threshold``; for every
    class the ``min(k, count)`` most confident candidates predicted as that class stay as context
    (``class_keepers``), the other candidates halt.
    """
    conf = scores.amax(dim=1)
    candidate = valid & (conf > threshold)
    return candidate & ~class_keepers(scores, candidate, k)


def class_keepers(scores: torch.Tensor, candidate: torch.Tensor, k: int) -> torch.Tensor:
    """bool [B, N]: for every class, the ``min(k, count)`` most confident of the ``candidate`` tokens predicted
    as that class (DToP keeps them as context). Vectorised as a per-class top-k over a [B, K, N] matrix that holds
    each candidate's confidence in the row of its predicted class only (-inf elsewhere)."""
    num_classes, n = scores.shape[1], scores.shape[2]
    conf, cls = scores.max(dim=1)
    own_row = cls.unsqueeze(1) == torch.arange(num_classes, device=scores.device)[:, None]
    ranked = torch.where(own_row & candidate.unsqueeze(1), scores, float("-inf"))
    top = ranked.topk(min(k, n), dim=-1)
    # A class with fewer than k candidates also returns -inf fillers (possibly other classes' tokens);
    # scatter_add counts only real picks so duplicates cannot erase them.
    picks = torch.isfinite(top.values).flatten(1).long()
    return torch.zeros_like(conf, dtype=torch.long).scatter_add_(1, top.indices.flatten(1), picks) > 0


def budget_halting_mask(scores: torch.Tensor, valid: torch.Tensor, fraction: float, k: int = 5) -> torch.Tensor:
    """Halt round(fraction x valid tokens) of each image, the most confident first, never one of the
    ``class_keepers`` of the valid tokens (when they leave too few others, every other token halts)."""
    conf = scores.amax(dim=1)
    eligible = valid & ~class_keepers(scores, valid, k)
    count = torch.minimum((fraction * valid.sum(1)).round().long(), eligible.sum(1))
    return eligible & (_rank(torch.where(eligible, conf, float("-inf"))) < count[:, None])


def _rank(conf: torch.Tensor) -> torch.Tensor:
    """int64 [B, N]: each token's position when its image's tokens are sorted by descending ``conf`` (a full
    top-k: ONNX has TopK, not a stable sort; equal confidences may rank either way)."""
    order = conf.topk(conf.shape[1], dim=1).indices
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def forced_halting_mask(scores: torch.Tensor, valid: torch.Tensor, fraction: float) -> torch.Tensor:
    """Halt exactly round(fraction x valid tokens) of each image's valid tokens, the most confident ones (at
    least one token stays). Same shapes as ``halting_mask``."""
    conf = torch.where(valid, scores.amax(dim=1), float("-inf"))
    count = valid.sum(1)
    halt_count = torch.minimum((fraction * count).round().long(), count - 1)
    return valid & (_rank(conf) < halt_count[:, None])
