"""W&B: offline run directory inside the run's output directory, with the config, metrics and images;
one W&B run per job when several jobs share a process (Hydra's sequential multirun); the default method
under every logger at once."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest

from step_lightning.cli import HARMLESS_MESSAGES, HARMLESS_WARNINGS
from step_lightning.lit.loggers import wandb_offline_unless_logged_in
from tests.helpers import REPO, TINY_RUN, TINY_STEP_RUN, compose_config, run_train

WANDB_RUN = [*TINY_RUN, "logger=wandb", "trainer.log_every_n_steps=1", "tags=[smoke]"]


def offline_run(output_dir):
    runs = sorted((output_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline run in {output_dir / 'wandb'}, found {runs}"
    records = list(runs[0].glob("run-*.wandb"))
    assert len(records) == 1
    return runs[0], records[0].read_bytes()


@pytest.mark.slow
def test_wandb_offline_runs_hold_config_metrics_and_images(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    dirs = [tmp_path / "job0", tmp_path / "job1"]
    for i, output_dir in enumerate(dirs):  # two jobs in one process, as a local multirun runs them
        run_train([*WANDB_RUN, f"seed={i}"], output_dir)
    ids = set()
    for output_dir in dirs:
        run_dir, records = offline_run(output_dir)
        ids.add(run_dir.name.rsplit("-", 1)[-1])
        # The binary record file stores keys as plain strings: resolved config, group, tags, metrics.
        for key in (b"crop_size", b"prune_heads", b"synthetic-vit_t-segvit", b"smoke", b"train/loss", b"val/mIoU",
                    b"val/tokens", b"lr-AdamW", b"final/mIoU", b"final/gflops", b"final/tokens_per_image",
                    b"final/IoU/"):
            assert key in records, f"{key!r} missing from {run_dir}"
        cfg = compose_config(WANDB_RUN, output_dir=output_dir)
        if "visualization" in cfg.callbacks:  # the validation pictures, logged through the WandbLogger
            assert list((run_dir / "files" / "media" / "images").rglob("*.png"))
    assert len(ids) == 2, "each job must be its own W&B run"


def test_no_api_key_means_offline(tmp_path, monkeypatch, caplog):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    cfg = compose_config(WANDB_RUN, output_dir=tmp_path)
    caplog.set_level(logging.INFO)
    wandb_offline_unless_logged_in(cfg)
    assert os.environ["WANDB_MODE"] == "offline"
    assert "logging offline" in caplog.text


def test_wandb_logger_config_groups_and_tags(tmp_path):
    cfg = compose_config([*WANDB_RUN, "method=step", "tau=4999", "prune_heads=[1]"], output_dir=tmp_path)
    w = cfg.logger.wandb
    assert w.group == "synthetic-vit_t-step"
    assert list(w.tags) == ["step", "vit_t", "synthetic", "smoke"]
    assert w.save_dir == str(tmp_path)


@pytest.mark.slow
def test_default_method_with_every_logger_from_the_cli(tmp_path):
    """STEP's policy phase and segmenter under csv, TensorBoard and W&B at once: the policy's validation is
    logged into its own W&B run before that run ends, `summary: <path>` stays the last line, train.log holds
    the run's lines, and none of the known-harmless warnings is printed."""
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "step_lightning.train", *TINY_STEP_RUN, "logger=[csv,tensorboard,wandb]",
         "callbacks.visualization=null", f"hydra.run.dir={run_dir}"],
        cwd=REPO, env={**os.environ, "WANDB_MODE": "offline"}, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == f"summary: {run_dir / 'summary.json'}"
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, "one W&B run for the policy phase, one for the segmenter"
    policy_records, segmenter_records = (next(r.glob("run-*.wandb")).read_bytes() for r in runs)
    assert b"val/loss" in policy_records and b"val/auroc_2" in policy_records
    assert b"final/mIoU" in segmenter_records and b"val/loss" not in segmenter_records
    for logger in ("csv", "tensorboard"):
        assert list((run_dir / f"{logger}_policy").rglob("*")) and list((run_dir / logger).rglob("*"))
    log = (run_dir / "train.log").read_text()
    for line in ("policy: ", "`Trainer.fit` stopped", f"summary: {run_dir / 'summary.json'}"):
        assert line in log
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "Warning:" not in output and "warnings.warn" not in output
    for pattern, _ in HARMLESS_WARNINGS:
        assert not re.search(pattern, output), pattern
    assert not HARMLESS_MESSAGES.search(output)
