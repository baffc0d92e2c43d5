"""Where one forward's time and GFLOPs go: the tokenizer, each encoder block, each head, and the early-exit
halting and selection steps, timed with hooks (synchronised on CUDA) and counted with fvcore."""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from torch import nn

from step_lightning.measure.gflops import count_gflops
from step_lightning.measure.timing import synchronize
from step_lightning.models.base import SegmenterBase


def components(model: SegmenterBase) -> dict[str, nn.Module]:
    """Timed modules in execution order, by display name (fvcore module path in ``module_paths``)."""
    parts = {"tokenizer": model.tokenizer}
    parts |= {f"block {i + 1}": block for i, block in enumerate(model.encoder.blocks)}
    parts |= {f"exit head {i + 1} (L{layer})": model.heads[i] for i, layer in enumerate(model.exit_layers)}
    parts["final head" if model.exit_layers else "head"] = model.final_head
    return parts


def module_paths(model: SegmenterBase) -> dict[str, list[str]]:
    """fvcore module paths per part; the tokenizer calls the encoder's patch embedding, counted there."""
    names = {id(m): n for n, m in model.named_modules()}
    paths = {label: [names[id(m)]] for label, m in components(model).items()}
    paths["tokenizer"].append("encoder.patch_embed")
    return paths


class Timer:
    """Accumulates wall time per label for one forward; hooks and method wrappers feed it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.tokens: dict[str, int] = {}
        self._start: dict[str, float] = {}

    def begin(self, label: str) -> None:
        synchronize(self.device)
        self._start[label] = time.perf_counter()

    def end(self, label: str) -> None:
        synchronize(self.device)
        self.seconds[label] += time.perf_counter() - self._start.pop(label)

    def attach(self, model: nn.Module) -> list:
        handles = []
        for label, module in components(model).items():

            def pre(_module, args, label=label):
                x = args[0]
                if isinstance(x, list):  # heads read a list of feature tensors
                    self.tokens[label] = x[0].shape[1]
                elif label.startswith("block"):
                    self.tokens[label] = x.shape[1]
                self.begin(label)

            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(lambda *_, label=label: self.end(label)))
        if model.exit_layers:
            for attr, label in (("halt", "halting rule"), ("_compact", "token selection")):
                setattr(model, attr, self.wrap(getattr(model, attr), label))
        return handles

    def wrap(self, method, label: str):
        def timed(*args, **kwargs):
            self.begin(label)
            result = method(*args, **kwargs)
            self.end(label)
            return result

        return timed


def gflops_by_component(model: SegmenterBase, image: torch.Tensor, label: torch.Tensor) -> tuple[dict, float]:
    """Per-component GFLOPs (plus 'other') and the total of one batch-1 forward."""
    counted = count_gflops(model, image, label)
    by_module, total = counted["by_module"], counted["gflops"]
    result = {label: sum(by_module.get(p, 0.0) for p in paths) for label, paths in module_paths(model).items()}
    result["other"] = total - sum(result.values())
    return result, total
