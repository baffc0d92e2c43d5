"""Tokenizers as objects: how images become the encoder's input tokens (plain patches, CTS, dCTS).

A tokenizer says how many tokens an image gets when that is known from shapes (``static_count``), computes the
per-cell size map of its partition into aligned squares (``size_map``; None = one token per patch) and lists
the settings a captured graph bakes in (``settings``). The stage loop (``step_lightning.models.engine``) packs
and embeds the tokens; ``layout`` gives the padded ``TokenLayout`` for statistics and pictures.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch
from torch import nn

from step_lightning.core import PATCH_SIZE, ConfigError
from step_lightning.core.resize import resize_labels
from step_lightning.tokens.budget import budget_size_map, budget_tokens, check_budget
from step_lightning.tokens.layout import (
    TokenLayout,
    cts_k_for_grid,
    cts_size_map,
    dcts_size_map,
    identity_layout,
    layout_from_size_map,
)
from step_lightning.tokens.policy import OraclePolicy, PolicyNet


def refuse_budget(name: str, budget: float | None) -> None:
    if budget is not None:
        raise ConfigError(f"budget={budget} sets dCTS's token count; this model's tokenizer is {name} "
                          "(use halt_budget= for its exits, or a dcts/step model).")


def patch_grid(images: torch.Tensor) -> tuple[int, int]:
    h, w = (int(side) for side in images.shape[-2:])  # plain ints, also while fvcore traces
    if h % PATCH_SIZE or w % PATCH_SIZE:
        raise ValueError(f"model input {h}x{w} px must have sides that are multiples of {PATCH_SIZE}")
    return h // PATCH_SIZE, w // PATCH_SIZE


class PatchTokenizer(nn.Module):
    """One token per 16x16 patch (SegViT)."""

    name = "patch"
    policy = None
    exact_count = True  # every image has exactly ``static_count`` tokens (else: at most, padding after them)

    def static_count(self, grid: tuple[int, int], budget: float | None = None) -> int | None:
        refuse_budget(self.name, budget)
        return grid[0] * grid[1]

    def size_map(self, images: torch.Tensor, labels: torch.Tensor | None = None, policy=None,
                 budget: float | None = None) -> torch.Tensor | None:
        return None

    def settings(self) -> tuple:
        return (self.name,)

    def layout(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> TokenLayout:
        """Every patch its own token (the layout supertoken tokenizers compute)."""
        return identity_layout(images.shape[0], *patch_grid(images), device=images.device)


class SupertokenTokenizer(nn.Module, abc.ABC):
    """Merges homogeneous aligned windows into supertokens, scored by a frozen ``PolicyNet`` or, with
    ``policy=None``, the oracle that reads ground-truth labels (an upper bound, and realistic layouts for
    benchmarks; it needs labels aligned with the images). Subclasses choose the windows."""

    name = "supertokens"
    exact_count = True

    def __init__(self, policy: PolicyNet | None = None, ignore_index: int = 255):
        super().__init__()
        self.policy = policy
        self.oracle = OraclePolicy(ignore_index=ignore_index)
        if policy is not None:
            policy.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.policy is not None:
            self.policy.eval()  # frozen: BatchNorm statistics must not move while the segmenter trains
        return self

    def scores(self, images: torch.Tensor, labels: torch.Tensor | None, policy: nn.Module | None = None) -> dict:
        """Window scores {s: [B, Hp//s, Wp//s]}; ``policy``: a stand-in for the policy network (its fused copy)."""
        policy = policy or self.policy
        if policy is not None:
            with torch.no_grad():
                return policy(images)
        if labels is None:
            raise ConfigError(
                "policy=oracle reads ground-truth labels, which this call does not have; "
                "give a trained policy checkpoint (policy=/path/to/policy.ckpt) to run without labels."
            )
        return self.oracle(resize_labels(labels, images.shape[-2:]), patch_grid(images))

    @abc.abstractmethod
    def windows(self, scores: dict, grid: tuple[int, int], budget: float | None) -> torch.Tensor:
        """The size map [B, Hp, Wp] of the windows this tokenizer merges, from the policy's scores."""

    @abc.abstractmethod
    def static_count(self, grid: tuple[int, int], budget: float | None = None) -> int | None:
        """Tokens per image when known from shapes (at most, with a budget), else None (read on the host after
        the layout). ``budget``: overrides the tokenizer's own."""

    @abc.abstractmethod
    def settings(self) -> tuple:
        """The tokenizer's settings (what a captured graph bakes in)."""

    def size_map(self, images: torch.Tensor, labels: torch.Tensor | None = None, policy=None,
                 budget: float | None = None) -> torch.Tensor:
        """int64 [B, Hp, Wp]: the side of the square token covering each cell. No host sync."""
        return self.windows(self.scores(images, labels, policy), patch_grid(images), budget)

    def layout(self, images: torch.Tensor, labels: torch.Tensor | None = None,
               budget: float | None = None) -> TokenLayout:
        grid = patch_grid(images)
        return layout_from_size_map(self.size_map(images, labels, budget=budget),
                                    self.static_count(grid, budget) if self.exact_count else None)


class CTSTokenizer(SupertokenTokenizer):
    """CTS: the top-K scoring 2x2 windows of every image merge (K=103 at 32x32 patches, scaled with the patch
    count unless ``k`` is given): a token count known from shapes."""

    name = "cts"

    def __init__(self, policy: PolicyNet | None = None, k: int | None = None, ignore_index: int = 255):
        super().__init__(policy, ignore_index)
        self.k = k

    def merged(self, grid: tuple[int, int]) -> int:
        return self.k if self.k is not None else cts_k_for_grid(*grid)

    def static_count(self, grid: tuple[int, int], budget: float | None = None) -> int | None:
        refuse_budget(self.name, budget)
        return grid[0] * grid[1] - 3 * self.merged(grid)

    def windows(self, scores: dict, grid: tuple[int, int], budget: float | None) -> torch.Tensor:
        return cts_size_map(scores[2], grid, self.merged(grid))

    def settings(self) -> tuple:
        return (self.name, self.k)


class DCTSTokenizer(SupertokenTokenizer):
    """dCTS (STEP): coarse to fine, a window merges when its score exceeds its size's threshold and no larger
    accepted window contains it; the token count depends on the content. ``budget`` (a fraction of the patches
    or a token count): at most that many tokens per image instead, windows merged in the order of their margins
    over the thresholds (``step_lightning.tokens.budget``), a count known from shapes."""

    name = "dcts"
    exact_count = False  # with a budget: at most ``static_count`` tokens, padding after them

    def __init__(self, policy: PolicyNet | None = None, thresholds: Sequence[float] = (0.6, 0.8, 0.9, 0.9),
                 ignore_index: int = 255, budget: float | None = None):
        super().__init__(policy, ignore_index)
        self.thresholds = tuple(thresholds)
        self.budget = budget

    def static_count(self, grid: tuple[int, int], budget: float | None = None) -> int | None:
        budget = self.budget if budget is None else budget
        return None if budget is None else budget_tokens(budget, grid)

    def windows(self, scores: dict, grid: tuple[int, int], budget: float | None) -> torch.Tensor:
        tokens = self.static_count(grid, budget)
        if tokens is None:
            return dcts_size_map(scores, grid, self.thresholds)
        check_budget(tokens, grid, [s for s in scores if grid[0] // s and grid[1] // s])
        return budget_size_map(scores, grid, self.thresholds, tokens)

    def settings(self) -> tuple:
        return (self.name, self.thresholds, self.budget)
