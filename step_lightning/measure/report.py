"""Benchmark reports: ratios against the reference method, markdown / CSV / JSON tables and plots."""

from __future__ import annotations

import csv
from pathlib import Path

from step_lightning.core.files import atomic_write_text, write_json


def add_ratios(results: dict[str, dict], reference: str) -> None:
    """GFLOPs ratio = reference / method (x-fold reduction), throughput ratio = method / reference;
    their quotient is 1 when the time saved is proportional to the FLOPs saved."""
    ref = results[reference]
    for row in results.values():
        row["gflops_ratio"] = ref["gflops"] / row["gflops"]
        row["throughput_ratio"] = row["images_per_s"] / ref["images_per_s"]
        row["throughput_per_gflops_ratio"] = row["throughput_ratio"] / row["gflops_ratio"]


COLUMNS = (
    ("method", "method", "{}"),
    ("mIoU", "mIoU", "{:.2f}"),
    ("GFLOPs", "gflops", "{:.1f}"),
    ("GFLOPs ratio", "gflops_ratio", "{:.2f}"),
    ("img/s", "images_per_s", "{:.3f}"),
    ("throughput ratio", "throughput_ratio", "{:.2f}"),
    ("throughput ratio / GFLOPs ratio", "throughput_per_gflops_ratio", "{:.2f}"),
    ("tokens", "tokens_mean", "{:.0f}"),
    ("tokens after exits", "tokens_after_exits", "{}"),
    ("halted", "halted_fraction", "{:.3f}"),
    ("peak MB", "peak_mem_mb", "{:.0f}"),
)


def cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if key == "tokens_after_exits":
        return "/".join(f"{v:.0f}" for v in value) or "-"
    return fmt.format(value)


def markdown_table(results: dict[str, dict]) -> str:
    columns = [c for c in COLUMNS if c[1] != "mIoU" or any("mIoU" in r for r in results.values())]
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    for name, row in results.items():
        lines.append("| " + " | ".join(cell({**row, "method": name}, key, fmt) for _, key, fmt in columns) + " |")
    return "\n".join(lines)


def write_plots(results: dict[str, dict], out_dir: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [("gflops", "images_per_s", "GFLOPs", "images/s", "throughput_vs_gflops.png")]
    if any("mIoU" in r for r in results.values()):
        pairs.append(("gflops", "mIoU", "GFLOPs", "mIoU", "miou_vs_gflops.png"))
    paths = []
    for xkey, ykey, xlabel, ylabel, filename in pairs:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for name, row in results.items():
            if row.get(ykey) is None:
                continue
            ax.scatter(row[xkey], row[ykey])
            ax.annotate(name, (row[xkey], row[ykey]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(out_dir / filename)
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def write_outputs(report: dict, out_dir: Path) -> Path:
    results = report["methods"]
    setting = report["setting"]
    header = (
        f"{setting['backbone']} {setting['resolution']}x{setting['resolution']}, {setting['images']} crops of "
        f"{setting['data']}, policy={setting['policy']}, force_halt={setting['force_halt']}, "
        f"batch {setting['batch_size']}, device {setting['device']} ({setting['precision']}, "
        f"sdpa {setting['sdpa']}, {setting['threads']} threads), memory: {setting['memory']}"
    )
    atomic_write_text(out_dir / "benchmark.md", f"{header}\n\n{markdown_table(results)}\n")
    with open(out_dir / "benchmark.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow([c[1] for c in COLUMNS])
        for name, row in results.items():
            writer.writerow([name if key == "method" else row.get(key) for _, key, _ in COLUMNS])
    report["plots"] = [str(p) for p in write_plots(results, out_dir, f"{setting['backbone']} {setting['resolution']}")]
    return write_json(out_dir / "benchmark.json", report)
