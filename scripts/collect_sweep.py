"""Gather the summary.json (training) or eval.json (evaluation) of every job under a Hydra multirun folder into
one table and plot.

    python scripts/collect_sweep.py multirun/2025-01-01/12-00-00 [--out DIR]

An evaluation sweep over compute budgets of one trained model gives its accuracy-cost curve:
    python -m step_lightning.eval -m ckpt_path=<run>/checkpoints/last.ckpt budget=null,0.6,0.4,0.3 halt_budget=null,0.3
jobs without a budget (the paper's thresholds) are marked apart on the plot.

Rows are sorted by GFLOPs. Each job is labelled by the settings that differ between jobs (e.g. tau for
experiment=sweep_tau, prune_heads for experiment=sweep_heads). Writes sweep.md, sweep.csv and
sweep.png (mIoU vs GFLOPs) in --out (default: the multirun folder) and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

SETTINGS = ("method", "tau", "prune_heads", "prune_threshold", "crop_size", "tokenizer", "budget", "halt_budget")
COLUMNS = ("job", "label", "mIoU", "gflops", "tokens_per_image", "halted_fraction")


def load_jobs(root: Path) -> list[dict]:
    jobs = []
    for path in sorted([*root.rglob("summary.json"), *root.rglob("eval.json")]):
        summary = json.loads(path.read_text())
        if "mIoU" not in summary:  # task=policy runs hold no segmentation results
            continue
        config = summary.get("config") or {}
        jobs.append(
            {
                "job": str(path.parent.relative_to(root)),
                "settings": {k: config.get(k) for k in SETTINGS}
                | {"backbone": (config.get("backbone") or {}).get("name")},
                "mIoU": summary["mIoU"],
                "gflops": summary.get("gflops"),
                "tokens_per_image": summary.get("tokens_per_image"),
                "halted_fraction": (summary.get("exit_stats") or {}).get("halted_fraction"),
            }
        )
    return jobs


def label_jobs(jobs: list[dict]) -> None:
    """Label = the settings whose values differ across jobs (all of them when there is one job)."""
    keys = [k for k in jobs[0]["settings"] if len({json.dumps(j["settings"][k]) for j in jobs}) > 1]
    for job in jobs:
        shown = keys or [k for k in ("method", "tau", "prune_heads") if job["settings"][k] is not None]
        job["label"] = " ".join(f"{k}={job['settings'][k]}" for k in shown)


def fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def write_outputs(jobs: list[dict], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(job[c]) for c in COLUMNS) + " |" for job in jobs]
    table = "\n".join(lines)
    (out / "sweep.md").write_text(table + "\n")
    with open(out / "sweep.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(COLUMNS)
        writer.writerows([job[c] for c in COLUMNS] for job in jobs)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    points = [j for j in jobs if j["gflops"] is not None]
    ax.plot([j["gflops"] for j in points], [j["mIoU"] for j in points], "o-", alpha=0.8)
    budgets = ("budget", "halt_budget")
    swept = any(job["settings"].get(k) is not None for job in points for k in budgets)
    thresholds = [job for job in points if swept and all(job["settings"].get(k) is None for k in budgets)]
    if thresholds:  # a budget sweep: the paper's thresholds as their own point
        ax.scatter([j["gflops"] for j in thresholds], [j["mIoU"] for j in thresholds], marker="*", s=180,
                   color="tab:red", zorder=3, label="thresholds (paper)")
        ax.legend(fontsize=8)
    for job in points:
        ax.annotate(job["label"], (job["gflops"], job["mIoU"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(xlabel="GFLOPs", ylabel="mIoU", title=out.name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=120)
    plt.close(fig)
    return table


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("multirun", type=Path, help="a Hydra multirun folder (multirun/<date>/<time>)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the multirun folder)")
    args = parser.parse_args(argv)
    jobs = load_jobs(args.multirun)
    if not jobs:
        raise SystemExit(f"no summary.json or eval.json with an mIoU under {args.multirun}; did the jobs finish?")
    jobs.sort(key=lambda j: (j["gflops"] is None, j["gflops"] or 0.0))
    label_jobs(jobs)
    out = args.out or args.multirun
    print(write_outputs(jobs, out))
    print(f"sweep: {out / 'sweep.md'}")
    return out / "sweep.md"


if __name__ == "__main__":
    main()
