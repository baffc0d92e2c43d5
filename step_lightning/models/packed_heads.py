"""ATM heads over packed rows (inference): the same modules as ``ATMHead``, run on a [rows, C] token buffer.

Per image the K class queries cross-attend to that image's rows only (variable-length attention with query
lengths K and key lengths the image token counts). Mask logits are computed only where they are used, in the
last decoder layer of each stage, and as ONE GEMM over the full width: the head mean of the per-head
similarities (1/H) sum_h q_h . k_h / sqrt(d) equals (q . k) / (H sqrt(d)) with q, k the full-width
projections, so no per-head [B, H, K, N] similarity tensor and no mean are formed. The GEMM runs on the
dense view [B, L, D] of the keys, one image per matrix, and returns token-major logits [B, L, K].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from step_lightning.models.atm import ATMDecoderLayer, ATMHead
from step_lightning.models.packed import Packing, cross_attention, use_flash_varlen


def decoder_layer_rows(
    layer: ATMDecoderLayer, queries: Tensor, memory: Tensor, packing: Packing, mask_logits: bool
) -> tuple[Tensor, Tensor | None]:
    """``ATMDecoderLayer`` with queries [B, K, D] over packed memory [rows, D]. Returns the new queries and,
    if asked, the layer's mask logits token-major on the dense view, [B, L, K]."""
    queries = layer.norm1(queries + layer.drop1(layer.self_attn(queries, queries, queries, need_weights=False)[0]))
    ca = layer.cross_attn
    heads, head_dim = ca.num_heads, ca.head_dim
    b, num_queries, dim = queries.shape
    q = ca.q(queries)
    k = ca.k(memory)
    v = ca.v(memory)
    k_dense = None if use_flash_varlen(q) and not mask_logits else packing.to_dense(k)  # [B, L, D]
    attended = cross_attention(
        q.view(b, num_queries, heads, head_dim),
        k.view(-1, heads, head_dim),
        v.view(-1, heads, head_dim),
        packing,
        1.0 / math.sqrt(head_dim),
        None if k_dense is None else k_dense.view(b, -1, heads, head_dim),
    ).reshape(b, num_queries, dim)
    logits = None
    if mask_logits:  # head mean of q_h.k_h/sqrt(d) == q.k/(H sqrt(d)): one GEMM, exact
        logits = torch.bmm(k_dense, (q * (1.0 / (heads * math.sqrt(head_dim)))).transpose(1, 2))
    queries = layer.norm2(queries + layer.drop2(ca.proj(attended)))
    queries = layer.norm3(queries + layer.drop3(layer.ffn(queries)))
    return queries, logits


def atm_head_rows(head: ATMHead, feats: list[Tensor], packing: Packing) -> list[dict[str, Tensor]]:
    """``ATMHead.forward`` on packed feature rows (deepest first, each [rows, C_enc]).

    Returns one output per stage: ``class_logits`` [B, K, K+1 or 2] and ``mask_logits`` token-major on the
    dense view [B, L, K] (accumulated over stages as in ``ATMHead``; padding slots hold arbitrary values)."""
    queries = head.queries.weight.unsqueeze(0).expand(packing.batch, -1, -1)
    outputs, masks = [], None
    for stage, stage_feats in zip(head.stages, feats, strict=True):
        memory = stage.input_norm(stage.input_proj(stage_feats))
        last = len(stage.layers) - 1
        for i, layer in enumerate(stage.layers):
            queries, logits = decoder_layer_rows(layer, queries, memory, packing, mask_logits=i == last)
        masks = logits if masks is None else masks + logits
        outputs.append({"class_logits": head.class_embed(queries), "mask_logits": masks})
    return outputs
