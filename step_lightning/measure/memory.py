"""Memory one forward needs beyond what is resident before it (CUDA peak allocated, or CPU peak RSS)."""

from __future__ import annotations

import ctypes
import gc

import torch

from step_lightning.measure.timing import synchronize


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))


def _release_free_heap() -> None:
    """Give glibc's free heap memory back to the OS. Freed tensors (e.g. of the fvcore trace) otherwise stay
    resident and the measured forward reuses them without any RSS growth: the delta would read ~0.
    A fixed mmap threshold (M_MMAP_THRESHOLD = 128 KiB, disabling glibc's dynamic one) keeps large
    tensors out of the heap from then on."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)
    libc.malloc_trim(0)


def forward_memory_mb(forward, images: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Memory one call of ``forward(images, labels)`` (a forward, or a training step) needs beyond what is
    resident before it (weights, inputs): CUDA peak allocated, or CPU peak RSS (None where
    /proc/self/clear_refs cannot reset the peak)."""
    device = images.device
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        forward(images, labels)
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        _release_free_heap()
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM (peak RSS) to the current RSS
        base = _rss_kb("VmRSS:")
        forward(images, labels)
        return (_rss_kb("VmHWM:") - base) / 1024
    except OSError:  # no /proc/self/clear_refs or no glibc
        return None
