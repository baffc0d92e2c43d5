"""Wall-clock measurement: device choice, synchronisation, interleaved timed passes, attention backend."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
from omegaconf import DictConfig

from step_lightning.core import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_passes(models: dict, batches: list, cfg: DictConfig, device,
                done: Callable[[str, int], None] | None = None) -> dict:
    """Seconds per pass over all batches, per method (any key -> ``forward(images, labels)``, e.g. a model);
    passes interleaved across methods. ``done(what, forwards)`` hears of each pass (progress)."""
    def label(key) -> str:
        return " ".join(map(str, key)) if isinstance(key, tuple) else str(key)

    for key, model in models.items():
        for _ in range(cfg.warmup):
            for images, labels in batches:
                model(images, labels)
            if done:
                done(f"warm-up {label(key)}", len(batches))
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for repeat in range(cfg.repeats):
        for name, model in models.items():
            synchronize(device)
            start = time.perf_counter()
            for images, labels in batches:
                model(images, labels)
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
            if done:
                done(f"timing {label(name)} (pass {repeat + 1}/{cfg.repeats})", len(batches))
    return seconds


def sdpa_context(kind: str):
    if kind == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    if kind not in backends:
        raise ConfigError(f"sdpa={kind} must be default or one of {sorted(backends)}.")
    return sdpa_kernel(backends[kind])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def profile_pass(forward, batches: list, device: torch.device) -> dict:
    """One pass of ``forward`` over ``batches`` under torch.profiler (CUDA): wall ms per batch, GPU kernel ms per
    batch, kernels per batch and the GPU's idle share of the wall time (launch gaps, host reads, Python)."""
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for images, labels in batches:
            forward(images, labels)
        synchronize(device)
        wall = time.perf_counter() - start
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.device_time for e in kernels)  # one stream: kernels do not overlap
    count = len(batches)
    return {"wall_ms": wall * 1e3 / count, "gpu_busy_ms": busy_us / 1e3 / count, "kernels": len(kernels) / count,
            "gpu_idle_fraction": max(0.0, 1.0 - busy_us / 1e6 / wall)}
