"""Where one forward's time and GFLOPs go: the tokenizer, each encoder block, each head, and the early-exit
halting and selection steps, timed from the forward's own component marks (synchronised on CUDA) and counted
with fvcore."""

from __future__ import annotations

import torch
from torch import nn

from step_lightning.measure.components import SectionTimer
from step_lightning.measure.gflops import count_gflops
from step_lightning.models.base import SegmenterBase
from step_lightning.models.engine import InferenceOptions


def components(model: SegmenterBase) -> dict[str, nn.Module]:
    """Timed modules in execution order, by display name (fvcore module path in ``module_paths``)."""
    parts = {"tokenizer": model.tokenizer}
    parts |= {f"block {i + 1}": block for i, block in enumerate(model.encoder.blocks)}
    parts |= {exit_label(model, i): model.stage_head(i) for i in range(model.num_exits)}
    parts["final head" if model.exit_layers else "head"] = model.final_head
    return parts


def exit_label(model: SegmenterBase, index: int) -> str:
    return f"exit head {index + 1} (L{model.exit_layers[index]})"


def module_paths(model: SegmenterBase) -> dict[str, list[str]]:
    """fvcore module paths per part; the tokenizer calls the encoder's patch embedding, counted there."""
    names = {id(m): n for n, m in model.named_modules()}
    paths = {label: [names[id(m)]] for label, m in components(model).items()}
    paths["tokenizer"].append("encoder.patch_embed")
    return paths


class LayerTimer(SectionTimer):
    """Wall time per component of ``components`` (and the halting rule, token selection, host reads, other),
    and the rows each block and head ran on (forward pre-hooks)."""

    TOKENIZER = ("policy", "layout", "embed")

    def __init__(self, device: torch.device, model: SegmenterBase):
        super().__init__(device)
        self.model = model
        self.tokens: dict[str, int] = {}

    def label(self, section: str, detail) -> str:
        model = self.model
        if section in self.TOKENIZER:
            return "tokenizer"
        if section == "blocks":
            return f"block {detail + 1}"
        if section == "heads":
            return "final head" if model.exit_layers else "head"
        if section == "exits":
            kind, index = detail
            return {"head": exit_label(model, index), "rule": "halting rule", "select": "token selection"}[kind]
        if section == "read":
            return "host reads"
        return "other"

    def attach(self) -> list:
        handles = []
        for label, module in components(self.model).items():
            if label == "tokenizer":
                continue

            def pre(_module, args, label=label):
                x = args[0]
                self.tokens[label] = (x[0] if isinstance(x, list) else x).shape[0]  # rows (batch 1: tokens)

            handles.append(module.register_forward_pre_hook(pre))
        return handles


def gflops_by_component(model: SegmenterBase, image: torch.Tensor, label: torch.Tensor,
                        options: InferenceOptions | None = None) -> tuple[dict, float]:
    """Per-component GFLOPs (plus 'other') and the total of one batch-1 forward."""
    counted = count_gflops(model, image, label, options=options)
    by_module, total = counted["by_module"], counted["gflops"]
    result = {label: sum(by_module.get(p, 0.0) for p in paths) for label, paths in module_paths(model).items()}
    result["other"] = total - sum(result.values())
    return result, total
