"""Per-layer time and GFLOPs of one model (paper Figs 9-10): tokenizer, every encoder block, every head,
and the early-exit halting/selection steps.

    python -m step_lightning.profile_layers method=step_single backbone=vit_b resolution=1024 force_halt=0.4 \
        data=cityscapes data.root=../shared/realdata/cityscapes data.split=train num_images=1

Time: the forward's own component marks (``step_lightning.models.segments.probing``): the tokenizer, each block,
each head, the halting rule, the token selection and the host reads, synchronised on CUDA at every mark (the
syncs serialise the GPU, so per-layer times add up to more than an unprofiled forward). ``other`` = the rest
(unsharing to the grid, Python overhead).
Mean over ``repeats`` forwards per crop at batch 1, then over crops (the parts add up to the forward). GFLOPs: fvcore's
per-module counts of the same forward (``step_lightning.measure.gflops``, the policy included).
Runs the packed store, as every command does (``engine=padded`` selects the padded one).
Writes profile.json, profile.md and profile.png in the run directory; last line ``profile: <json>``.
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from step_lightning.cli import checked_command_line, run_command
from step_lightning.config.checks import check_config
from step_lightning.core.files import atomic_write_text, write_json
from step_lightning.lit.checkpoint import load_module
from step_lightning.measure.inputs import sample_crops
from step_lightning.measure.layers import LayerTimer, components, gflops_by_component
from step_lightning.measure.presets import build_models
from step_lightning.measure.progress import Progress
from step_lightning.measure.timing import resolve_device
from step_lightning.models.engine import InferenceOptions

log = logging.getLogger(__name__)


@torch.no_grad()
def profile(cfg: DictConfig) -> dict:
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    images, labels, names, datamodule = sample_crops(cfg)
    if cfg.get("ckpt_path"):  # the trained model, rebuilt from its checkpoint alone
        model = load_module(cfg.ckpt_path).model
    else:
        model = build_models({cfg.method: cfg}, datamodule.num_classes, datamodule.ignore_index)[cfg.method]
    options = InferenceOptions.from_config(cfg)
    crops = len(images)
    progress = Progress(f"profile_layers {cfg.method}", crops * (1 + cfg.warmup + cfg.repeats))
    flops = []
    for i in range(crops):
        flops.append(gflops_by_component(model, images[i : i + 1], labels[i : i + 1], options))
        progress.step(f"GFLOPs per part (crop {i + 1}/{crops})")
    model.to(device)
    timer = LayerTimer(device, model)
    handles = timer.attach()
    per_crop, totals = [], []
    with progress, torch.inference_mode():
        for i, (image, label) in enumerate(zip(images.to(device), labels.to(device), strict=True)):
            runs = []
            for run in range(cfg.warmup + cfg.repeats):
                timer.seconds.clear()
                with timer:  # from the first to the last mark: every moment of the forward is in one part
                    model(image[None], label[None], options)
                if run >= cfg.warmup:
                    parts = dict(timer.seconds)
                    parts["forward"] = sum(parts.values())
                    runs.append(parts)
                progress.step(f"{'warm-up' if run < cfg.warmup else 'timing'} per part (crop {i + 1}/{crops})")
            # Means, not medians: the parts of every run add up to its forward, so their means add up exactly.
            keys = {k for r in runs for k in r}
            per_crop.append({k: statistics.fmean(r.get(k, 0.0) for r in runs) * 1e3 for k in keys})
    for handle in handles:
        handle.remove()
    extra = ("halting rule", "token selection", "host reads")
    order = [*components(model), *(k for k in extra if k in per_crop[0]), "other"]
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
    log.info(table)
    log.info(f"profile: {path}")
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


@checked_command_line()
@hydra.main(version_base="1.3", config_path="conf", config_name="profile")
def main(cfg: DictConfig) -> None:
    run_command(profile, cfg)


if __name__ == "__main__":
    main()
