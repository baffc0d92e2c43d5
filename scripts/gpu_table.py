"""The GPU speed tables and the speed targets' verdicts from one ``scripts/gpu_check.sh`` folder.

    python scripts/gpu_table.py outputs/gpu-check/<time> [--out summary.md]

Reads every ``<cell>/benchmark.json`` (or ``<cell>.json``, as committed under ``results/``): inference cells
give "GFLOPs ratio / speedup / speedup per GFLOPs ratio" per method and engine, training cells the same for
training steps with peak memory and the loss's share of a step. Then each target of the speed table is checked
on the cells that hold its methods (fast vs fast, eager vs eager):

- every reduced method faster than SegViT;
- dCTS and STEP at >= 0.85 of their GFLOPs ratio at ViT-L 1024 (batch 1 and 8) and ViT-B 1024 batch 8;
- STEP faster than dCTS wherever it has >= 15 % fewer GFLOPs;
- a budget row at least as fast per GFLOP as its threshold row (``dcts_budget`` vs ``dcts``,
  ``step_single_budget`` vs ``step_single``);
- training: dCTS and STEP steps faster than SegViT's by >= 0.8 of the training-GFLOPs ratio at ViT-L 1024, with
  lower peak memory.
Prints the Markdown (tables, then one line per target and cell: met / missed with the figures).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from step_lightning.measure.presets import parse_method

RATIO_TARGET = 0.85
TRAIN_RATIO_TARGET = 0.8
FEWER_GFLOPS = 1.15  # STEP must beat dCTS where dCTS costs at least this many times STEP's GFLOPs
BUDGET_PAIRS = (("dcts_budget", "dcts"), ("step_single_budget", "step_single"))
STEP_PRESETS = ("step", "step_single")


def load_cells(root: Path) -> dict[str, dict]:
    """Cell name -> benchmark report, for ``<cell>/benchmark.json`` and ``<cell>.json`` files under ``root``."""
    paths = sorted(root.glob("*/benchmark.json")) + sorted(root.glob("*.json"))
    cells = {}
    for path in paths:
        report = json.loads(path.read_text())
        if "methods" in report and "setting" in report:
            cells[path.parent.name if path.name == "benchmark.json" else path.stem] = report
    return cells


def presets(report: dict) -> dict[str, str]:
    """Method entry name -> its preset (``segvit``, ``dcts``, ``step``, ...)."""
    return {spec["name"]: spec["method"] for spec in map(parse_method, report["config"]["methods"])}


def cell_label(report: dict) -> str:
    s = report["setting"]
    kind = "train " if s["mode"] == "train" else ""
    return f"{kind}ViT-{s['backbone'].rpartition('_')[2].upper()} {s['resolution']} b{s['batch_size']}"


def engines_of(report: dict) -> list[str]:
    return list(report["setting"]["engines"])


def table(cells: dict[str, dict], mode: str) -> str:
    """Methods x (cell, engine) of one ``mode`` (inference | train): the reference's img/s, the others' GFLOPs
    ratio / speedup / speedup per GFLOPs ratio; peak MB; with timed step parts, the loss's share of a step."""
    reports = [r for r in cells.values() if r["setting"]["mode"] == mode]
    if not reports:
        return ""
    columns = [(r, e) for r in reports for e in engines_of(r)]
    methods = list(dict.fromkeys(m for r in reports for m in r["methods"]))
    head = ["method"] + [cell_label(r) + ("" if mode == "train" else f" {e}") for r, e in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in methods:
        texts = []
        for report, engine in columns:
            row = report["methods"].get(name)
            if row is None:
                texts.append("-")
                continue
            split = row.get("step_split_ms")
            extra = f"{row['peak_mem_mb']:.0f} MB" + (f", loss {split['loss'] / sum(split.values()):.2f}" if split
                                                      else "")
            if name == report["setting"]["reference"]:
                texts.append(f"{row['images_per_s_by_engine'][engine]:.2f} img/s, {extra}")
            else:
                texts.append(f"{row['gflops_ratio']:.2f} / {row['speedup_by_engine'][engine]:.2f} / "
                             f"{row['speedup_per_gflops_by_engine'][engine]:.2f}, {extra}")
        lines.append("| " + " | ".join([name, *texts]) + " |")
    return "\n".join(lines)


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def check_targets(cells: dict[str, dict]) -> list[str]:
    """One line per target and cell (and engine): met / MISSED with its figures."""
    lines = []
    for report in cells.values():
        s, rows, kinds = report["setting"], report["methods"], presets(report)
        label, reference = cell_label(report), s["reference"]
        if s["mode"] == "train":
            if (s["backbone"], s["resolution"]) != ("vit_l", 1024):
                continue
            for name, row in rows.items():
                if kinds.get(name) not in ("dcts", *STEP_PRESETS):
                    continue
                ok = (row["throughput_per_gflops_ratio"] >= TRAIN_RATIO_TARGET
                      and row["peak_mem_mb"] < rows[reference]["peak_mem_mb"])
                lines.append(f"- {verdict(ok)}: {label} {name} training speedup {row['throughput_ratio']:.2f} = "
                             f"{row['throughput_per_gflops_ratio']:.2f} of its training-GFLOPs ratio "
                             f"(>= {TRAIN_RATIO_TARGET}), peak {row['peak_mem_mb']:.0f} MB vs "
                             f"{rows[reference]['peak_mem_mb']:.0f} MB")
            continue
        ratio_cell = (s["backbone"], s["resolution"]) == ("vit_l", 1024) or (
            (s["backbone"], s["resolution"], s["batch_size"]) == ("vit_b", 1024, 8))
        for engine in engines_of(report):
            speed = {name: row["speedup_by_engine"][engine] for name, row in rows.items()}
            slower = [f"{name} {speed[name]:.2f}" for name in rows if name != reference and speed[name] <= 1]
            lines.append(f"- {verdict(not slower)}: {label} {engine} every method faster than {reference}"
                         + (f" (not: {', '.join(slower)})" if slower else ""))
            if ratio_cell:
                for name, row in rows.items():
                    if name in ("dcts", *STEP_PRESETS):
                        value = row["speedup_per_gflops_by_engine"][engine]
                        lines.append(f"- {verdict(value >= RATIO_TARGET)}: {label} {engine} {name} speedup "
                                     f"{speed[name]:.2f} = {value:.2f} of its GFLOPs ratio (>= {RATIO_TARGET})")
            if "dcts" in rows:
                for name in (n for n in rows if n in STEP_PRESETS):
                    fewer = rows["dcts"]["gflops"] / rows[name]["gflops"]
                    if fewer >= FEWER_GFLOPS:
                        lines.append(f"- {verdict(speed[name] > speed['dcts'])}: {label} {engine} {name} "
                                     f"({fewer:.2f}x fewer GFLOPs than dcts) speedup {speed[name]:.2f} vs dcts "
                                     f"{speed['dcts']:.2f}")
            for budget, threshold in BUDGET_PAIRS:
                if budget in rows and threshold in rows:
                    per = {n: rows[n]["speedup_per_gflops_by_engine"][engine] for n in (budget, threshold)}
                    lines.append(f"- {verdict(per[budget] >= per[threshold])}: {label} {engine} {budget} per "
                                 f"GFLOP {per[budget]:.2f} vs {threshold} {per[threshold]:.2f}")
    return lines


def environment(cells: dict[str, dict]) -> str:
    s = next(iter(cells.values()))["setting"]
    return (f"{s['device']}, torch {s['torch']}, CUDA {s['cuda']}, cuDNN {s['cudnn']}, attention: {s['attention']}, "
            f"{s['precision']}, {s['images']} crops of {s['data']} ({s['policy']} layouts), "
            f"force_halt={s['force_halt']}")


def summary(root: Path) -> str:
    cells = load_cells(root)
    if not cells:
        raise SystemExit(f"error: no benchmark.json under {root}; give the folder scripts/gpu_check.sh wrote.")
    parts = [environment(cells)]
    if inference := table(cells, "inference"):
        parts.append("Inference (reference: img/s and peak MB; others: GFLOPs ratio / speedup / speedup per GFLOPs "
                     "ratio, peak MB):\n\n" + inference)
    if training := table(cells, "train"):
        parts.append("Training steps (the same, with the loss's share of a step):\n\n" + training)
    parts.append("Targets:\n\n" + "\n".join(check_targets(cells)))
    return "\n\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the folder scripts/gpu_check.sh wrote (or a results/ folder)")
    parser.add_argument("--out", type=Path, help="also write the Markdown there")
    args = parser.parse_args()
    text = summary(args.root)
    if args.out:
        args.out.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
