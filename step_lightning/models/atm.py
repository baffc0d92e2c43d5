"""SegViT's attention-to-mask (ATM) decoder: one query per class, masks from cross-attention similarity."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from step_lightning.models.packed import Packing, cross_attention, use_flash_varlen

HEAD_DIM = 32  # SegViT keeps 32 channels per decoder attention head for every width


def init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ATMCrossAttention(nn.Module):
    """Queries attend to image tokens; the head-averaged pre-softmax similarity is the mask logit map.

    The head mean of the per-head similarities (1/H) sum_h q_h . k_h / sqrt(d) equals (q . k) / (H sqrt(d))
    with q, k the full-width projections: the mask logits are ONE GEMM per image on the dense view of the keys,
    no per-head [B, H, K, N] similarity tensor and no mean."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.1):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(dropout)

    def forward(
        self, queries: Tensor, memory: Tensor, packing: Packing, mask_logits: bool
    ) -> tuple[Tensor, Tensor | None]:
        """queries [B, K, D] over each image's rows of memory [rows, D] -> attended [B, K, D] and, if asked,
        the mask logits token-major on the dense view [B, L, K]."""
        heads, head_dim = self.num_heads, self.head_dim
        b, num_queries, dim = queries.shape
        q = self.q(queries)
        k = self.k(memory)
        v = self.v(memory)
        dropout = self.attn_drop.p if self.training else 0.0
        k_dense = packing.to_dense(k) if mask_logits or not use_flash_varlen(q, packing) else None  # [B, L, D]
        attended = cross_attention(
            q.view(b, num_queries, heads, head_dim),
            k.view(-1, heads, head_dim),
            v.view(-1, heads, head_dim),
            packing,
            1.0 / math.sqrt(head_dim),
            None if k_dense is None else k_dense.view(b, -1, heads, head_dim),
            dropout,
        ).reshape(b, num_queries, dim)
        logits = None
        if mask_logits:
            logits = torch.bmm(k_dense, (q * (1.0 / (heads * math.sqrt(head_dim)))).transpose(1, 2))
        return self.proj(attended), logits


class ATMDecoderLayer(nn.Module):
    """Post-norm transformer decoder layer (self-attn, ATM cross-attn, ReLU FFN), as in SegViT."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.cross_attn = ATMCrossAttention(dim, num_heads, dropout)
        self.ffn = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(4 * dim, dim)
        )
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop1, self.drop2, self.drop3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(
        self, queries: Tensor, memory: Tensor, packing: Packing, mask_logits: bool
    ) -> tuple[Tensor, Tensor | None]:
        queries = self.norm1(queries + self.drop1(self.self_attn(queries, queries, queries, need_weights=False)[0]))
        attended, logits = self.cross_attn(queries, memory, packing, mask_logits)
        queries = self.norm2(queries + self.drop2(attended))
        queries = self.norm3(queries + self.drop3(self.ffn(queries)))
        return queries, logits


class ATMStage(nn.Module):
    """Input projection (Linear + LayerNorm) and a stack of ATM decoder layers for one feature map."""

    def __init__(self, in_dim: int, dim: int, num_layers: int, num_heads: int, dropout: float):
        super().__init__()
        self.input_proj = nn.Linear(in_dim, dim)
        self.input_norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(ATMDecoderLayer(dim, num_heads, dropout) for _ in range(num_layers))

    def forward(self, queries: Tensor, feats: Tensor, packing: Packing) -> tuple[Tensor, Tensor]:
        """Only the last layer's mask logits are used (SegViT), so only the last layer computes them."""
        memory = self.input_norm(self.input_proj(feats))
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            queries, logits = layer(queries, memory, packing, mask_logits=i == last)
        return queries, logits


class ATMHead(nn.Module):
    """ATM head over one or more tapped feature maps (given deepest first).

    With several inputs this is SegViT's cascaded head: queries flow from stage to stage and mask maps
    accumulate (M_s = M_{s-1} + S_s). With one input it is DToP's independent exit head.
    ``presence_only`` switches the class classifier from K+1 ways (SegViT) to 2 ways (DToP exits).
    The features are token rows [rows, C] of a ``Packing`` (packed or padded); returns one output per stage,
    each ``{"class_logits": [B, K, K+1 or 2], "mask_logits": token-major on the dense view [B, L, K]}`` (padding
    slots hold arbitrary values).
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        num_inputs: int = 3,
        dim: int | None = None,
        num_layers: int = 3,
        dropout: float = 0.1,
        presence_only: bool = False,
        num_heads: int | None = None,
    ):
        """``num_heads``: attention heads of the decoder layers; None = one per 32 channels (SegViT)."""
        super().__init__()
        dim = dim or in_dim // 2
        num_heads = num_heads or max(1, dim // HEAD_DIM)
        if dim % num_heads:
            raise ValueError(f"ATM head width {dim} is not divisible by {num_heads} attention heads")
        self.num_classes = num_classes
        self.presence_only = presence_only
        self.queries = nn.Embedding(num_classes, dim)
        self.stages = nn.ModuleList(ATMStage(in_dim, dim, num_layers, num_heads, dropout) for _ in range(num_inputs))
        self.class_embed = nn.Linear(dim, 2 if presence_only else num_classes + 1)
        init_weights(self)

    def forward(self, feats: list[Tensor], packing: Packing) -> list[dict[str, Tensor]]:
        queries = self.queries.weight.unsqueeze(0).expand(packing.batch, -1, -1)
        outputs, masks = [], None
        for stage, stage_feats in zip(self.stages, feats, strict=True):
            queries, stage_masks = stage(queries, stage_feats, packing)
            masks = stage_masks if masks is None else masks + stage_masks
            outputs.append({"class_logits": self.class_embed(queries), "mask_logits": masks})
        return outputs

    def semantic_scores(self, class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        """Per-class scores [B, K, ...] from one output; mask_logits [B, K, ...] (any trailing shape)."""
        masks = mask_logits.sigmoid()
        if self.presence_only:
            presence = class_logits.softmax(-1)[..., 0]
            return presence.reshape(*presence.shape, *([1] * (masks.dim() - 2))) * masks
        probs = class_logits.softmax(-1)[..., :-1]  # drop "no object"
        return torch.einsum("bqc,bqn->bcn", probs, masks.flatten(2)).reshape(masks.shape)
