"""Recipes: data=<dataset> backbone=<b> selects the paper's recipe; every config option composes and passes
the checks; DToP's two phases run as one command; the synthetic default keeps the demo recipe."""

from __future__ import annotations

import itertools
import os

import pytest
from omegaconf import OmegaConf

from step_lightning.config.checks import check_config, check_training_weights
from step_lightning.core import ConfigError
from tests.helpers import CONF_DIR, TINY_RUN, compose_config, run_train

MISSION = ["backbone=vit_l", "prune_heads=[8,16]", "tau=6899", "data=ade20k"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_mission_command_is_the_vit_l_ade20k_recipe(tmp_path):
    cfg = compose_config(MISSION, output_dir=tmp_path)
    check_config(cfg)
    check_training_weights(cfg)
    assert (cfg.method, cfg.tau, list(cfg.prune_heads), cfg.model.tau) == ("step", 6899, [8, 16], 6899)
    assert cfg.crop_size == 640 and list(cfg.data.base_scale) == [2048, 640]
    assert (cfg.eval.mode, cfg.eval.crop, cfg.eval.stride) == ("slide", 640, 608)
    assert (cfg.trainer.max_steps, cfg.trainer.accelerator, cfg.data.batch_size) == (160000, "auto", 4)
    assert cfg.trainer.precision in ("bf16-mixed", "16-mixed", "32-true")
    optim = cfg.optim
    assert (optim.lr, optim.weight_decay, optim.head_lr_mult, optim.schedule, optim.warmup_steps) == (
        6e-5, 0.01, 10.0, "cosine", 1500)
    assert optim.param_groups == "segvit"
    assert cfg.backbone.pretrained == cfg.model.pretrained == "vit_large_patch16_384.augreg_in21k_ft_in1k"
    assert (cfg.model.exit_num_heads, cfg.prune_threshold, cfg.halting_finetune_steps) == (8, 0.9, 40000)
    policy = cfg.policy_train
    assert (policy.whole_image_size, policy.schedule, policy.lr) == (512, "constant", 5e-5)


@pytest.mark.parametrize(("data", "backbone"), itertools.product(["ade20k", "cocostuff10k", "cityscapes"],
                                                                 ["vit_b", "vit_l"]))
def test_each_dataset_and_backbone_has_its_recipe(tmp_path, data, backbone):
    cfg = compose_config([f"data={data}", f"backbone={backbone}"], output_dir=tmp_path)
    assert cfg.trainer.accelerator == "auto" and cfg.optim.lr == 6e-5 and cfg.backbone.pretrained
    expected = {"ade20k": (160000, 0.9), "cocostuff10k": (80000, 0.95), "cityscapes": (90000, 0.9)}[data]
    assert (cfg.trainer.max_steps, cfg.prune_threshold) == expected
    assert backbone.removeprefix("vit_").replace("b", "base").replace("l", "large") in cfg.backbone.pretrained


def test_synthetic_default_keeps_the_demo_recipe(tmp_path):
    cfg = compose_config([], output_dir=tmp_path)
    assert (cfg.crop_size, cfg.trainer.accelerator, cfg.trainer.max_steps, cfg.optim.lr) == (192, "cpu", 400, 5e-4)
    assert cfg.backbone.pretrained is None and cfg.halting_finetune_steps == 0
    check_training_weights(cfg)  # synthetic scenes train from scratch


def test_real_data_from_random_weights_needs_asking(tmp_path):
    cfg = compose_config(["data=ade20k", "backbone=vit_b", "backbone.pretrained=null"], output_dir=tmp_path)
    with pytest.raises(ConfigError, match="backbone.pretrained=none"):
        check_training_weights(cfg)
    check_training_weights(compose_config(["data=ade20k", "backbone.pretrained=none"], output_dir=tmp_path))


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_and_passes_the_checks(tmp_path, experiment):
    cfg = compose_config([f"experiment={experiment}"], output_dir=tmp_path)
    check_config(cfg)
    check_training_weights(cfg)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in ("backbone", "data", "method", "trainer", "logger",
                                                                "callbacks", "debug", "paths", "recipe")
                                               for o in options(g)])
def test_every_group_option_composes_and_passes_the_checks(tmp_path, monkeypatch, group, option):
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    overrides = ["backbone.pretrained=none", "data.batch_size=4"] if group != "trainer" else []
    if group == "recipe":
        data, backbone = option.rsplit("_vit_", 1) if "_vit_" in option else ("ade20k", "b")
        overrides = [f"data={data}", f"backbone=vit_{backbone}"]
    elif group != "data":
        overrides.append(f"{group}={option}")
    else:
        overrides = [f"data={option}", "backbone.pretrained=none", "data.num_classes=3"] if option == "folder" \
            else [f"data={option}", "backbone.pretrained=none"]
    cfg = compose_config(overrides, output_dir=tmp_path)
    check_config(cfg)
    OmegaConf.to_container(cfg, resolve=True)


def test_two_phases_in_one_run_and_resumable(tmp_path):
    overrides = [*TINY_RUN, "method=dtop", "data.num_train=8", "data.num_val=2", "halting_finetune_steps=2",
                 "prune_threshold=0.5"]
    summary = run_train(overrides, tmp_path)
    first = summary["phases"]["no_halting"]
    assert first["config"]["prune_threshold"] == 1.0 and first["exit_stats"]["halted_fraction"] == 0.0
    assert first["checkpoint"].startswith(str(tmp_path / "no_halting" / "checkpoints"))
    assert summary["config"]["init_from"] == first["checkpoint"] and summary["config"]["prune_threshold"] == 0.5
    assert summary["steps"] == 2 and first["steps"] == 4
    done = tmp_path / "no_halting" / "summary.json"
    stamp = os.stat(done).st_mtime_ns
    (tmp_path / "summary.json").unlink()
    run_train(overrides, tmp_path)  # a rerun keeps the finished first phase
    assert os.stat(done).st_mtime_ns == stamp
