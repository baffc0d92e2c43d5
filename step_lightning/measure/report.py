"""Benchmark reports: ratios against the reference method, markdown / CSV / JSON tables and plots."""

from __future__ import annotations

import csv
from pathlib import Path

from step_lightning.core.files import atomic_write_text, write_json
from step_lightning.models.segments import SECTIONS


def add_ratios(results: dict[str, dict], reference: str, cost: str = "gflops") -> None:
    """GFLOPs ratio = reference / method (x-fold reduction) of ``cost`` (``gflops``, or ``training_gflops`` for
    training steps), throughput ratio = method / reference; their quotient is 1 when the time saved is
    proportional to the FLOPs saved."""
    ref = results[reference]
    for row in results.values():
        row["gflops_ratio"] = ref[cost] / row[cost]
        row["throughput_ratio"] = row["images_per_s"] / ref["images_per_s"]
        row["throughput_per_gflops_ratio"] = row["throughput_ratio"] / row["gflops_ratio"]


def add_engine_ratios(results: dict[str, dict], reference: str) -> None:
    """Per engine: speedup = method / reference images/s on the same engine, and speedup / GFLOPs ratio."""
    ref = results[reference]["images_per_s_by_engine"]
    for row in results.values():
        row["speedup_by_engine"] = {e: v / ref[e] for e, v in row["images_per_s_by_engine"].items()}
        row["speedup_per_gflops_by_engine"] = {e: v / row["gflops_ratio"] for e, v in row["speedup_by_engine"].items()}


COLUMNS = (
    ("method", "method", "{}"),
    ("mIoU", "mIoU", "{:.2f}"),
    ("GFLOPs", "gflops", "{:.1f}"),
    ("train GFLOPs", "training_gflops", "{:.1f}"),
    ("GFLOPs ratio", "gflops_ratio", "{:.2f}"),
    ("img/s", "images_per_s", "{:.3f}"),
    ("throughput ratio", "throughput_ratio", "{:.2f}"),
    ("throughput ratio / GFLOPs ratio", "throughput_per_gflops_ratio", "{:.2f}"),
    ("tokens", "tokens_mean", "{:.0f}"),
    ("tokens after exits", "tokens_after_exits", "{}"),
    ("halted", "halted_fraction", "{:.3f}"),
    ("peak MB", "peak_mem_mb", "{:.0f}"),
    ("fixed ms", "fixed_ms", "{:.1f}"),
    ("ops", "ops", "{}"),
    ("ops padded", "padded_ops", "{}"),
    ("host reads", "host_reads", "{}"),
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


def engines_table(results: dict[str, dict]) -> str:
    """Per method and engine: images/s, speedup over the reference method, speedup / GFLOPs ratio."""
    engines = list(next(iter(results.values())).get("images_per_s_by_engine", {}))
    head = ["method", "GFLOPs ratio"] + [f"{e} {k}" for e in engines
                                         for k in ("img/s", "img/s min-max", "speedup", "speedup/GFLOPs")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in results.items():
        cells = [name, f"{row['gflops_ratio']:.2f}"]
        for e in engines:
            low, high = row.get("images_per_s_spread", {}).get(e, (float("nan"),) * 2)
            cells += [f"{row['images_per_s_by_engine'][e]:.3f}", f"{low:.3f}-{high:.3f}",
                      f"{row['speedup_by_engine'][e]:.2f}", f"{row['speedup_per_gflops_by_engine'][e]:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def components_table(results: dict[str, dict]) -> str:
    """Per method: packed-engine ms and dispatched ops per component (the fixed ones first)."""
    rows = {n: r for n, r in results.items() if "component_ms" in r}
    if not rows:
        return ""
    present = {s for r in rows.values() for s in (*r["component_ms"], *r["component_ops"])}
    sections = [s for s in (*SECTIONS, "other") if s in present]
    head = ["method", *(f"{s} ms / ops" for s in sections), "fixed ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [f"{r['component_ms'].get(s, 0.0):.2f} / {r['component_ops'].get(s, 0)}" for s in sections]
        lines.append("| " + " | ".join([name, *cells, f"{r['fixed_ms']:.2f}"]) + " |")
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


def profile_table(results: dict[str, dict]) -> str:
    rows = [(name, engine, p) for name, row in results.items() for engine, p in row.get("profile", {}).items()]
    if not rows:
        return ""
    lines = ["| method | engine | wall ms | host ms | syncs | GPU ms | kernels | GPU idle | top kernels (ms) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, engine, p in rows:
        top = "; ".join(f"{kernel} {ms:.2f}" for kernel, ms in p.get("top_kernels", [])[:3]) or "-"
        gpu = [cell(p, key, fmt) for key, fmt in (("gpu_busy_ms", "{:.2f}"), ("kernels", "{:.0f}"),
                                                  ("gpu_idle_fraction", "{:.2f}"))]
        lines.append(f"| {name} | {engine} | {p['wall_ms']:.2f} | {p['host_ms']:.2f} | {p['syncs']:.1f} | "
                     + " | ".join(gpu) + f" | {top} |")
    return "\n".join(lines)


def split_table(results: dict[str, dict]) -> str:
    rows = {name: row["step_split_ms"] for name, row in results.items() if "step_split_ms" in row}
    if not rows:
        return ""
    lines = ["| method | forward ms | loss ms | backward ms | loss share |", "|---|---|---|---|---|"]
    for name, parts in rows.items():
        lines.append(f"| {name} | {parts['forward']:.1f} | {parts['loss']:.1f} | {parts['backward']:.1f} | "
                     f"{parts['loss'] / sum(parts.values()):.2f} |")
    return "\n".join(lines)


def write_outputs(report: dict, out_dir: Path) -> Path:
    results = report["methods"]
    setting = report["setting"]
    header = (
        f"{setting['backbone']} {setting['resolution']}x{setting['resolution']}, {setting['images']} crops of "
        f"{setting['data']}, policy={setting['policy']}, force_halt={setting['force_halt']}, "
        f"batch {setting['batch_size']}, img/s of engine {setting.get('throughput_engine', 'packed')}, "
        f"device {setting['device']} ({setting['precision']}, "
        f"sdpa {setting['sdpa']}, {setting['threads']} threads), memory: {setting['memory']}"
    )
    tables = [markdown_table(results)]
    if any("images_per_s_by_engine" in r for r in results.values()):
        tables.append("Throughput per engine (speedup = images/s over the reference method's on the same engine):\n\n"
                      + engines_table(results))
    if components := components_table(results):
        tables.append("Packed engine per component (eager, synchronised at each component; ms per forward of one "
                      "batch / dispatched non-view ops; fixed = policy + layout + embed + exits + read):\n\n"
                      + components)
    if split := split_table(results):
        tables.append("Training step parts (one pass, synchronised between parts; ms per batch; loss = the ATM "
                      "loss and its backward to the heads' outputs):\n\n" + split)
    if profiles := profile_table(results):
        tables.append("Under torch.profiler (the first batches; per batch): wall and host ms (until the last call "
                      "returned), host syncs, GPU kernel ms, kernels, GPU idle share, top kernels:\n\n" + profiles)
    atomic_write_text(out_dir / "benchmark.md", header + "\n\n" + "\n\n".join(tables) + "\n")
    with open(out_dir / "benchmark.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow([c[1] for c in COLUMNS])
        for name, row in results.items():
            writer.writerow([name if key == "method" else row.get(key) for _, key, _ in COLUMNS])
    report["plots"] = [str(p) for p in write_plots(results, out_dir, f"{setting['backbone']} {setting['resolution']}")]
    return write_json(out_dir / "benchmark.json", report)
