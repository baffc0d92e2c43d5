"""The ATM mask losses' cost (benchmark, not a test): ``ATMLoss`` (``UpsampledMaskTerms``: matrix upsampling,
closed-form gradient, nothing full-resolution saved) against their autograd formulation (``autograd_mask_losses``
below: F.interpolate + torchvision's sigmoid_focal_loss + dice; tests/test_models_loss.py holds the loss equal to
it), forward + backward on the same labels and logits, rounds alternating; median seconds with the spread, their
ratio, and each one's peak memory (CUDA: peak allocated; CPU: peak RSS in a fresh process each).

    python scripts/bench_loss.py --labels ../shared/realdata/cityscapes/gtFine/train/*/*_labelTrainIds.png
    python scripts/bench_loss.py --device cuda --size 1024 --batch 2 --outputs 3      # synthetic scenes

Labels are cropped (or synthetic scenes drawn) at ``--size``; logits are random on the patch grid (size / 16).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from step_lightning.data.io import read_label
from step_lightning.data.synthetic import make_scene
from step_lightning.models.loss import ATMLoss, global_mean_count, present_classes


def autograd_mask_losses(mask_logits, labels, pairs, alpha, gamma, ignore=255):
    """The mask losses written with autograd: F.interpolate to the labels, torchvision's focal loss, dice."""
    from torchvision.ops import sigmoid_focal_loss

    img, cls = pairs.unbind(1)
    pred = F.interpolate(mask_logits[img, cls][:, None], size=labels.shape[-2:], mode="bilinear",
                         align_corners=False)[:, 0]
    valid = (labels[img] != ignore).float()
    target = (labels[img] == cls[:, None, None]).float()
    focal = sigmoid_focal_loss(pred, target, alpha=alpha, gamma=gamma, reduction="none")
    focal = ((focal * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp(min=1)).sum()
    prob = pred.sigmoid() * valid
    dice = 1 - (2 * (prob * target).flatten(1).sum(1) + 1) / (prob.flatten(1).sum(1) + target.flatten(1).sum(1) + 1)
    return focal, dice.sum()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", nargs="*", default=[], help="label PNGs (the first --batch are used)")
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--outputs", type=int, default=3, help="head outputs the loss sums over")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", choices=["new", "autograd"], help=argparse.SUPPRESS)  # one peak-memory probe
    return p.parse_args(argv)


def inputs(args) -> tuple[torch.Tensor, list[torch.Tensor]]:
    if args.labels:
        labels = [torch.from_numpy(read_label(p).astype(np.int64))[: args.size, : args.size]
                  for p in args.labels[: args.batch]]
    else:
        labels = [torch.from_numpy(make_scene(seed, args.size, args.classes, 5)[1].astype(np.int64))
                  for seed in range(args.batch)]
    torch.manual_seed(0)
    grid = args.size // 16
    logits = [torch.randn(args.batch, args.classes, grid, grid, device=args.device, requires_grad=True)
              for _ in range(args.outputs)]
    return torch.stack(labels).to(args.device), logits


def steps(args, labels, logits) -> dict:
    criterion = ATMLoss(args.classes, class_weight=0.0)
    pairs = present_classes(labels, args.classes).nonzero()
    count = global_mean_count(torch.tensor(float(len(pairs)), device=labels.device))

    def new():
        zero = torch.zeros(args.batch, args.classes, args.classes + 1, device=labels.device)
        criterion([{"class_logits": zero, "mask_logits": m} for m in logits], labels)["loss"].backward()

    def autograd():
        total = 0.0
        for m in logits:
            focal, dice = autograd_mask_losses(m, labels, pairs, criterion.focal_alpha, criterion.focal_gamma)
            total = total + (criterion.focal_weight * focal + criterion.dice_weight * dice) / count
        total.backward()

    return {"new": new, "autograd": autograd}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_mb(args, argv: list[str], name: str) -> float:
    """Peak memory of one step of ``name``: CUDA peak allocated, or (CPU) the peak RSS growth in a fresh process
    run with the same ``argv``."""
    if args.device.startswith("cuda"):
        labels, logits = inputs(args)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        steps(args, labels, logits)[name]()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    command = [sys.executable, __file__, *argv, "--only", name]
    return float(subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()[-1])


def rss_peak_kb() -> int:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    labels, logits = inputs(args)
    if args.only:  # CPU peak probe: reset the high-water mark, run once, print the growth
        Path("/proc/self/clear_refs").write_text("5")
        start = rss_peak_kb()
        steps(args, labels, logits)[args.only]()
        print((rss_peak_kb() - start) / 1024)
        return
    pairs = int(present_classes(labels, args.classes).sum())
    timed = steps(args, labels, logits)
    seconds: dict[str, list[float]] = {name: [] for name in timed}
    for step in timed.values():  # warm-up
        step()
    for _ in range(args.rounds):
        for name, step in timed.items():
            synchronize(args.device)
            start = time.perf_counter()
            step()
            synchronize(args.device)
            seconds[name].append(time.perf_counter() - start)
    print(f"{args.batch} labels at {args.size}x{args.size}, {pairs} (image, class) pairs, {args.outputs} outputs, "
          f"{args.device}; forward + backward, median of {args.rounds} alternating rounds")
    for name, times in seconds.items():
        print(f"{name:9s} {statistics.median(times):.3f} s ({min(times):.3f}-{max(times):.3f}), "
              f"peak {peak_mb(args, argv, name):.0f} MB")
    ratios = [old / new for old, new in zip(seconds["autograd"], seconds["new"], strict=True)]
    print(f"autograd / new: {statistics.median(ratios):.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
