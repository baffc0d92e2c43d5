"""Kill a training run after its first checkpoint (SIGTERM or SIGKILL), resume it, and check that it ends
with the planned number of optimisation steps, scheduler steps included, and a valid final checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, TINY_RUN, TINY_STEP_RUN

MAX_STEPS = 40
RUN = [o for o in TINY_RUN if not o.startswith(("trainer.max_steps", "trainer.val_check_interval"))] + [
    f"trainer.max_steps={MAX_STEPS}", "trainer.val_check_interval=4", "callbacks.visualization=null"]


def start(run_dir, *extra) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "step_lightning.train", *RUN, *extra, f"hydra.run.dir={run_dir}"],
        cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )


def step_of(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_killed_run_resumes_to_the_planned_step_count(tmp_path, sig):
    first = tmp_path / "first"
    last = first / "checkpoints" / "last.ckpt"
    proc = start(first)
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert last.exists(), "no checkpoint appeared"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    interrupted = step_of(last)
    assert 4 <= interrupted < MAX_STEPS, "the run was not interrupted mid-training"
    assert not (first / "summary.json").exists()
    if sig == signal.SIGTERM:  # Lightning finishes the current step, last.ckpt is saved, exit 128+15
        assert proc.returncode == 143, stderr[-2000:]
        assert f"error: stopped by SIGTERM; resume with ckpt_path={last}" in stderr
        resumed = start(tmp_path / "second", f"ckpt_path={last}")
        out_dir = tmp_path / "second"
    else:  # nothing runs on SIGKILL: the periodic last.ckpt is what is left; rerun the same directory
        assert proc.returncode == -signal.SIGKILL
        assert interrupted % 4 == 0
        resumed = start(first)
        out_dir = first
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    if sig == signal.SIGKILL:
        assert f"resuming from {last} (auto_resume)" in stdout
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["steps"] == MAX_STEPS
    final = torch.load(out_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == MAX_STEPS
    assert final["lr_schedulers"][0]["last_epoch"] == MAX_STEPS  # the schedule continued, it did not restart
    if sig == signal.SIGTERM:  # an interrupted save would leave its temporary file; none was interrupted
        assert not list((out_dir / "checkpoints").glob(".*.tmp"))


POLICY_STEPS = 16
STEP_RUN = [*TINY_STEP_RUN, f"policy_train.max_steps={POLICY_STEPS}", "policy_train.val_check_interval=4",
            "trainer.max_steps=2", "callbacks.visualization=null"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_killed_policy_phase_resumes_instead_of_starting_over(tmp_path, sig):
    """A kill in the policy phase of the default method: the printed ckpt_path exists and continues the
    policy phase (into a new folder), and a rerun into the same folder continues it (auto_resume)."""
    first = tmp_path / "first"
    last = first / "policy" / "last.ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "step_lightning.train", *STEP_RUN, f"hydra.run.dir={first}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert last.exists(), "no policy checkpoint appeared"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    interrupted = step_of(last)
    assert 2 <= interrupted < POLICY_STEPS, "the policy phase was not interrupted"
    assert not (first / "policy" / "policy.json").exists() and not (first / "checkpoints").exists()
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, stderr[-2000:]
        assert f"error: stopped by SIGTERM; resume with ckpt_path={last} " in stderr
        out_dir, extra = tmp_path / "second", [f"ckpt_path={last}"]
    else:
        assert proc.returncode == -signal.SIGKILL
        out_dir, extra = first, []
    resumed = subprocess.run(
        [sys.executable, "-m", "step_lightning.train", *STEP_RUN, *extra, f"hydra.run.dir={out_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {last}" in resumed.stdout
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["policy"]["steps"] == POLICY_STEPS and summary["steps"] == 2
    assert Path(summary["policy"]["checkpoint"]).parent == out_dir / "policy"
    final = torch.load(out_dir / "policy" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == POLICY_STEPS
    assert final["lr_schedulers"][0]["last_epoch"] == POLICY_STEPS  # the schedule went on, it did not restart
