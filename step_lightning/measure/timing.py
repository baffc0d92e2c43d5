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


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (or None): the first CUDA device when there is one, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={device} is not a device; use auto, cpu, cuda or cuda:<index>.") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device}: no CUDA device is available here; use device=cpu or device=auto.")
    return resolved


# CUDA runtime calls on which the host waits for the GPU (a host read is a copy followed by one of these).
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def profile_pass(forward, batches: list, device: torch.device) -> dict:
    """One pass of ``forward`` over ``batches`` under torch.profiler, summarised per batch by ``profile_summary``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for images, labels in batches:
            forward(images, labels)
        enqueued = time.perf_counter()
        synchronize(device)
        wall = time.perf_counter() - start
    gpu = device.type == "cuda"
    return profile_summary(prof.events(), wall, enqueued - start, len(batches), gpu, final_syncs=int(gpu))


def profile_summary(events, wall_s: float, host_s: float, batches: int, gpu: bool, final_syncs: int = 0,
                    top: int = 8) -> dict:
    """Per batch: wall ms; host ms (until the last call returned: about wall when the host is the bottleneck or
    waits on syncs, much less when the GPU is); host syncs (``SYNC_CALLS``, less the pass's ``final_syncs``);
    with ``gpu``: CUDA kernels, their ms, the GPU's idle share of the wall time and the ``top`` kernels by time."""
    kernels: dict[str, float] = {}
    launches = syncs = 0
    for event in events:
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name] = kernels.get(event.name, 0.0) + event.device_time
            launches += 1
        elif event.name in SYNC_CALLS:
            syncs += 1
    busy_us = sum(kernels.values())  # one stream: kernels do not overlap
    top_kernels = sorted(kernels.items(), key=lambda item: -item[1])[:top]
    summary = {"wall_ms": wall_s * 1e3 / batches, "host_ms": host_s * 1e3 / batches,
               "syncs": (syncs - final_syncs) / batches}
    if gpu:
        summary |= {"kernels": launches / batches, "gpu_busy_ms": busy_us / 1e3 / batches,
                    "gpu_idle_fraction": max(0.0, 1.0 - busy_us / 1e6 / wall_s),
                    "top_kernels": [[name[:80], us / 1e3 / batches] for name, us in top_kernels]}
    return summary
