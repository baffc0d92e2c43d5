"""Does physically removing halted tokens pay off? Benchmark (not a test) of EarlyExitSegmenter.

One randomly initialised ViT-B/16 model with an exit head after layer 8 (``--prune-heads 8``) is timed
twice with the same weights: without early exit (``prune_threshold=1.0``: the exit head is skipped) and
with ``force_halt`` (the speed-study knob: exactly that fraction of each image's tokens halts at the first
exit). GFLOPs come from fvcore at batch 1; latency is the median forward (tokenizer -> encoder -> heads
-> canvas on the patch grid) under ``torch.inference_mode`` after warm-up, the two settings interleaved.
``speedup / FLOP ratio`` near 1 means the exit path costs nothing beyond the FLOPs it saves.

    python scripts/bench_early_exit.py                                   # CPU: 512 and 1024, batch 1 and 4
    python scripts/bench_early_exit.py --device cuda --dtype bf16 --batch 1 8
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from step_lightning.flops import count_gflops
from step_lightning.models.early_exit import EarlyExitSegmenter
from step_lightning.models.vit import ViTEncoder

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SDPA = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--classes", type=int, default=150)
    p.add_argument("--prune-heads", type=int, nargs="+", default=[8])
    p.add_argument("--force-halt", type=float, default=0.4)
    p.add_argument("--repeats", type=int, default=5, help="timed forwards at 512 px batch 1; fewer for larger work")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-pixels", type=int, default=4 * 512 * 512,
                   help="skip (size, batch) settings with more pixels than this on CPU (time budget)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--sdpa", choices=["default", *SDPA], default="default", help="force one attention backend")
    return p.parse_args()


def build(size: int, classes: int, prune_heads: list[int]) -> EarlyExitSegmenter:
    torch.manual_seed(0)
    encoder = ViTEncoder("vit_b", img_size=size, drop_path_rate=0.0)
    return EarlyExitSegmenter(encoder, classes, prune_heads, prune_threshold=1.0).eval()


def set_exit(model: EarlyExitSegmenter, force_halt: float | None) -> None:
    model.prune_threshold, model.force_halt = 1.0, force_halt


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(model, images, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    model(images)
    synchronize(device)
    return time.perf_counter() - start


def repeats_for(args, size: int, batch: int) -> int:
    if args.device.startswith("cuda"):
        return max(args.repeats, 20)
    return max(3, round(args.repeats * 512 * 512 / (size * size * batch)))


def run_setting(model, args, size: int, batch: int, device: torch.device) -> tuple[float, float]:
    """Median latency (s) without and with early exit, interleaved so drift hits both alike."""
    images = torch.randn(batch, 3, size, size, device=device, dtype=DTYPES[args.dtype])
    times: dict[float | None, list[float]] = {None: [], args.force_halt: []}
    with torch.inference_mode():
        for setting in times:
            set_exit(model, setting)
            for _ in range(args.warmup):
                model(images)
        for _ in range(repeats_for(args, size, batch)):
            for setting, record in times.items():
                set_exit(model, setting)
                record.append(time_forward(model, images, device))
    return statistics.median(times[None]), statistics.median(times[args.force_halt])


def gflops(model, size: int, force_halt: float | None) -> float:
    set_exit(model, force_halt)
    return count_gflops(model, torch.randn(1, 3, size, size))["gflops"]


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    backend = contextlib.nullcontext() if args.sdpa == "default" else sdpa_kernel(SDPA[args.sdpa])
    print(f"ViT-B/16, {args.classes} classes, exit after layers {args.prune_heads}, force_halt={args.force_halt}; "
          f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"sdpa={args.sdpa}")
    print("| input | batch | GFLOPs no-exit | GFLOPs exit | FLOP ratio | ms no-exit | ms exit | speedup "
          "| speedup / FLOP ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        model = build(size, args.classes, args.prune_heads)
        base_flops, exit_flops = gflops(model, size, None), gflops(model, size, args.force_halt)
        model.to(device=device, dtype=DTYPES[args.dtype])
        for batch in args.batch:
            if device.type == "cpu" and size * size * batch > args.max_pixels:
                continue
            with backend:
                base_s, exit_s = run_setting(model, args, size, batch, device)
            ratio, speedup = base_flops / exit_flops, base_s / exit_s
            print(f"| {size}x{size} | {batch} | {base_flops:.1f} | {exit_flops:.1f} | {ratio:.3f} | "
                  f"{base_s * 1e3:.0f} | {exit_s * 1e3:.0f} | {speedup:.3f} | {speedup / ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
