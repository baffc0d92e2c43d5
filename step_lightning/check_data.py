"""Validate a dataset folder before training on it.

    python -m step_lightning.check_data data=<name> data.root=<path> [data.split=<split>] [threads=8]
    python -m step_lightning.check_data data=folder data.root=<path> data.num_classes=<n>   # your own dataset

Pairs every image with its label, reads every file with the loaders training uses, checks label values
against the dataset's convention, prints per-split counts and the classes present, and ends with
``ok images=<n>``; otherwise lists the problems and exits with status 1.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import hydra
import numpy as np
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from step_lightning.cli import checked_command_line, run_command
from step_lightning.core import ConfigError
from step_lightning.data.dataset import load_sample
from step_lightning.data.folders import Sample, find_pairs
from step_lightning.data.module import FolderSegDataModule

_SHOWN = 20  # problems printed per split before summarising


@dataclass
class SplitReport:
    split: str
    pairs: int = 0
    readable: int = 0
    class_pixels: np.ndarray = field(default_factory=lambda: np.zeros(256, dtype=np.int64))
    problems: list[str] = field(default_factory=list)


def _read(sample: Sample) -> tuple[np.ndarray | None, str | None]:
    try:
        _, label = load_sample(sample)
    except ConfigError as err:
        return None, str(err)
    return np.bincount(label.ravel(), minlength=256), None


def check_split(dm: FolderSegDataModule, split: str, threads: int = 8) -> SplitReport:
    report = SplitReport(split)
    try:
        pairing = find_pairs(dm.root, dm.layout, split)
    except ConfigError as err:
        report.problems.append(str(err))
        return report
    report.problems += pairing.problems(dm.layout, split)
    report.pairs = len(pairing.samples)
    if not pairing.samples and not report.problems:
        report.problems.append(f"no {dm.layout.dataset} files in split '{split}': expected {dm.layout.describe()}")
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for counts, error in pool.map(_read, pairing.samples):
            if error is None:
                report.readable += 1
                report.class_pixels += counts
            else:
                report.problems.append(error)
    return report


def format_report(dm: FolderSegDataModule, report: SplitReport) -> Iterable[str]:
    yield f"  {report.split}: {report.pairs} pairs, {report.readable} read without problems"
    present = np.flatnonzero(report.class_pixels[: dm.num_classes])
    if present.size:
        names = ", ".join(dm.class_names[c] for c in present)
        yield f"    classes present ({present.size}/{dm.num_classes}): {names}"
    for problem in report.problems[:_SHOWN]:
        yield "    problem: " + problem.replace("\n", "\n      ")
    if len(report.problems) > _SHOWN:
        yield f"    ... and {len(report.problems) - _SHOWN} more problems"


def run_check(dm: FolderSegDataModule, splits: list[str], threads: int = 8) -> bool:
    """Print the report of each split; True when there is no problem."""
    print(f"{dm.name} at {dm.root}")
    reports = [check_split(dm, split, threads) for split in splits]
    for report in reports:
        for line in format_report(dm, report):
            print(line)
    problems = sum(len(r.problems) for r in reports)
    if problems:
        print(f"FAILED: {problems} problem(s); see above.", file=sys.stderr)
        return False
    print(f"ok images={sum(r.pairs for r in reports)}")
    return True


def check_from_config(cfg: DictConfig) -> int:
    """Exit status for a composed check config: 0 ok, 1 problems found, 2 the datamodule cannot be built."""
    with open_dict(cfg):  # the checker neither augments nor normalises: drop the backbone statistics
        for key in ("mean", "std"):
            if key in cfg.data:
                del cfg.data[key]  # del (unlike pop) does not resolve the interpolation
    try:
        dm = instantiate(cfg.data)
    except InstantiationException as err:
        print(f"cannot build data={cfg.data.name}: {err.__cause__ or err}", file=sys.stderr)
        return 2
    splits = [cfg.data.split] if cfg.data.get("split") else [dm.train_split, dm.val_split]
    return 0 if run_check(dm, splits, int(cfg.threads)) else 1


@checked_command_line(run_folder=False)
@hydra.main(config_path="conf", config_name="check", version_base="1.3")
def main(cfg: DictConfig) -> None:
    sys.exit(run_command(check_from_config, cfg))


if __name__ == "__main__":
    main()
