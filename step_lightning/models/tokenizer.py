"""Tokenizers: turn images into the encoder's input tokens (plain patches, or dCTS/CTS supertokens)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from step_lightning.core import PATCH_SIZE, ConfigError
from step_lightning.core.resize import resize_labels
from step_lightning.models.vit import ViTEncoder
from step_lightning.tokens.embed import SupertokenEmbed
from step_lightning.tokens.layout import TokenLayout, cts_k_for_grid, cts_layout, dcts_layout, identity_layout, unshare
from step_lightning.tokens.policy import OraclePolicy, PolicyNet


@dataclass
class TokenBatch:
    """Encoder input: tokens [B, N, C] with position embedding, key mask [B, N] (True = real token, None =
    all real), the layout (None = one token per patch) and the patch grid."""

    x: torch.Tensor
    key_padding_mask: torch.Tensor | None
    layout: TokenLayout | None
    grid: tuple[int, int]

    def to_grid(self, values: torch.Tensor) -> torch.Tensor:
        """Per-token values [B, K, N] -> the dense patch grid [B, K, Hp, Wp] (supertokens are unshared)."""
        if self.layout is not None:
            values = unshare(values, self.layout, dim=-1)
        return values.unflatten(-1, self.grid)

    @property
    def counts(self) -> torch.Tensor:
        """Tokens per image [B]."""
        if self.key_padding_mask is None:
            return torch.full((self.x.shape[0],), self.x.shape[1], device=self.x.device)
        return self.key_padding_mask.sum(1)


def patch_grid(images: torch.Tensor) -> tuple[int, int]:
    h, w = (int(side) for side in images.shape[-2:])  # plain ints, also while fvcore traces
    if h % PATCH_SIZE or w % PATCH_SIZE:
        raise ValueError(f"model input {h}x{w} px must have sides that are multiples of {PATCH_SIZE}")
    return h // PATCH_SIZE, w // PATCH_SIZE


class PatchTokenizer(nn.Module):
    """One token per 16x16 patch (SegViT)."""

    def layout(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> TokenLayout:
        """Every patch its own token (the layout supertoken tokenizers compute)."""
        return identity_layout(images.shape[0], *patch_grid(images), device=images.device)

    def forward(self, images: torch.Tensor, encoder: ViTEncoder, labels: torch.Tensor | None = None) -> TokenBatch:
        grid = patch_grid(images)
        return TokenBatch(encoder.embed(images), None, None, grid)


class SupertokenTokenizer(nn.Module):
    """dCTS (per-size thresholds, coarse to fine) or CTS (top-K 2x2 windows) in front of the encoder.

    The policy is a frozen ``PolicyNet`` or, with ``policy=None``, the oracle that reads ground-truth labels
    (an upper bound, and realistic layouts for benchmarks; it needs labels aligned with the images).
    """

    def __init__(
        self,
        mode: str,
        policy: PolicyNet | None = None,
        thresholds: Sequence[float] = (0.6, 0.8, 0.9, 0.9),
        cts_k: int | None = None,
        ignore_index: int = 255,
    ):
        super().__init__()
        if mode not in ("dcts", "cts"):
            raise ConfigError(f"supertoken mode '{mode}' must be 'dcts' or 'cts'")
        self.mode = mode
        self.thresholds = tuple(thresholds)
        self.cts_k = cts_k
        self.policy = policy
        self.oracle = OraclePolicy(ignore_index=ignore_index)
        self.embed = SupertokenEmbed()
        if policy is not None:
            policy.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.policy is not None:
            self.policy.eval()  # frozen: BatchNorm statistics must not move while the segmenter trains
        return self

    def scores(self, images: torch.Tensor, grid: tuple[int, int], labels: torch.Tensor | None) -> dict:
        if self.policy is not None:
            with torch.no_grad():
                return self.policy(images)
        if labels is None:
            raise ConfigError(
                "policy=oracle reads ground-truth labels, which this call does not have; "
                "give a trained policy checkpoint (policy=/path/to/policy.ckpt) to run without labels."
            )
        return self.oracle(resize_labels(labels, images.shape[-2:]), grid)

    def layout(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> TokenLayout:
        grid = patch_grid(images)
        scores = self.scores(images, grid, labels)
        if self.mode == "cts":
            k = self.cts_k if self.cts_k is not None else cts_k_for_grid(*grid)
            return cts_layout(scores[2], grid, k)
        return dcts_layout(scores, grid, self.thresholds)

    def forward(self, images: torch.Tensor, encoder: ViTEncoder, labels: torch.Tensor | None = None) -> TokenBatch:
        layout = self.layout(images, labels)
        x = self.embed(images, layout, encoder.patch_embed.proj, encoder.pos_embed_grid(*layout.grid))
        return TokenBatch(x, layout.valid, layout, layout.grid)
