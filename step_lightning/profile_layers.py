"""Per-layer time and GFLOPs of one model (paper Figs 9-10): tokenizer, every encoder block, every head,
and the early-exit halting/selection steps.

    python -m step_lightning.profile_layers method=step_single backbone=vit_b resolution=1024 force_halt=0.4 \
        data=cityscapes data.root=/work/shared/realdata/cityscapes data.split=train num_images=1

Time: forward pre/post hooks on the tokenizer, each block and each head, and wrappers around
``EarlyExitSegmenter.halt`` (halting rule) and ``._compact`` (token selection/gather), all synchronised on
CUDA (the syncs serialise the GPU, so per-layer times add up to more than an unprofiled forward).
``other`` = whole forward minus the timed parts (unsharing to the grid, canvas scatter, Python overhead).
Median over ``repeats`` forwards per crop at batch 1, then averaged over crops. GFLOPs: fvcore's
per-module counts of the same forward (layout computed outside the trace, as in the benchmark).
Writes profile.json, profile.md and profile.png in the run directory; last line ``profile: <json>``.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from pathlib import Path

import hydra
import torch
from fvcore.nn import FlopCountAnalysis
from omegaconf import DictConfig, OmegaConf
from torch import nn

from step_lightning.benchmark import (
    build_models,
    fixed_layout,
    resolve_device,
    sample_crops,
    synchronize,
)
from step_lightning.config import register_resolvers
from step_lightning.core.files import atomic_write_text, write_json
from step_lightning.flops import EXTRA_HANDLES
from step_lightning.models.tokenizer import SupertokenTokenizer


def components(model: nn.Module) -> dict[str, nn.Module]:
    """Timed modules in execution order, by display name (fvcore module path in ``module_paths``)."""
    parts = {"tokenizer": model.tokenizer}
    parts |= {f"block {i + 1}": block for i, block in enumerate(model.encoder.blocks)}
    if hasattr(model, "heads"):
        parts |= {f"exit head {i + 1} (L{layer})": model.heads[i] for i, layer in enumerate(model.prune_heads)}
        parts["final head"] = model.heads[-1]
    else:
        parts["head"] = model.head
    return parts


def module_paths(model: nn.Module) -> dict[str, list[str]]:
    """fvcore module paths per part; the tokenizer calls the encoder's patch embedding, counted there."""
    names = {id(m): n for n, m in model.named_modules()}
    paths = {label: [f"model.{names[id(m)]}"] for label, m in components(model).items()}
    paths["tokenizer"].append("model.encoder.patch_embed")
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
        for attr, label in (("halt", "halting rule"), ("_compact", "token selection")):
            if hasattr(model, attr):
                setattr(model, attr, self.wrap(getattr(model, attr), label))
        return handles

    def wrap(self, method, label: str):
        def timed(*args, **kwargs):
            self.begin(label)
            result = method(*args, **kwargs)
            self.end(label)
            return result

        return timed


class _Final(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images, labels):
        final = self.model(images, labels).outputs[-1]
        return final["class_logits"], final["mask_logits"]


def gflops_by_component(model: nn.Module, image: torch.Tensor, label: torch.Tensor) -> tuple[dict, float]:
    """Per-component GFLOPs (plus 'other') and the total of one batch-1 forward."""
    model.eval()
    analysis = FlopCountAnalysis(_Final(model), (image, label)).set_op_handle(**EXTRA_HANDLES)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    tokenizer = model.tokenizer
    with torch.no_grad():
        if isinstance(tokenizer, SupertokenTokenizer):
            with fixed_layout(tokenizer, tokenizer.layout(image, label)):
                by_module, total = analysis.by_module(), analysis.total()
        else:
            by_module, total = analysis.by_module(), analysis.total()
    result = {label: sum(by_module.get(p, 0) for p in paths) / 1e9 for label, paths in module_paths(model).items()}
    result["other"] = total / 1e9 - sum(result.values())
    return result, total / 1e9


