"""Independent oracles of the model tests: the straightforward dense computation the one forward must equal.

A padded batch [B, N, C] with key masks, timm's own ``Block.forward``, the ATM head with explicit per-head
similarity maps, and early exit by masking (halted tokens carried through every later block unchanged and
masked out as keys): the static training computation the project ran before its forward was packed.
"""

from __future__ import annotations

import math

import torch
from timm.models.vision_transformer import Block

from step_lightning.models.tokenizer import PatchTokenizer
from step_lightning.tokens.embed import embed_pyramid, feature_index
from step_lightning.tokens.layout import unshare


def dense_cross_attention(ca, queries, memory, key_mask):
    b, k, d = queries.shape
    n = memory.shape[1]
    q = ca.q(queries).reshape(b, k, ca.num_heads, ca.head_dim).transpose(1, 2)
    key = ca.k(memory).reshape(b, n, ca.num_heads, ca.head_dim).transpose(1, 2)
    v = ca.v(memory).reshape(b, n, ca.num_heads, ca.head_dim).transpose(1, 2)
    sim = (q @ key.transpose(-2, -1)) / math.sqrt(ca.head_dim)  # [B, heads, K, N]
    mask_logits = sim.mean(dim=1)
    if key_mask is not None:
        sim = sim.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    attn = ca.attn_drop(sim.softmax(dim=-1))
    out = (attn @ v).transpose(1, 2).reshape(b, k, d)
    return ca.proj(out), mask_logits


def dense_atm(head, feats: list[torch.Tensor], key_mask: torch.Tensor | None) -> list[dict]:
    """``ATMHead`` on padded features [B, N, C] (deepest first): mask logits [B, K, N] per stage."""
    queries = head.queries.weight.unsqueeze(0).expand(feats[0].shape[0], -1, -1)
    outputs, masks = [], None
    for stage, stage_feats in zip(head.stages, feats, strict=True):
        memory = stage.input_norm(stage.input_proj(stage_feats))
        for layer in stage.layers:
            queries = layer.norm1(queries + layer.drop1(layer.self_attn(queries, queries, queries,
                                                                        need_weights=False)[0]))
            attended, stage_masks = dense_cross_attention(layer.cross_attn, queries, memory, key_mask)
            queries = layer.norm2(queries + layer.drop2(attended))
            queries = layer.norm3(queries + layer.drop3(layer.ffn(queries)))
        masks = stage_masks if masks is None else masks + stage_masks
        outputs.append({"class_logits": head.class_embed(queries), "mask_logits": masks})
    return outputs


def dense_tokens(model, images, labels):
    """Padded tokens [B, N, C], their key mask [B, N] (None: plain patches) and layout (None: plain patches)."""
    encoder = model.encoder
    if isinstance(model.tokenizer, PatchTokenizer):
        return encoder.embed(images), None, None
    layout = model.tokenizer.layout(images, labels)
    feats = embed_pyramid(images, layout.grid, encoder.patch_embed.proj, encoder.pos_embed_grid(*layout.grid))
    row, col = layout.token_pos.unbind(-1)
    index = feature_index(layout.token_size, row, col, layout.grid)
    x = feats.gather(1, index.unsqueeze(-1).expand(-1, -1, feats.shape[-1])) * layout.valid.unsqueeze(-1)
    return x, layout.valid, layout


def to_grid(values, layout, grid):
    if layout is not None:
        values = unshare(values, layout, dim=-1)
    return values.unflatten(-1, grid)


def dense_blocks(blocks, x, key_mask, frozen=None):
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]
    for block in blocks:
        y = Block.forward(block, x, attn_mask=attn_mask)  # timm's own forward
        x = y if frozen is None else torch.where(frozen[..., None], x, y)
    return x


def masked_forward(model, images, labels=None) -> dict:
    """The model's outputs computed densely: SegViT's cascade, or early exit with halted tokens masked
    (every head runs; halting by the model's rule, decided in fp32)."""
    x, valid, layout = dense_tokens(model, images, labels)
    grid = (images.shape[-2] // 16, images.shape[-1] // 16)
    if not model.exit_layers:
        feats = []
        for start, end in model.stages:
            x = dense_blocks(model.encoder.blocks[start:end], x, valid)
            feats.append(x)
        outputs = dense_atm(model.head, feats[::-1], valid)
        return {"outputs": [{**o, "mask_logits": to_grid(o["mask_logits"], layout, grid)} for o in outputs]}
    b, n = x.shape[:2]
    active = valid if valid is not None else torch.ones(b, n, dtype=torch.bool)
    canvas, outputs, halted, active_after = None, [], [], []
    for i, (start, end) in enumerate(model.stages):
        x = dense_blocks(model.encoder.blocks[start:end], x, active, frozen=~active)
        out = dense_atm(model.heads[i], [x], active)[0]
        logits = out["mask_logits"]
        canvas = logits if canvas is None else torch.where(active[:, None], logits, canvas)
        outputs.append({"class_logits": out["class_logits"], "mask_logits": to_grid(canvas, layout, grid)})
        if i < model.num_exits:
            with torch.no_grad():
                scores = model.heads[i].semantic_scores(out["class_logits"].float(), logits.float())
                halt = model.halting.decide(i, scores, active) & active
            active = active & ~halt
            halted.append(halt.sum(1))
            active_after.append(active.sum(1))
    return {"outputs": outputs, "halted": torch.stack(halted, 1), "active_after": torch.stack(active_after, 1)}
