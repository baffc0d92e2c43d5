"""Token counts, halting and (with trained weights) mIoU of one model over a set of crops."""

from __future__ import annotations

import torch
from torch import nn

from step_lightning.metrics import SegMetrics
from step_lightning.models.engine import InferenceOptions


def token_statistics(model: nn.Module, images, labels, metrics: SegMetrics | None,
                     options: InferenceOptions | None = None) -> dict:
    """Tokens after the tokenizer and after each exit, halted fraction (batch 1 per crop); mIoU if asked."""
    tokens, after, halted = [], [], []
    for image, label in zip(images, labels, strict=True):
        scores, out = model.predict(image[None], label[None], options)
        tokens.append(out.tokens.float())
        if "active_after" in out.extras:
            after.append(out.extras["active_after"].float())
            halted.append(out.extras["halted"].float())
        if metrics is not None:
            metrics.update(scores.argmax(1).cpu(), label[None].cpu())
    tokens = torch.cat(tokens)
    result = {"tokens_mean": tokens.mean().item(), "tokens_after_exits": [], "halted_fraction": 0.0}
    result["tokens_per_image"] = tokens.tolist()
    result["active_after_per_image"] = torch.cat(after).tolist() if after else [[] for _ in tokens]
    if after:
        result["tokens_after_exits"] = torch.cat(after).mean(0).tolist()
        result["halted_fraction"] = (torch.cat(halted).sum() / tokens.sum()).item()
    if metrics is not None:
        result["mIoU"] = metrics.compute()["mIoU"].item()
    return result
