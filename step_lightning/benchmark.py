"""Efficiency of several methods side by side: same images, same random encoder weights (paper Tables 3-6).

    python -m step_lightning.benchmark methods=[segvit,cts,dcts@6899,dcts@4999,step_single] force_halt=0.4 \
        backbone=vit_b resolution=1024 data=cityscapes data.root=<root> data.split=train num_images=2 policy=oracle

Method entries: see ``step_lightning.measure.presets`` (``segvit``, ``dcts@4999``, or a dict with overrides).
Model inputs: each image of the split is resized so its short side is ``resolution``, its label resized to it
with nearest neighbour, then cut into ``resolution`` x ``resolution`` crops (``crop=center|tiles``).

Measured per method: GFLOPs (fvcore, batch 1, policy included: each crop's from its token counts,
``ForwardCost``, exact; a static forward's padding counted as computed) and the training GFLOPs (forward +
backward), throughput (``repeats`` timed passes over all crops in batches of ``batch_size`` after ``warmup``
passes, methods and engines alternating round by round so drift hits all alike; median images/s with the
spread; CUDA synchronised) for each of ``engines``: ``padded`` (the padded store), ``packed`` (the packed store,
eager) and ``fast`` (packed + CUDA graphs per bucket and the fused policy; on CPU eager packed + fused policy),
or with ``mode=train`` of training steps (forward, ATM loss, backward; and one pass timing these parts apart),
extra memory of one forward (or step), tokens after the tokenizer and after each exit, halted fraction, mIoU on
the crops for methods given a checkpoint, (``profile``, once the tables are written) host time, host syncs and,
on CUDA, kernels, GPU busy time and idle share and the top kernels under torch.profiler, and (``components``) the
packed store's time and dispatched ops per component
(policy, layout, embed, blocks, heads, exits, read, output; ``step_lightning.measure.components``), of which
the fixed part (policy, layout, embed, exits, reads) does not shrink with the tokens.
Writes benchmark.json/.md/.csv and plots; the last line printed is ``benchmark: <json path>``.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from step_lightning.cli import checked_command_line, run_command
from step_lightning.config.checks import check_config
from step_lightning.core import PATCH_SIZE, ConfigError
from step_lightning.lit.checkpoint import load_module
from step_lightning.measure.components import component_ops, component_times, fixed_ms
from step_lightning.measure.gflops import ForwardCost, training_gflops
from step_lightning.measure.inputs import sample_crops
from step_lightning.measure.memory import forward_memory_mb
from step_lightning.measure.presets import (
    ENGINES,
    build_models,
    engine_forward,
    method_configs,
    training_split,
    training_step,
)
from step_lightning.measure.progress import Progress
from step_lightning.measure.report import add_engine_ratios, add_ratios, write_outputs
from step_lightning.measure.statistics import token_statistics
from step_lightning.measure.timing import DTYPES, profile_pass, resolve_device, sdpa_context, time_passes
from step_lightning.metrics import SegMetrics
from step_lightning.models.engine import InferenceOptions, computed_counts
from step_lightning.models.loss import ATMLoss
from step_lightning.models.packed import varlen_attn

log = logging.getLogger(__name__)


def benchmark(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict:
    """Measure ``cfg.methods``; ``overrides`` are the command line's (each method's config is composed
    from them)."""
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.batch_size < 1 or cfg.repeats < 1:
        raise ConfigError(f"batch_size={cfg.batch_size} and repeats={cfg.repeats} must be >= 1.")
    device = resolve_device(cfg.device)
    dtype = DTYPES[cfg.precision]
    images, labels, names, datamodule = sample_crops(cfg)
    checkpoints = cfg.get("checkpoints") or {}
    configs = method_configs("benchmark", overrides, cfg.methods, str(cfg.paths.output_dir))
    unknown = sorted(set(checkpoints) - set(configs))
    if unknown:
        raise ConfigError(f"checkpoints names {unknown}, not among the method entries {sorted(configs)}.")
    models = build_models(configs, datamodule.num_classes, datamodule.ignore_index)
    for name, path in checkpoints.items():  # trained models, rebuilt from their checkpoints alone
        models[name] = load_module(path, key=f"checkpoints.{name}").model
    options = {name: InferenceOptions.from_config(configs[name]) for name in models}
    engines = list(cfg.get("engines") or ["packed"])
    if unknown := sorted(set(engines) - set(ENGINES)):
        raise ConfigError(f"engines={engines}: {unknown} not among {list(ENGINES)}.")
    training = cfg.get("mode", "inference") == "train"
    if cfg.get("mode", "inference") not in ("inference", "train"):
        raise ConfigError(f"mode={cfg.mode} must be 'inference' or 'train'.")
    results: dict[str, dict] = {}
    batch_count = -(-len(images) // cfg.batch_size)
    components = cfg.get("components", True) and not training
    # Forward passes: token statistics and a GFLOPs trace per method, memory, components, then the timed passes.
    timed = 1 if training else len(engines)
    total = len(models) * (len(images) + 1 + 1 + (cfg.repeats + 3 if components else 0))
    total += len(models) * (timed * (cfg.warmup + cfg.repeats) + training) * batch_count
    x, y = images.to(device), labels.to(device)
    with Progress("benchmark", total) as progress:
        for name, model in models.items():  # fvcore traces with the JIT, which inference_mode would break
            model.to(device)
            metrics = SegMetrics(datamodule.num_classes, datamodule.ignore_index) if checkpoints.get(name) else None
            stats = token_statistics(model, x, y, metrics, options[name])
            progress.step(f"tokens {name}", len(images))
            # exact per crop from its token counts (tests/test_measure_gflops_supertokens.py), one full trace
            cost = ForwardCost(model, x[:1], y[:1], options[name])
            progress.step(f"GFLOPs {name}")
            grid = (x.shape[-2] // PATCH_SIZE, x.shape[-1] // PATCH_SIZE)
            per_image = [cost(*computed_counts(model, options[name], grid, int(t), [int(v) for v in a]))
                         for t, a in zip(stats.pop("tokens_per_image"), stats.pop("active_after_per_image"),
                                         strict=True)]
            results[name] = {
                "gflops": statistics.fmean(per_image),
                "gflops_per_image": per_image,
                "training_gflops": statistics.fmean(training_gflops(g, cost.policy) for g in per_image),
                **stats,
            }
            model.cpu()
        x = x.to(dtype)
        batches = [(x[i : i + cfg.batch_size], y[i : i + cfg.batch_size]) for i in range(0, len(x), cfg.batch_size)]
        if training:
            seconds, timed_steps = time_training(cfg, models, options, results, batches, device, dtype,
                                                 datamodule, progress)
        else:
            seconds, timed_steps = time_inference(cfg, models, options, results, batches, device, dtype, engines,
                                                  progress)
    for (name, engine), passes in seconds.items():
        rates = [len(x) / s for s in passes]
        results[name].setdefault("images_per_s_by_engine", {})[engine] = statistics.median(rates)
        results[name].setdefault("images_per_s_spread", {})[engine] = [min(rates), max(rates)]
        results[name].setdefault("pass_seconds", {})[engine] = passes
    main_engine = "train" if training else ("fast" if "fast" in engines else engines[-1])
    for row in results.values():
        row["images_per_s"] = row["images_per_s_by_engine"][main_engine]
    reference = "segvit" if "segvit" in results else next(iter(results))
    add_ratios(results, reference, "training_gflops" if training else "gflops")
    add_engine_ratios(results, reference)
    memory = (
        "CUDA max_memory_allocated during the forward minus allocated before"
        if device.type == "cuda"
        else "CPU peak RSS (VmHWM) during the forward minus RSS before"
    )
    report = {
        "setting": {
            "backbone": cfg.backbone.name,
            "resolution": cfg.resolution,
            "data": cfg.data.name,
            "split": cfg.data.get("split"),
            "crop": cfg.crop,
            "images": len(images),
            "policy": cfg.policy,
            "force_halt": cfg.force_halt,
            "batch_size": cfg.batch_size,
            "mode": "train" if training else "inference",
            "engines": ["train"] if training else engines,
            "throughput_engine": main_engine,
            "warmup": cfg.warmup,
            "repeats": cfg.repeats,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "precision": cfg.precision,
            "sdpa": cfg.sdpa,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "attention": "varlen (flash) for packed rows" if device.type == "cuda" and varlen_attn is not None
            and dtype != torch.float32 else "scaled_dot_product_attention (dense view)",
            "memory": memory,
            "reference": reference,
        },
        "images": names,
        "methods": results,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    out_dir = Path(cfg.paths.output_dir)
    path = write_outputs(report, out_dir)
    if cfg.get("profile"):  # after the tables are written: a profile cut short loses nothing else
        with sdpa_context(cfg.sdpa), torch.inference_mode(not training):
            for (name, engine), step in timed_steps.items():
                profiled = profile_pass(step, batches[: cfg.profile_batches], device)
                results[name].setdefault("profile", {})[engine] = profiled
                path = write_outputs(report, out_dir)
    log.info(Path(cfg.paths.output_dir, "benchmark.md").read_text())
    log.info(f"benchmark: {path}")
    return report


def time_inference(cfg, models, options, results, batches, device, dtype, engines, progress: Progress):
    """Peak memory, per-component times and dispatched ops of each method's forward; the seconds of every
    timed pass per (method, engine), methods and engines alternating round by round, and the timed forwards."""
    with torch.inference_mode(), sdpa_context(cfg.sdpa):
        for name, model in models.items():
            model.to(device, dtype)
            forward = engine_forward(model, options[name], "packed")
            results[name]["peak_mem_mb"] = forward_memory_mb(forward, *batches[0])
            progress.step(f"memory {name}")
            if cfg.get("components", True):
                times = component_times(model, *batches[0], device, cfg.repeats, options[name])
                ops, reads = component_ops(model, *batches[0], options[name])
                padded_ops, _ = component_ops(model, *batches[0], options[name], engine="padded")
                results[name] |= {"component_ms": times, "fixed_ms": fixed_ms(times), "component_ops": ops,
                                  "ops": sum(ops.values()), "padded_ops": sum(padded_ops.values()),
                                  "host_reads": reads}
                progress.step(f"components {name}", cfg.repeats + 3)
        forwards = {(name, engine): engine_forward(model, options[name], engine) for name, model in models.items()
                    for engine in engines}
        return time_passes(forwards, batches, cfg, device, done=progress.step), forwards


def time_training(cfg, models, options, results, batches, device, dtype, datamodule, progress: Progress):
    """Peak memory, the ms of a step's parts (``training_split``) and the seconds of every timed pass of training
    steps (forward, ATM loss, backward; weights in fp32 under autocast for bf16/fp16) per method, methods
    alternating round by round; and the timed steps. ``force_halt`` applies in training too: the benchmark's
    models take its rule."""
    criterion = ATMLoss(datamodule.num_classes, datamodule.ignore_index)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    steps = {}
    batches = [(images.float(), labels) for images, labels in batches]
    with sdpa_context(cfg.sdpa):
        for name, model in models.items():
            model.halting = options[name].rule(model)
            model.to(device).train()
            steps[(name, "train")] = training_step(model, criterion, autocast)
            results[name]["peak_mem_mb"] = forward_memory_mb(steps[(name, "train")], *batches[0])
            progress.step(f"memory {name}")
        seconds = time_passes(steps, batches, cfg, device, done=progress.step)
        for name, model in models.items():
            results[name]["step_split_ms"] = training_split(model, criterion, autocast, batches, device)
            progress.step(f"step parts {name}", len(batches))
    return seconds, steps


@checked_command_line()
@hydra.main(version_base="1.3", config_path="conf", config_name="benchmark")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    run_command(lambda c: benchmark(c, HydraConfig.get().overrides.task), cfg)


if __name__ == "__main__":
    main()
