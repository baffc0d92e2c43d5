"""eval scores the whole split it names whatever the training run limited, prints how many images it scored,
and rebuilds a STEP model from its checkpoint alone (no policy folder, never the oracle)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from step_lightning.eval import evaluate
from tests.helpers import TINY_RUN, compose_config, run_module, run_train


@pytest.mark.slow
def test_eval_scores_the_whole_split_it_names(tmp_path):
    """Training validated 2 of 6 images (limit_val_batches); eval scores all 6, or the 16 of data.split=train."""
    train_dir = tmp_path / "train"
    summary = run_train([*TINY_RUN, "data.num_val=6", "data.val_batch_size=2", "+trainer.limit_val_batches=1"],
                        train_dir)
    assert summary["token_stats"]["images"] == 2
    overrides = [f"ckpt_path={summary['checkpoint']}"]
    result = evaluate(compose_config(overrides, "eval", tmp_path / "val"), overrides)
    assert result["images"] == 6 and result["split"] == "val"
    overrides = [f"ckpt_path={summary['checkpoint']}", "data.split=train"]
    result = evaluate(compose_config(overrides, "eval", tmp_path / "train_split"), overrides)
    assert result["images"] == 16 and result["split"] == "train"
    cli = run_module("step_lightning.eval", [f"ckpt_path={summary['checkpoint']}"], tmp_path / "cli")
    assert cli.returncode == 0, cli.stderr[-3000:]
    headline, last = cli.stdout.strip().splitlines()[-2:]
    assert " images=6 split=val mode=whole" in headline and last == f"eval: {tmp_path / 'cli' / 'eval.json'}"
    # Its progress bar (Lightning's, on stdout): what is evaluated (method, split, protocol), batches done of
    # all, time taken and left.
    bar = r"eval segvit val \(whole\)[^\n]*: 100%\|[^|]*\| 3/3 \[\d\d:\d\d<00:00"
    assert re.search(bar, cli.stdout)


@pytest.mark.slow
def test_eval_of_a_step_checkpoint_without_its_policy_folder(tiny_step_run, tmp_path):
    """The trained policy's weights are in the segmenter's checkpoint: moved away from its run (no policy/,
    no run config), it evaluates to the same scores, and nothing mentions the oracle."""
    summary = tiny_step_run["summary"]
    lone = tmp_path / "lone" / "best.ckpt"
    lone.parent.mkdir()
    shutil.copy(summary["checkpoint"], lone)
    policy_dir = Path(summary["policy"]["checkpoint"]).parent
    policy_dir.rename(tmp_path / "policy_elsewhere")
    try:
        cli = run_module("step_lightning.eval", [f"ckpt_path={lone}", "data.num_val=4", "crop_size=64"],
                         tmp_path / "out")
    finally:
        (tmp_path / "policy_elsewhere").rename(policy_dir)
    assert cli.returncode == 0, cli.stderr[-3000:]
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert saved["mIoU"] == pytest.approx(summary["mIoU"], abs=1e-6)
    assert saved["tokens_per_image"] == summary["tokens_per_image"]
    assert "oracle" not in cli.stdout + cli.stderr
