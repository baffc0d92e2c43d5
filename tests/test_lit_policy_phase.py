"""The default method's policy phase under the ways of running it: fast_dev_run, a phase shorter than its
validation interval, the policy heads a crop can train (DDP, multirun and loggers: test_lit_ddp.py and
test_lit_loggers.py; kill and resume: test_train_resume.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from step_lightning.config.checks import check_config
from step_lightning.core import ConfigError
from step_lightning.lit.checkpoint import load_module
from step_lightning.tokens.policy import window_sizes_for
from tests.helpers import TINY_STEP_RUN, compose_config, run_train


def test_policy_heads_only_for_windows_that_fit_the_crop(tmp_path):
    assert window_sizes_for(512) == (2, 4, 8, 16)
    assert window_sizes_for(192) == (2, 4, 8)  # the default crop: 12x12 patches, no 16x16 window
    assert window_sizes_for(64) == (2, 4)
    with pytest.raises(ConfigError, match="crop_size=16 holds no 2x2 window"):
        check_config(compose_config([*TINY_STEP_RUN, "crop_size=16"], output_dir=tmp_path))


@pytest.mark.slow
def test_default_method_under_fast_dev_run(tmp_path):
    """fast_dev_run disables Lightning's ModelCheckpoint: the policy phase still hands over a checkpoint."""
    summary = run_train([*TINY_STEP_RUN, "+trainer.fast_dev_run=true"], tmp_path)
    assert summary["steps"] == 1 and summary["policy"]["steps"] == 1
    assert Path(summary["policy"]["checkpoint"]) == tmp_path / "policy" / "last.ckpt"
    assert summary["config"]["policy"] == summary["policy"]["checkpoint"]
    assert 0 <= summary["mIoU"] <= 100


@pytest.mark.slow
def test_policy_phase_shorter_than_its_validation_interval(tmp_path):
    """No validation ran in the policy phase: its last weights are the result, validated once; the segmenter
    is built with heads for the windows a 64 px crop holds, and rebuilds from its checkpoint alone."""
    summary = run_train([*TINY_STEP_RUN, "policy_train.max_steps=3", "policy_train.val_check_interval=100"], tmp_path)
    policy = summary["policy"]
    assert policy["steps"] == 3 and Path(policy["checkpoint"]) == tmp_path / "policy" / "last.ckpt"
    assert {"val/loss", "val/auroc_2", "val/auroc_4"} <= set(policy["metrics"])
    assert json.loads((tmp_path / "policy" / "policy.json").read_text())["checkpoint"] == policy["checkpoint"]
    saved = torch.load(policy["checkpoint"], map_location="cpu", weights_only=False)
    assert tuple(saved["hyper_parameters"]["sizes"]) == (2, 4)
    assert not any(k.startswith(("policy.heads.8", "policy.heads.16")) for k in saved["state_dict"])
    model = load_module(summary["checkpoint"]).model
    assert model.tokenizer.policy.sizes == (2, 4)
    assert summary["steps"] == 4
