"""Recipes: data=<dataset> backbone=<b> selects the paper's recipe; every config option composes and passes
the checks; DToP's two phases run as one command; the synthetic default keeps the demo recipe."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from step_lightning.config.checks import check_config, check_training_weights
from step_lightning.core import ConfigError
from step_lightning.data.transforms import TEST_LONG_SIDE
from tests.helpers import CONF_DIR, REPO, TINY_RUN, compose_config, record_validations, run_train

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
    policy = cfg.policy_train  # CTS's ADE20K policy data at the resolution the segmenter scores
    assert (policy.data, policy.size, policy.exclude_border, policy.schedule, policy.lr) == (
        "whole", 640, True, "constant", 5e-5)


@pytest.mark.parametrize(("data", "backbone"), itertools.product(["ade20k", "cocostuff10k", "cityscapes"],
                                                                 ["vit_b", "vit_l"]))
def test_each_dataset_and_backbone_has_its_recipe(tmp_path, data, backbone):
    cfg = compose_config([f"data={data}", f"backbone={backbone}"], output_dir=tmp_path)
    assert cfg.trainer.accelerator == "auto" and cfg.optim.lr == 6e-5 and cfg.backbone.pretrained
    expected = {"ade20k": (160000, 0.9), "cocostuff10k": (80000, 0.95), "cityscapes": (90000, 0.9)}[data]
    assert (cfg.trainer.max_steps, cfg.prune_threshold) == expected
    assert backbone.removeprefix("vit_").replace("b", "base").replace("l", "large") in cfg.backbone.pretrained


@pytest.mark.parametrize(("crop", "stride"), [(1024, 768), (768, 512), (512, 341)])
def test_cityscapes_recipes_slide_and_train_the_policy_as_mmseg_and_cts(tmp_path, crop, stride):
    """mmseg's Cityscapes test strides; CTS's Cityscapes policy data (random full-resolution crops, no border rule),
    1024 px tall whatever the crop; the other datasets keep whole images at the crop (2/3-crop strides)."""
    for backbone in ("vit_b", "vit_l"):
        cfg = compose_config([f"experiment=cityscapes_{backbone}_{crop}"], output_dir=tmp_path)
        check_config(cfg)
        assert (cfg.crop_size, cfg.eval.mode, cfg.eval.crop, cfg.eval.stride) == (crop, "slide", crop, stride)
        assert list(cfg.data.eval_scale) == [2048, 1024]
        policy = cfg.policy_train
        assert (policy.data, policy.size, policy.exclude_border) == ("crops", 1024, False)
    for data in ("ade20k", "cocostuff10k"):
        cfg = compose_config([f"data={data}", "backbone=vit_b"], output_dir=tmp_path)
        assert (cfg.policy_train.data, cfg.policy_train.size, cfg.eval.stride) == ("whole", 512, 341)


def test_policy_data_settings_are_checked_before_work(tmp_path):
    def check(*overrides):
        check_config(compose_config(["data=ade20k", "backbone=vit_b", *overrides], output_dir=tmp_path))

    with pytest.raises(ConfigError, match="policy_train.data=random must be one of 'augmented', 'whole', 'crops'"):
        check("policy_train.data=random")
    with pytest.raises(ConfigError, match="policy_train.size=500 must be a positive multiple of 16"):
        check("policy_train.size=500")
    with pytest.raises(ConfigError, match=r"policy_train.size=128 holds no 16x16 window \(256 px\)"):
        check("policy_train.size=128")
    check("policy_train.size=256")
    check("policy_train.data=augmented", "policy_train.size=128")  # the size of the other modes: unused


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"## {title}\n")
    return text[start : text.index("\n## ", start + 1)]


def readme_recipe_rows() -> dict[str, dict[str, str]]:
    section = readme_section("Real datasets and the paper's recipes")
    table = section[section.index("| recipe |") :].split("\n\n")[0].splitlines()
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    return {row[0].strip("`"): dict(zip(header, row, strict=True))
            for row in ([cell.strip() for cell in line.strip("|").split("|")] for line in table[2:])}


def test_readme_recipe_table_matches_the_configs(tmp_path):
    rows = readme_recipe_rows()
    assert sorted(rows) == [o for o in options("recipe") if o != "paper"]
    for name, row in rows.items():
        data, backbone = name.rsplit("_vit_", 1)
        cfg = compose_config([f"data={data}", f"backbone=vit_{backbone}"], output_dir=tmp_path)
        crop = cfg.crop_size
        expected_crop = str(crop) + (f" (resize base {cfg.data.base_scale[0]}x{cfg.data.base_scale[1]})"
                                     if list(cfg.data.base_scale) != [2048, 512] and data != "cityscapes" else "")
        eval_scale = cfg.data.get("eval_scale")
        expected_eval = (f"full {eval_scale[0]}x{eval_scale[1]}, " if eval_scale else "") + \
            f"{cfg.eval.mode} {cfg.eval.crop}/{cfg.eval.stride}"
        policy = cfg.policy_train
        expected_policy = (f"whole images at {policy.size}x{policy.size}" if policy.data == "whole"
                           else f"{policy.size} crops at full resolution")
        assert policy.data in ("whole", "crops") and policy.exclude_border == (policy.data == "whole")
        assert row == {
            "recipe": f"`{name}`",
            "crop": expected_crop,
            "steps": f"{cfg.trainer.max_steps // 1000}k",
            "halting fine-tuning": f"{cfg.halting_finetune_steps // 1000}k",
            "batch": str(cfg.data.batch_size),
            "lr": f"{cfg.optim.lr:.0e}".replace("e-0", "e-"),
            "eval": expected_eval,
            "policy data": expected_policy,
            "weights": f"`{cfg.backbone.pretrained}`",
            "exit heads": row["exit heads"],
        }, name
        assert row["exit heads"].startswith(f"{cfg.model.exit_num_heads} x "), name


def test_readme_design_notes_match_the_configs(tmp_path):
    """The protocol details the design notes state, each against the config that sets it."""
    notes = " ".join(readme_section("Design notes").split())
    strides = {crop: compose_config([f"experiment=cityscapes_vit_b_{crop}"], output_dir=tmp_path).eval.stride
               for crop in (512, 768, 1024)}
    city = compose_config(["data=cityscapes", "backbone=vit_b"], output_dir=tmp_path)
    ade_b, ade_l = (compose_config(["data=ade20k", f"backbone={b}"], output_dir=tmp_path) for b in ("vit_b", "vit_l"))
    for phrase in [
        f"on Cityscapes {strides[1024]} at crop 1024",
        f"and {strides[768]} at 768",
        f"so {strides[512]} there as elsewhere",
        f"SegViT's {ade_l.eval.stride} for its {ade_l.crop_size} on ADE20K",
        f"min({TEST_LONG_SIDE} / long side, crop / short side)",
        f"`scale=({city.data.eval_scale[0]}, {city.data.eval_scale[1]})`",
        f"(`{city.policy_train.data}`, `policy_train.exclude_border={str(city.policy_train.exclude_border).lower()}`)",
        f"here the crops are {city.policy_train.size} px",
        f"(`{ade_b.policy_train.data}`, `policy_train.size`: {ade_b.policy_train.size}, and "
        f"{ade_l.policy_train.size} for ViT-L on ADE20K",
        f"constant lr {ade_b.policy_train.lr:.0e}".replace("e-0", "e-") + f", batch {ade_b.policy_train.batch_size}, "
        f"{ade_b.policy_train.max_steps // 1000}k steps",
        "`policynet/policynet/data_cityscapes.py`", "`policynet/policynet/data_ade20k.py`",
    ]:
        assert phrase in notes, phrase
    assert (ade_b.policy_train.schedule, ade_b.policy_train.exclude_border) == ("constant", True)


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


def test_two_phases_in_one_run_and_resumable(tmp_path, monkeypatch):
    """Phase lengths that are not multiples of the validation interval (2): each phase ends with a validation of
    its last step; the halting fine-tune starts from the first phase's last weights."""
    validated = record_validations(monkeypatch)
    overrides = [*TINY_RUN, "method=dtop", "data.num_train=8", "data.num_val=2", "trainer.max_steps=5",
                 "halting_finetune_steps=3", "prune_threshold=0.5"]
    summary = run_train(overrides, tmp_path)
    assert [step for step, _ in validated] == [2, 4, 5, 2, 3]
    first = summary["phases"]["no_halting"]
    assert first["config"]["prune_threshold"] == 1.0 and first["exit_stats"]["halted_fraction"] == 0.0
    assert first["checkpoint"] == str(tmp_path / "no_halting" / "checkpoints" / "last.ckpt")
    assert first["best"]["step"] in (2, 4, 5) and Path(first["best"]["checkpoint"]).is_file()
    assert summary["config"]["init_from"] == first["checkpoint"] and summary["config"]["prune_threshold"] == 0.5
    assert summary["steps"] == 3 and first["steps"] == 5
    assert torch.load(summary["checkpoint"], map_location="cpu", weights_only=False)["global_step"] == 3
    done = tmp_path / "no_halting" / "summary.json"
    stamp = os.stat(done).st_mtime_ns
    (tmp_path / "summary.json").unlink()
    run_train(overrides, tmp_path)  # a rerun keeps the finished first phase
    assert os.stat(done).st_mtime_ns == stamp

