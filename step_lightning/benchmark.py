"""Efficiency of several methods side by side: same images, same random encoder weights (paper Tables 3-6).

    python -m step_lightning.benchmark methods=[segvit,cts,dcts@6899,dcts@4999,step_single] force_halt=0.4 \
        backbone=vit_b resolution=1024 data=cityscapes data.root=<root> data.split=train num_images=2 policy=oracle

Method entries: see ``step_lightning.measure.presets`` (``segvit``, ``dcts@4999``, or a dict with overrides).
Model inputs: each image of the split is resized so its short side is ``resolution``, its label resized to it
with nearest neighbour, then cut into ``resolution`` x ``resolution`` crops (``crop=center|tiles``).

Measured per method: GFLOPs (fvcore, batch 1, averaged over the crops, policy included), throughput
(``repeats`` timed passes over all crops in batches of ``batch_size`` after ``warmup`` passes, methods
interleaved so drift hits all alike; median images/s; CUDA synchronised), extra memory of one forward,
tokens after the tokenizer and after each exit, halted fraction, and mIoU on the crops for methods given a
checkpoint. Writes benchmark.json/.md/.csv and plots; the last line printed is ``benchmark: <json path>``.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from step_lightning.cli import run_command
from step_lightning.config.checks import check_config
from step_lightning.core import ConfigError
from step_lightning.lit.checkpoint import load_module
from step_lightning.measure.gflops import gflops_per_image
from step_lightning.measure.inputs import sample_crops
from step_lightning.measure.memory import forward_memory_mb
from step_lightning.measure.presets import build_models, method_configs
from step_lightning.measure.report import add_ratios, write_outputs
from step_lightning.measure.statistics import token_statistics
from step_lightning.measure.timing import DTYPES, resolve_device, sdpa_context, time_passes
from step_lightning.metrics import SegMetrics

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
        models[name].force_halt = configs[name].get("force_halt")
    results: dict[str, dict] = {}
    for name, model in models.items():  # fvcore traces with the JIT, which inference_mode would break
        per_image = gflops_per_image(model, images, labels)
        metrics = SegMetrics(datamodule.num_classes, datamodule.ignore_index) if checkpoints.get(name) else None
        results[name] = {
            "gflops": statistics.fmean(per_image),
            "gflops_per_image": per_image,
            **token_statistics(model, images, labels, metrics),
        }
    with torch.inference_mode():
        x, y = images.to(device, dtype), labels.to(device)
        batches = [(x[i : i + cfg.batch_size], y[i : i + cfg.batch_size]) for i in range(0, len(x), cfg.batch_size)]
        with sdpa_context(cfg.sdpa):
            for name, model in models.items():
                model.to(device, dtype)
                results[name]["peak_mem_mb"] = forward_memory_mb(model, *batches[0])
            seconds = time_passes(models, batches, cfg, device)
    for name, passes in seconds.items():
        results[name]["images_per_s"] = statistics.median(len(x) / s for s in passes)
        results[name]["pass_seconds"] = passes
    reference = "segvit" if "segvit" in results else next(iter(results))
    add_ratios(results, reference)
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
            "warmup": cfg.warmup,
            "repeats": cfg.repeats,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "precision": cfg.precision,
            "sdpa": cfg.sdpa,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "memory": memory,
            "reference": reference,
        },
        "images": names,
        "methods": results,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    path = write_outputs(report, Path(cfg.paths.output_dir))
    log.info(Path(cfg.paths.output_dir, "benchmark.md").read_text())
    log.info(f"benchmark: {path}")
    return report


@hydra.main(version_base="1.3", config_path="conf", config_name="benchmark")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    run_command(lambda c: benchmark(c, HydraConfig.get().overrides.task), cfg)


if __name__ == "__main__":
    main()
