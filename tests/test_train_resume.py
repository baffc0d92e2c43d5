"""Kill a training run after its first checkpoint (SIGTERM or SIGKILL), in either phase of the default method,
resume it, and check that it ends with the planned number of optimisation steps, scheduler steps included, and a
valid final checkpoint; a run stopped during its final validation validates its last step when resumed; resuming
into another folder keeps the best checkpoint; a rerun into a run folder continues it only with the same
settings."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from step_lightning import train as train_mod
from step_lightning.core import ConfigError
from step_lightning.lit.callbacks.durability import BestCheckpoint
from step_lightning.lit.module import SegmentationModule
from step_lightning.lit.resume import differences
from step_lightning.metrics import SegMetrics
from tests.helpers import REPO, TINY_RUN, TINY_STEP_RUN, record_validations, run_train

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


def kill_once_saved(proc: subprocess.Popen, checkpoint, sig) -> str:
    """Send ``sig`` as soon as ``checkpoint`` appears; returns the run's stderr."""
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert checkpoint.exists(), f"no {checkpoint.name} appeared"
    proc.send_signal(sig)
    return proc.communicate(timeout=300)[1]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_killed_run_resumes_to_the_planned_step_count(tmp_path, sig):
    first = tmp_path / "first"
    last = first / "checkpoints" / "last.ckpt"
    proc = start(first)
    stderr = kill_once_saved(proc, last, sig)
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
    stderr = kill_once_saved(proc, last, sig)
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


