"""Hydra multirun with list values and DDP inside it (trainer=ddp_sim: 2 CPU processes, gloo, the same
subprocess launcher as trainer=ddp on GPUs) running the default method, and DDP evaluation equal to one
process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from step_lightning.eval import evaluate
from step_lightning.lit.ddp import hydra_ddp_command
from tests.helpers import CONF_DIR, REPO, TINY_STEP_RUN, compose_config


@pytest.fixture(scope="module")
def ddp_multirun(tmp_path_factory):
    """Two jobs of the default method (no exit head / an exit head after layer 1), each trained by 2 DDP
    processes: the policy phase (heads only for the windows a 64 px crop holds, else DDP finds parameters
    without gradients), then the segmenter."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    run_tiny = [*TINY_STEP_RUN, "callbacks.visualization=null"]
    result = subprocess.run(
        [sys.executable, "-m", "step_lightning.train", "-m", *run_tiny, "trainer=ddp_sim", "prune_heads=[],[1]",
         f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore"}, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir, result


@pytest.mark.slow
def test_multirun_list_values_give_one_directory_and_summary_per_job(ddp_multirun):
    sweep_dir, result = ddp_multirun
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in jobs] == ["0", "1"]
    printed = [line.removeprefix("summary: ") for line in result.stdout.splitlines() if line.startswith("summary: ")]
    assert printed == [str(job / "summary.json") for job in jobs]
    summaries = [json.loads((job / "summary.json").read_text()) for job in jobs]
    assert [s["config"]["prune_heads"] for s in summaries] == [[], [1]]
    assert summaries[0]["exit_stats"] is None and summaries[1]["exit_stats"] is not None
    for job, summary in zip(jobs, summaries, strict=True):
        assert summary["steps"] == 4 and summary["policy"]["steps"] == 4
        assert summary["config"]["policy"] == summary["policy"]["checkpoint"]
        assert summary["policy"]["checkpoint"].startswith(str(job / "policy"))
        assert summary["config"]["paths"]["output_dir"] == str(job)
        # Rank 1 ran this job's config in this job's directory (its log is there), not a new sweep.
        assert (job / "train_rank1.log").is_file()
        assert (job / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_ddp_evaluation_equals_single_process(ddp_multirun, tmp_path):
    """The final validation of the DDP run (2 ranks, 2 of the 4 images each, confusion matrices summed)
    and a 1-process evaluation of its checkpoint (the last weights) count the same pixels: identical scores."""
    sweep_dir, _ = ddp_multirun
    for job in ("0", "1"):
        summary = json.loads((sweep_dir / job / "summary.json").read_text())
        eval_cfg = compose_config([f"ckpt_path={summary['checkpoint']}"], "eval", tmp_path / job)
        single = evaluate(eval_cfg, [f"ckpt_path={summary['checkpoint']}"])
        assert single["mIoU"] == summary["mIoU"]
        assert single["aAcc"] == summary["aAcc"]
        assert single["per_class_IoU"] == pytest.approx(summary["per_class_IoU"], nan_ok=True, rel=0, abs=0)
        assert single["token_stats"]["total"] == summary["token_stats"]["total"]


def test_ddp_rank_command_replays_only_this_job(monkeypatch, tmp_path):
    """In a multirun sys.argv holds the whole sweep; a rank must rerun only its job, in its directory."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["prune_heads=[8,16]", "tau=4999"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "3")
        cfg.hydra.runtime.cwd = str(REPO)
        cfg.hydra.job.name = "train"
        cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig.instance().set_config(cfg)
    monkeypatch.setattr(sys, "argv", ["step_lightning/train.py", "-m", "tau=4999,6899", "prune_heads=[8,16],[8]"])
    command, cwd = hydra_ddp_command(1)
    assert cwd == str(REPO)
    assert "-m" not in command[3:] and "tau=4999,6899" not in command
    assert command[-7:] == [
        "prune_heads=[8,16]", "tau=4999", f'hydra.run.dir="{tmp_path / "3"}"', "hydra.job.name=train_rank1",
        "hydra.job.chdir=False", "hydra.output_subdir=null", "hydra.mode=RUN",
    ]


def test_sweep_configs_reproduce_the_papers_grids(tmp_path):
    parser = OverridesParser.create()
    tau = compose_config(["experiment=sweep_tau"], output_dir=tmp_path)
    assert tau.method == "dcts" and tau.backbone.name == "vit_l" and tau.data.name == "cocostuff10k"
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        tau_h = compose("train", overrides=["experiment=sweep_tau"], return_hydra_config=True).hydra
        heads_h = compose("train", overrides=["experiment=sweep_heads"], return_hydra_config=True).hydra
    assert str(tau_h.mode) == "RunMode.MULTIRUN"
    (tau_sweep,) = parser.parse_overrides([f"tau={tau_h.sweeper.params.tau}"])
    assert list(tau_sweep.sweep_iterator()) == [6999, 6899, 4999, 4899, 4799, 4699, 4599, 4499]
    (heads,) = parser.parse_overrides([f"prune_heads={heads_h.sweeper.params.prune_heads}"])
    values = list(heads.sweep_iterator())
    assert [] in values and [8, 16] in values and [16] in values and [18] in values
    assert all(v == sorted(v) and all(1 <= h < 24 for h in v) for v in values)


def test_slurm_launcher_follows_the_trainer(tmp_path):
    from hydra import compose, initialize_config_dir

    overrides = ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.max_num_timeout > 0 and cfg.auto_resume
