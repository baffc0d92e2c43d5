"""The dataset checker: report contents, problems, and the Hydra command line."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from data_builders import make_ade, make_cityscapes, random_label, write_label
from hydra import compose as hydra_compose
from hydra import initialize_config_dir

from step_lightning.data.ade20k import ADE20KDataModule
from step_lightning.data.check import check_from_config, check_split, run_check
from step_lightning.data.cityscapes import CityscapesDataModule
from tests.conftest import CONF_DIR

REPO = Path(__file__).resolve().parents[1]


def test_clean_dataset_reports_counts_and_classes(tmp_path, capsys):
    root = make_ade(tmp_path, {"training": 1, "validation": 2})
    write_label(root / "annotations" / "training" / "ADE_train_00000000.png", random_label([0, 1, 3], 0))
    assert run_check(ADE20KDataModule(root), ["training", "validation"], threads=2)
    out = capsys.readouterr().out
    assert "training: 1 pairs, 1 read without problems" in out
    assert "classes present (2/150): wall, sky" in out
    assert out.strip().endswith("ok images=3")


def test_problems_are_all_listed(tmp_path, capsys):
    root = make_cityscapes(tmp_path, {"val": 4})
    gt = root / "gtFine" / "val"
    (gt / "aachen" / "aachen_000000_000019_gtFine_labelTrainIds.png").unlink()
    (gt / "aachen" / "aachen_000000_000019_gtFine_labelIds.png").unlink()
    write_label(gt / "bremen" / "bremen_000001_000019_gtFine_labelTrainIds.png", random_label([1, 40], 0))
    (root / "leftImg8bit" / "val" / "aachen" / "aachen_000002_000019_leftImg8bit.png").write_bytes(b"broken")
    report = check_split(CityscapesDataModule(root), "val", threads=2)
    assert report.pairs == 3 and report.readable == 1 and len(report.problems) == 3
    text = "\n".join(report.problems)
    assert "1 image(s) in leftImg8bit/val have no label" in text
    assert "label values 40 are outside" in text and "aachen_000002_000019_leftImg8bit.png: cannot read" in text
    assert not run_check(CityscapesDataModule(root), ["val"], threads=2)
    assert "FAILED: 3 problem(s)" in capsys.readouterr().err


def test_class_pixels_are_counted_in_train_ids(tmp_path):
    root = make_ade(tmp_path, {"validation": 1})
    write_label(root / "annotations" / "validation" / "ADE_valid_00000000.png", np.full((24, 40), 3, np.uint8))
    report = check_split(ADE20KDataModule(root), "validation")
    assert np.flatnonzero(report.class_pixels).tolist() == [2] and report.class_pixels[2] == 24 * 40


def compose(*overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose("check", overrides=list(overrides))


def test_config_entry_point(tmp_path, capsys):
    root = make_cityscapes(tmp_path, {"train": 2, "val": 1})
    assert check_from_config(compose("data=cityscapes", f"data.root={root}", "threads=2")) == 0
    assert capsys.readouterr().out.strip().endswith("ok images=3")
    assert check_from_config(compose("data=cityscapes", f"data.root={root}", "data.split=val")) == 0
    assert "train:" not in (out := capsys.readouterr().out) and "ok images=1" in out
    assert check_from_config(compose("data=ade20k", f"data.root={root}")) == 1
    assert check_from_config(compose("data=cityscapes", f"data.root={root}", "data.label_source=x")) == 2
    assert "label_source='x' is not one of" in capsys.readouterr().err


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    cmd = [sys.executable, "-m", "step_lightning.data.check", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.slow
def test_command_line(tmp_path):
    root = make_ade(tmp_path)
    ok = run_cli("data=ade20k", f"data.root={root}")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().endswith("ok images=5")
    one = run_cli("data=ade20k", f"data.root={root}", "data.split=validation")
    assert one.returncode == 0 and "training" not in one.stdout and "ok images=2" in one.stdout
    bad = run_cli("data=ade20k", f"data.root={tmp_path}")
    assert bad.returncode == 1 and f"set data.root={root}" in bad.stdout
    assert not (REPO / "check.log").exists()
