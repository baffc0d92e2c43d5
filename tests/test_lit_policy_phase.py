"""The default method's policy phase under the ways of running it: fast_dev_run, a phase shorter than its
validation interval or not a multiple of it, the policy heads a crop can train, CTS's Cityscapes data on the real
samples (DDP, multirun and loggers: test_lit_ddp.py and test_lit_loggers.py; kill and resume:
test_train_resume.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from step_lightning.config.checks import check_config
from step_lightning.core import ConfigError
from step_lightning.lit.checkpoint import load_module
from step_lightning.lit.policy_module import PolicyModule
from step_lightning.tokens.policy import window_sizes_for
from tests.data_builders import REALDATA
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


@pytest.mark.slow
def test_policy_phase_ends_with_a_validation_of_its_last_weights(tmp_path, monkeypatch):
    """5 steps at interval 2: validated at 2, 4 and 5; the segmenter gets the last weights (CTS uses its final
    policy), the best by validation loss is reported beside them."""
    validated = []
    monkeypatch.setattr(PolicyModule, "on_validation_epoch_end", lambda self: validated.append(self.global_step),
                        raising=False)
    summary = run_train([*TINY_STEP_RUN, "policy_train.max_steps=5", "trainer.max_steps=1",
                         "callbacks.visualization=null"], tmp_path)
    policy = summary["policy"]
    assert validated == [2, 4, 5]
    assert policy["steps"] == 5 and policy["checkpoint"] == str(tmp_path / "policy" / "last.ckpt")
    assert summary["config"]["policy"] == policy["checkpoint"]
    assert torch.load(policy["checkpoint"], map_location="cpu", weights_only=False)["global_step"] == 5
    best = policy["best"]
    assert best["step"] in (2, 4, 5) and best["val/loss"] <= policy["metrics"]["val/loss"]
    assert torch.load(best["checkpoint"], map_location="cpu", weights_only=False)["global_step"] == best["step"]


@pytest.mark.slow
@pytest.mark.skipif(not (REALDATA / "cityscapes").is_dir(), reason="no real Cityscapes samples")
def test_policy_phase_on_cts_cityscapes_crops(tmp_path):
    """task=policy on the real Cityscapes frames with CTS's Cityscapes data: full-resolution crops, no border rule."""
    overrides = ["task=policy", "data=cityscapes", f"data.root={REALDATA / 'cityscapes'}", "data.val_split=train",
                 "debug=tiny", "crop_size=128", "policy_train.data=crops", "policy_train.size=256",
                 "policy_train.exclude_border=false", "policy_train.batch_size=2", "policy_train.max_steps=2",
                 "+trainer.limit_val_batches=1", "policy_train.pretrained=false"]
    summary = run_train(overrides, tmp_path)
    assert summary["steps"] == 2 and {"val/loss", "val/auroc_2"} <= set(summary["metrics"])
    hparams = torch.load(summary["checkpoint"], map_location="cpu", weights_only=False)["hyper_parameters"]
    assert hparams["exclude_border"] is False and tuple(hparams["sizes"]) == window_sizes_for(128)