def test_stopped_during_its_final_validation_the_rerun_validates_the_last_step(tmp_path, monkeypatch):
    """SIGTERM while step 5 of 5 is validated: the run stops with last.ckpt at step 5 and no summary; the rerun
    the message asks for (same folder) trains nothing, validates step 5 and reports it, not an older checkpoint."""
    overrides = [*TINY_RUN, "trainer.max_steps=5", "data.val_batch_size=1", "callbacks.visualization=null"]

    def sigterm_during_final_validation(self, *args):
        if self.trainer.state.fn == "fit" and self.global_step == 5:
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None), "Lightning's handler is not set"
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning stops after this validation batch

    with monkeypatch.context() as patch:
        patch.setattr(SegmentationModule, "on_validation_batch_end", sigterm_during_final_validation, raising=False)
        with pytest.raises(train_mod.Stopped) as stopped:
            run_train(overrides, tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert stopped.value.checkpoint == last and step_of(last) == 5
    assert not (tmp_path / "summary.json").exists()
    validated = record_validations(monkeypatch)
    summary = run_train(overrides, tmp_path)
    assert [step for step, _ in validated] == [5]
    assert summary["steps"] == 5 and summary["checkpoint"] == str(last)
    assert summary["mIoU"] == pytest.approx(validated[0][1]) and summary["best"]["mIoU"] >= summary["mIoU"]


def test_best_checkpoint_follows_a_run_into_another_folder(tmp_path):
    """Lightning keeps only the path when the folder changes (the score is forgotten, so the next validation
    becomes "best" whatever it scores); BestCheckpoint copies the best files here and keeps their scores."""
    old = tmp_path / "old" / "checkpoints"
    old.mkdir(parents=True)
    (old / "step000002-miou20.17.ckpt").write_bytes(b"best")
    (old / "step000004-miou19.63.ckpt").write_bytes(b"second")
    state = {"dirpath": str(old), "best_model_path": str(old / "step000002-miou20.17.ckpt"),
             "best_model_score": torch.tensor(20.17), "current_score": torch.tensor(19.63),
             "best_k_models": {str(old / "step000002-miou20.17.ckpt"): torch.tensor(20.17),
                               str(old / "step000004-miou19.63.ckpt"): torch.tensor(19.63)},
             "kth_best_model_path": str(old / "step000004-miou19.63.ckpt"), "kth_value": torch.tensor(19.63),
             "last_model_path": "", "monitor": "val/mIoU"}
    new = tmp_path / "new" / "checkpoints"
    callback = BestCheckpoint(dirpath=new, monitor="val/mIoU", mode="max", save_top_k=2)
    callback.load_state_dict(state)
    assert callback.best_model_path == str(new / "step000002-miou20.17.ckpt")
    assert float(callback.best_model_score) == pytest.approx(20.17)
    assert callback.kth_best_model_path == str(new / "step000004-miou19.63.ckpt")
    assert (new / "step000002-miou20.17.ckpt").read_bytes() == b"best"
    assert (old / "step000002-miou20.17.ckpt").is_file()  # the old run keeps its files

    (old / "step000002-miou20.17.ckpt").unlink()  # gone: tracking goes on with what is left, never reads it
    again = BestCheckpoint(dirpath=tmp_path / "third", monitor="val/mIoU", mode="max", save_top_k=2)
    with pytest.warns(UserWarning, match="best checkpoints of the resumed run are gone"):
        again.load_state_dict(state)
    assert again.best_model_path == str(tmp_path / "third" / "step000004-miou19.63.ckpt")


@pytest.mark.slow
def test_resume_into_a_new_folder_keeps_the_best_so_far(tiny_run, tmp_path, monkeypatch):
    """After the move every validation scores worse than the old run's best: the best checkpoint stays the old
    run's (now in the new folder), reported beside the last weights, not the first checkpoint written here."""
    old_best = Path(tiny_run["summary"]["best"]["checkpoint"])
    monkeypatch.setattr(SegMetrics, "compute", lambda self: {"mIoU": torch.tensor(-1.0), "aAcc": torch.tensor(0.0),
                                                             "IoU": torch.zeros(self.num_classes)})
    last = tiny_run["output_dir"] / "checkpoints" / "last.ckpt"
    summary = run_train([*TINY_RUN, f"ckpt_path={last}", "trainer.max_steps=8"], tmp_path)
    assert summary["steps"] == 8
    assert summary["best"]["checkpoint"] == str(tmp_path / "checkpoints" / old_best.name)
    assert summary["checkpoint"] == str(tmp_path / "checkpoints" / "last.ckpt") and summary["mIoU"] == -1.0
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt")) == sorted([old_best.name, "last.ckpt"])


@pytest.mark.slow
def test_rerun_into_a_run_folder_continues_only_with_its_settings(tmp_path, monkeypatch):
    run_train(TINY_RUN, tmp_path)
    # Changed settings: one line naming the keys, before any data or model is built.
    with monkeypatch.context() as patch:
        patch.setattr(train_mod.hydra.utils, "instantiate", pytest.fail)
        with pytest.raises(ConfigError) as info:
            run_train([*TINY_RUN, "optim.lr=1e-4", "seed=3"], tmp_path)
    message = str(info.value)
    assert "optim.lr: 0.0005 -> 0.0001" in message and "seed: 42 -> 3" in message and "\n" not in message
    assert "auto_resume=force" in message
    # The same settings: the finished run is resumed (nothing left to train) and validated again.
    again = run_train(TINY_RUN, tmp_path)
    assert again["steps"] == 4
    # Asked explicitly: continued with the new settings, which the folder then records.
    forced = run_train([*TINY_RUN, "optim.lr=1e-4", "trainer.max_steps=6", "auto_resume=force"], tmp_path)
    assert forced["steps"] == 6 and forced["config"]["optim"]["lr"] == 1e-4
    assert OmegaConf.load(tmp_path / "run_config.yaml").optim.lr == 1e-4


def test_setting_differences_name_every_changed_key():
    saved = {"optim": {"lr": 5e-4, "betas": [0.9, 0.999]}, "tags": [], "ckpt_path": None, "auto_resume": True}
    current = {"optim": {"lr": 1e-4, "betas": [0.9, 0.999]}, "tags": ["x"], "ckpt_path": "a.ckpt",
               "auto_resume": "force", "new": 1}
    assert differences(saved, current) == ["new: <unset> -> 1", "optim.lr: 0.0005 -> 0.0001", "tags: [] -> ['x']"]
    moved = [{"paths": {"output_dir": f"/runs/{d}"}, "callbacks": {"dirpath": f"/runs/{d}/checkpoints"}} for d in "ab"]
    assert differences(*moved) == []


@pytest.mark.slow
def test_finished_policy_phase_is_not_trained_again(tiny_step_run, tmp_path):
    """A (moved) run folder whose policy phase is over and whose segmenter never wrote a checkpoint: auto_resume
    goes straight to the segmenter with that policy."""
    source = tiny_step_run["output_dir"]
    shutil.copytree(source / "policy", tmp_path / "policy")
    shutil.copy(source / "run_config.yaml", tmp_path / "run_config.yaml")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "policy").iterdir()}
    summary = run_train([*TINY_STEP_RUN, "callbacks.visualization=null"], tmp_path)
    assert summary["policy"] == json.loads((tmp_path / "policy" / "policy.json").read_text())
    assert summary["config"]["policy"] == summary["policy"]["checkpoint"] and summary["steps"] == 4
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "policy").iterdir()} == before
