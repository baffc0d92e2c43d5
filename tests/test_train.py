"""End-to-end runs on the synthetic data: one step per backbone size, train -> eval, resume, summary.json."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from step_lightning.core import ConfigError
from step_lightning.eval import evaluate
from tests.helpers import TINY_RUN, TINY_STEP_RUN, compose_config, record_validations, run_module, run_train


@pytest.mark.parametrize("backbone", ["vit_t", "vit_s", "vit_b", "vit_l"])
def test_fast_dev_run_per_backbone(tmp_path, backbone):
    """One training and one validation batch at full width (depth truncated to 2, 32 px crops)."""
    summary = run_train(
        [f"backbone={backbone}", "method=segvit", "policy=oracle", "backbone.depth=2", "backbone.taps=[1,2]",
         "crop_size=32", "data.num_train=2", "data.num_val=1", "data.batch_size=2", "+trainer.fast_dev_run=true",
         "callbacks.progress_bar=null", "callbacks.visualization=null"],
        tmp_path,
    )
    assert summary["steps"] == 1
    assert 0 <= summary["mIoU"] <= 100 and summary["tokens_per_image"] == 4  # 32x32 px = 2x2 patches
    assert summary["config"]["backbone"]["name"] == backbone
    assert (tmp_path / "summary.json").is_file()


def test_fast_dev_run_with_default_callbacks(tmp_path):
    summary = run_train(["method=segvit", "policy=oracle", "backbone.depth=2", "backbone.taps=[1,2]",
                         "crop_size=32", "data.num_train=2", "data.num_val=1", "data.batch_size=2",
                         "+trainer.fast_dev_run=true"], tmp_path)
    assert summary["steps"] == 1


def test_debug_fast_preset(tmp_path):
    summary = run_train(["method=segvit", "backbone.depth=2", "backbone.taps=[1,2]", "crop_size=32", "data.num_train=2",
                         "data.num_val=1", "data.batch_size=2", "debug=fast"], tmp_path)
    assert summary["steps"] == 1


@pytest.mark.slow
def test_summary_json_keys(tiny_run):
    summary = json.loads((tiny_run["output_dir"] / "summary.json").read_text())
    assert {"mIoU", "aAcc", "gflops", "tokens_per_image", "wall_time_s", "checkpoint", "config"} <= set(summary)
    assert 0 <= summary["mIoU"] <= 100 and 0 <= summary["aAcc"] <= 100
    assert summary["gflops"] > 0 and summary["tokens_per_image"] == 16  # 64x64 px = 4x4 patches
    assert summary["wall_time_s"] > 0 and Path(summary["checkpoint"]).is_file()
    assert summary["config"]["crop_size"] == 64 and summary["config"]["backbone"]["depth"] == 2
    assert summary["steps"] == 4
    assert (tiny_run["output_dir"] / "checkpoints" / "last.ckpt").is_file()


def test_a_run_ends_with_a_validation_of_its_last_weights(tmp_path, monkeypatch):
    """5 steps at val_check_interval=2: validated at steps 2, 4 and 5; the summary holds step 5's scores and
    last.ckpt, the best validated checkpoint beside them."""
    validated = record_validations(monkeypatch)
    summary = run_train([*TINY_RUN, "trainer.max_steps=5", "callbacks.visualization=null"], tmp_path)
    assert [step for step, _ in validated] == [2, 4, 5]
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert summary["steps"] == 5 and summary["checkpoint"] == str(last)
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 5
    assert summary["mIoU"] == pytest.approx(validated[-1][1])
    best = summary["best"]
    assert best["mIoU"] == pytest.approx(max(miou for _, miou in validated))
    assert (best["step"], best["mIoU"]) in [(step, pytest.approx(miou)) for step, miou in validated]
    assert torch.load(best["checkpoint"], map_location="cpu", weights_only=False)["global_step"] == best["step"]


@pytest.mark.parametrize("last_checkpoint", ["default", "null"])
def test_a_run_shorter_than_its_validation_interval_reports_its_last_checkpoint(tmp_path, monkeypatch,
                                                                                last_checkpoint):
    """No validation falls in the run: the end is validated and last.ckpt (written by the run without its
    last_checkpoint callback) is the result."""
    validated = record_validations(monkeypatch)
    extra = ["callbacks.last_checkpoint=null"] if last_checkpoint == "null" else []
    summary = run_train([*TINY_RUN, "trainer.max_steps=3", "trainer.val_check_interval=100",
                         "callbacks.visualization=null", *extra], tmp_path)
    assert [step for step, _ in validated] == [3]
    assert summary["checkpoint"] == str(tmp_path / "checkpoints" / "last.ckpt") and summary["best"]["step"] == 3
    assert torch.load(summary["checkpoint"], map_location="cpu", weights_only=False)["global_step"] == 3


def test_a_phase_that_cannot_take_a_step_stops_before_work(tmp_path, monkeypatch):
    """Fewer training images than a batch: Lightning would run zero steps and the phase would pass for done."""
    monkeypatch.setattr(L.Trainer, "fit", lambda *args, **kwargs: pytest.fail("a phase started"))
    with pytest.raises(ConfigError, match=r"holds 3 images, fewer than one batch of 8 \(policy_train.batch_size\)"):
        run_train([*TINY_STEP_RUN, "data.num_train=3", "policy_train.batch_size=8"], tmp_path / "policy")
    with pytest.raises(ConfigError, match=r"fewer than one batch of 4 \(data.batch_size\).* at most 3"):
        run_train([*TINY_RUN, "data.num_train=3"], tmp_path / "segment")
    with pytest.raises(ConfigError, match=r"policy_train.batch_size"):
        run_train([*TINY_STEP_RUN, "task=policy", "data.num_train=3", "policy_train.batch_size=4"], tmp_path / "task")


@pytest.mark.slow
def test_eval_of_trained_checkpoint_reproduces_miou(tiny_run, tmp_path):
    summary = tiny_run["summary"]
    overrides = [f"ckpt_path={summary['checkpoint']}"]
    result = evaluate(compose_config(overrides, "eval", tmp_path), overrides)
    assert result["mIoU"] == pytest.approx(float(summary["mIoU"]), abs=1e-6)
    assert result["aAcc"] == pytest.approx(float(summary["aAcc"]), abs=1e-6)
    assert result["tokens_per_image"] == summary["tokens_per_image"]
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["mIoU"] == pytest.approx(result["mIoU"]) and saved["config"]["backbone"]["depth"] == 2
    assert list(saved["per_class_IoU"]) == list(summary["per_class_IoU"])


@pytest.mark.slow
def test_eval_slide_mode_and_overrides_on_top_of_run_config(tiny_run, tmp_path):
    """The run config (summary.json next to checkpoints/) rebuilds the model; command-line overrides win."""
    overrides = [f"ckpt_path={tiny_run['summary']['checkpoint']}", "eval.mode=slide", "eval.crop=32",
                 "eval.stride=16", "data.num_val=2"]
    result = evaluate(compose_config(overrides, "eval", tmp_path), overrides)
    assert (result["mode"], result["crop"], result["stride"]) == ("slide", 32, 16)
    assert result["tokens_per_image"] == 4  # 32 px windows: 2x2 patches each
    assert result["config"]["data"]["num_val"] == 2 and result["config"]["crop_size"] == 64
    assert result["config"]["paths"]["output_dir"] == str(tmp_path)


@pytest.mark.slow
def test_resume_from_last_checkpoint(tiny_run, tmp_path):
    last = tiny_run["output_dir"] / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4
    summary = run_train([*TINY_RUN, f"ckpt_path={last}", "trainer.max_steps=8"], tmp_path)
    assert summary["steps"] == 8


def test_eval_errors(tmp_path, compose_cfg):
    with pytest.raises(ConfigError, match="ckpt_path is required"):
        evaluate(compose_cfg([], "eval"))
    with pytest.raises(ConfigError, match="does not exist"):
        evaluate(compose_cfg([f"ckpt_path={tmp_path}/missing.ckpt"], "eval"))
    bogus = tmp_path / "bogus.ckpt"
    torch.save({"weights": {}}, bogus)
    with pytest.raises(ConfigError, match="not a segmenter checkpoint of step_lightning.train"):
        evaluate(compose_cfg([f"ckpt_path={bogus}", "method=segvit", "crop_size=32", "data.num_val=1"], "eval"))


@pytest.mark.slow
def test_eval_rebuilds_the_model_from_the_checkpoint_alone(tiny_run, tmp_path):
    """Without a run config next to the checkpoint, the model still comes from the checkpoint: a command line
    describing another architecture changes nothing; a dataset with another class count fails clearly."""
    lone = tmp_path / "lone.ckpt"
    lone.write_bytes(Path(tiny_run["summary"]["checkpoint"]).read_bytes())
    overrides = [f"ckpt_path={lone}", "backbone=vit_s", "crop_size=64", "data.num_val=4", "method=segvit"]
    result = evaluate(compose_config(overrides, "eval", tmp_path / "out"), overrides)
    assert result["mIoU"] == pytest.approx(tiny_run["summary"]["mIoU"], abs=1e-6)
    classes = [f"ckpt_path={lone}", *TINY_RUN, "data.num_classes=5"]
    with pytest.raises(ConfigError, match="trained for 8 classes but data=synthetic has 5"):
        evaluate(compose_config(classes, "eval", tmp_path / "out"), classes)


def test_eval_cli_without_checkpoint_exits_cleanly(tmp_path):
    result = run_module("step_lightning.eval", [], tmp_path)
    assert result.returncode != 0
    assert "ckpt_path is required" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_eval_can_switch_the_tokenizer(tiny_run, tmp_path):
    """method=/tau= on the eval command line change the tokenizer of the trained SegViT (no new weights)."""
    overrides = [f"ckpt_path={tiny_run['summary']['checkpoint']}", "method=dcts", "tau=1111", "data.num_val=2"]
    result = evaluate(compose_config(overrides, "eval", tmp_path), overrides)
    assert (result["config"]["method"], result["config"]["tokenizer"], result["config"]["tau"]) == ("dcts", "dcts",
                                                                                                   1111)
    assert result["config"]["backbone"]["depth"] == 2 and result["tokens_per_image"] <= 16


@pytest.mark.slow
def test_train_and_eval_cli_with_hydra_run_dir(tmp_path):
    """The CLI path: eval finds the run's .hydra/config.yaml and prints `eval: <path>` last."""
    run_dir, eval_dir = tmp_path / "train", tmp_path / "eval"
    train = run_module("step_lightning.train", [*TINY_RUN, "trainer.max_steps=2", "data.num_val=2"], run_dir)
    assert train.returncode == 0, train.stderr[-3000:]
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    result = run_module("step_lightning.eval", [f"ckpt_path={summary['checkpoint']}"], eval_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last == f"eval: {eval_dir / 'eval.json'}"
    saved = json.loads((eval_dir / "eval.json").read_text())
    assert saved["mIoU"] == pytest.approx(summary["mIoU"], abs=1e-6)
    assert saved["config"]["paths"]["output_dir"] == str(eval_dir)