@torch.no_grad()
def profile(cfg: DictConfig) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    images, labels, names, datamodule = sample_crops(cfg)
    checkpoints = {cfg.method: cfg.get("ckpt_path")}
    model = build_models({cfg.method: cfg}, datamodule.num_classes, datamodule.ignore_index, checkpoints)[cfg.method]
    flops = [gflops_by_component(model, images[i : i + 1], labels[i : i + 1]) for i in range(len(images))]
    model.to(device)
    timer = Timer(device)
    handles = timer.attach(model)
    per_crop, totals = [], []
    with torch.inference_mode():
        for image, label in zip(images.to(device), labels.to(device), strict=True):
            runs = []
            for run in range(cfg.warmup + cfg.repeats):
                timer.seconds.clear()
                timer.begin("forward")
                model(image[None], label[None])
                timer.end("forward")
                if run >= cfg.warmup:
                    parts = dict(timer.seconds)
                    parts["other"] = parts["forward"] - sum(v for k, v in parts.items() if k != "forward")
                    runs.append(parts)
            per_crop.append({k: statistics.median(r[k] for r in runs) * 1e3 for k in runs[0]})
    for handle in handles:
        handle.remove()
    order = [*components(model), *(k for k in ("halting rule", "token selection") if k in per_crop[0]), "other"]
    rows = {
        label: {
            "ms": statistics.fmean(c.get(label, 0.0) for c in per_crop),
            "gflops": statistics.fmean(f[0].get(label, 0.0) for f in flops),
            "tokens": timer.tokens.get(label),
        }
        for label in order
    }
    totals = {"ms": statistics.fmean(c["forward"] for c in per_crop), "gflops": statistics.fmean(f[1] for f in flops)}
    report = {
        "method": cfg.method,
        "backbone": cfg.backbone.name,
        "resolution": cfg.resolution,
        "crops": names,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "rows": rows,
        "total": totals,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    out_dir = Path(cfg.paths.output_dir)
    table = markdown(report)
    atomic_write_text(out_dir / "profile.md", table + "\n")
    plot(report, out_dir / "profile.png")
    path = write_json(out_dir / "profile.json", report)
    print(table)
    print(f"profile: {path}")
    return report


def markdown(report: dict) -> str:
    total = report["total"]
    lines = [
        f"{report['method']} {report['backbone']} {report['resolution']}x{report['resolution']}, "
        f"{len(report['crops'])} crop(s), {report['device']} {report['threads']} threads",
        "",
        "| part | tokens in | GFLOPs | % GFLOPs | ms | % time |",
        "|---|---|---|---|---|---|",
    ]
    for label, row in report["rows"].items():
        tokens = "-" if row["tokens"] is None else str(row["tokens"])
        lines.append(
            f"| {label} | {tokens} | {row['gflops']:.2f} | {100 * row['gflops'] / total['gflops']:.1f} | "
            f"{row['ms']:.1f} | {100 * row['ms'] / total['ms']:.1f} |"
        )
    lines.append(f"| total | | {total['gflops']:.2f} | 100 | {total['ms']:.1f} | 100 |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(report["rows"])
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.45 * len(labels)), 6.5), sharex=True)
    for ax, key, unit in zip(axes, ("gflops", "ms"), ("GFLOPs", "time (ms)"), strict=True):
        values = [report["rows"][k][key] for k in labels]
        colours = [
            "tab:orange" if "head" in k else "tab:red" if k in ("halting rule", "token selection") else "tab:blue"
            for k in labels
        ]
        ax.bar(range(len(labels)), values, color=colours)
        ax.set_ylabel(unit)
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    axes[0].set_title(
        f"{report['method']} {report['backbone']} {report['resolution']}x{report['resolution']} "
        f"per part (total {report['total']['gflops']:.1f} GFLOPs, {report['total']['ms']:.0f} ms)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@hydra.main(version_base="1.3", config_path="conf", config_name="profile")
def main(cfg: DictConfig) -> None:
    profile(cfg)


if __name__ == "__main__":
    register_resolvers()
    main()
