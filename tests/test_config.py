"""Config composition and instantiation of every group option, and clear errors on bad input."""

from __future__ import annotations

import hydra
import lightning as L
import pytest
import torch
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from step_lightning.config.checks import check_config
from step_lightning.config.model import build_model_from_config, model_spec
from step_lightning.core import ConfigError
from step_lightning.models.backbones import BACKBONES, backbone_spec
from step_lightning.models.factory import build_encoder
from step_lightning.models.tokenizer import CTSTokenizer, DCTSTokenizer, PatchTokenizer
from tests.helpers import CONF_DIR, run_module

TINY_MODEL = ["debug=tiny", "policy=oracle"]
# Pinned so that train.yaml's default method (with exit heads) does not enter checks that are about other things.
SEGVIT = ["method=segvit", "policy=oracle"]


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_group_options_exist():
    assert group_options("backbone") == ["vit_b", "vit_l", "vit_s", "vit_t"]
    assert {"segvit", "cts", "dcts", "dtop", "step", "step_single", "cts_dtop"} <= set(group_options("method"))
    assert {"cpu", "ddp_sim"} <= set(group_options("trainer"))
    assert {"csv", "tensorboard"} <= set(group_options("logger"))
    assert "synthetic" in group_options("data")


@pytest.mark.parametrize("option", group_options("backbone"))
def test_backbone_options_compose_and_build(compose_cfg, option):
    cfg = compose_cfg([f"backbone={option}", "backbone.depth=1", "backbone.taps=[1]", "crop_size=32", *SEGVIT])
    check_config(cfg)
    spec = BACKBONES[option]
    assert cfg.backbone.name == option
    assert cfg.data.mean == cfg.backbone.mean  # normalisation follows the backbone
    encoder = build_encoder(model_spec(cfg, num_classes=3, ignore_index=255))
    assert (encoder.embed_dim, encoder.depth, encoder.num_heads) == (spec.embed_dim, 1, spec.num_heads)


def test_backbone_defaults_match_segvit(compose_cfg):
    b = compose_cfg(["backbone=vit_b"]).backbone
    assert (list(b.taps), b.drop_path_rate, list(b.mean)) == ([6, 8, 12], 0.1, [123.675, 116.28, 103.53])
    large = compose_cfg(["backbone=vit_l"]).backbone
    assert (list(large.taps), large.drop_path_rate, list(large.mean)) == ([8, 16, 24], 0.3, [127.5] * 3)


@pytest.mark.parametrize("option", ["cpu", "ddp_sim"])
def test_trainer_options_instantiate(compose_cfg, option):
    cfg = compose_cfg([f"trainer={option}"])
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    assert isinstance(trainer, L.Trainer)
    assert trainer.num_devices == (2 if option == "ddp_sim" else 1)


@pytest.mark.parametrize("option", ["csv", "tensorboard"])
def test_logger_options_instantiate(compose_cfg, tmp_path, option):
    cfg = compose_cfg([f"logger={option}"], output_dir=tmp_path)
    (logger,) = [hydra.utils.instantiate(c) for c in cfg.logger.values()]
    assert str(logger.save_dir) == str(tmp_path)


def test_callbacks_and_synthetic_data_instantiate(compose_cfg):
    cfg = compose_cfg(["crop_size=32", "data.num_train=2", "data.num_val=2"])
    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values()]
    assert {"BestCheckpoint", "LearningRateMonitor", "TQDMProgressBar"} <= {type(c).__name__ for c in callbacks}
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    sample = datamodule.val_set[0]
    assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32
    assert sample["label"].shape == (32, 32) and sample["label"].dtype == torch.int64
    assert datamodule.num_classes == len(datamodule.class_names) == cfg.data.num_classes


@pytest.mark.parametrize(("method", "tokenizer"), [("segvit", PatchTokenizer), ("cts", CTSTokenizer),
                                                   ("dcts", DCTSTokenizer)])
def test_method_presets_build_and_run(compose_cfg, method, tokenizer):
    cfg = compose_cfg([f"method={method}", *TINY_MODEL])
    check_config(cfg)
    model = build_model_from_config(cfg, num_classes=5).eval()
    assert isinstance(model.tokenizer, tokenizer)
    assert model.tokenizer.name == ("patch" if method == "segvit" else method)
    labels = torch.zeros(1, 64, 64, dtype=torch.long)
    labels[:, 32:, :] = 1  # two homogeneous halves: the oracle merges them into supertokens
    out = model(torch.randn(1, 3, 64, 64), labels)
    assert out.outputs[-1]["mask_logits"].shape == (1, 5, 4, 4)
    assert out.outputs[-1]["class_logits"].shape == (1, 5, 6)
    assert (out.tokens < 16).all() if method == "dcts" else (out.tokens <= 16).all()


@pytest.mark.parametrize(
    ("method", "tokenizer", "tau", "heads"),
    [("dtop", "patch", None, [6, 8]), ("step", "dcts", 6899, [6, 8]), ("step_single", "dcts", 6899, [8]),
     ("cts_dtop", "cts", None, [6, 8])],
)
def test_early_exit_presets_compose(compose_cfg, method, tokenizer, tau, heads):
    cfg = compose_cfg([f"method={method}", "backbone=vit_b"])
    check_config(cfg)
    assert (cfg.method, cfg.tokenizer, cfg.tau, list(cfg.prune_heads)) == (method, tokenizer, tau, heads)
    large = compose_cfg([f"method={method}", "backbone=vit_l"])
    assert list(large.prune_heads) == {"step_single": [18]}.get(method, [8, 16])


@pytest.mark.parametrize("data", ["ade20k", "cityscapes", "cocostuff10k", "cocostuff164k", "synthetic"])
def test_data_options_compose_and_resolve(compose_cfg, data):
    cfg = compose_cfg([f"data={data}"])
    resolved = OmegaConf.to_container(cfg.data, resolve=True)
    assert resolved["_target_"].startswith("step_lightning.data.")
    assert resolved["crop_size"] == cfg.crop_size


@pytest.mark.parametrize("config_name", ["train", "flops", "eval"])
def test_entry_configs_compose(compose_cfg, config_name):
    cfg = compose_cfg([], config_name=config_name)
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert resolved["eval"]["stride"] == resolved["crop_size"] * 2 // 3  # mmseg's 512 -> 341
    if config_name == "eval":
        assert cfg.ckpt_path is None and cfg.run_config is None  # eval refuses to run without ckpt_path


# ---- bad input -------------------------------------------------------------------------------------------


def test_unknown_backbone_names_the_choices(compose_cfg):
    with pytest.raises(ConfigError, match=r"unknown backbone 'vit_h'.*vit_b.*vit_l.*vit_s.*vit_t"):
        backbone_spec("vit_h")
    cfg = compose_cfg(["backbone.name=vit_h"])
    with pytest.raises(ConfigError, match="vit_b"):
        check_config(cfg)
    with pytest.raises(ConfigError, match="vit_b"):
        build_model_from_config(cfg, num_classes=3)
    with pytest.raises(MissingConfigException, match="vit_b"):  # Hydra lists the group's options
        compose_cfg(["backbone=vit_h"])


@pytest.mark.parametrize("tau", ["68a9", "689", "68999", "6.8"])
def test_malformed_tau_raises_config_error(compose_cfg, tau):
    cfg = compose_cfg(["method=dcts", f"tau={tau}", *TINY_MODEL])
    with pytest.raises(ConfigError, match="four digits"):
        build_model_from_config(cfg, num_classes=3)


@pytest.mark.parametrize(
    ("heads", "message"),
    [("[8,6]", "strictly increasing"), ("[6,6]", "strictly increasing"), ("[6,12]", r"within 1\.\.11"),
     ("[0,6]", r"within 1\.\.11"), ("[a]", "list of layer numbers")],
)
def test_bad_prune_heads(compose_cfg, heads, message):
    cfg = compose_cfg(["backbone=vit_b", f"prune_heads={heads}"])
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


def test_prune_heads_checked_against_truncated_depth(compose_cfg):
    # depth 2: an exit after layer 2 would be the final head
    cfg = compose_cfg(["method=segvit", "prune_heads=[2]", *TINY_MODEL])
    with pytest.raises(ConfigError, match=r"within 1\.\.1"):
        build_model_from_config(cfg, num_classes=3)


@pytest.mark.parametrize("crop", [100, 0, -16])
def test_crop_not_multiple_of_16(compose_cfg, crop):
    with pytest.raises(ConfigError, match="multiple of 16"):
        check_config(compose_cfg([f"crop_size={crop}", *SEGVIT]))


def test_other_config_checks(compose_cfg):
    with pytest.raises(ConfigError, match="backbone.taps"):
        check_config(compose_cfg(["backbone.depth=2", "backbone.taps=[1,3]", *SEGVIT]))
    with pytest.raises(ConfigError, match="divisible"):
        check_config(compose_cfg(["trainer=ddp_sim", "data.batch_size=3", *SEGVIT]))
    with pytest.raises(ConfigError, match="whole' or 'slide"):
        check_config(compose_cfg(["eval.mode=sliding", *SEGVIT]))
    with pytest.raises(ConfigError, match="tau"):
        build_model_from_config(compose_cfg(["method=segvit", "tokenizer=dcts", *TINY_MODEL]), num_classes=3)


@pytest.fixture(scope="module")
def train_cli_bad_crop(tmp_path_factory):
    result = run_module("step_lightning.train", ["crop_size=100"], tmp_path_factory.mktemp("bad_crop"))
    return result, result.stdout + result.stderr


def test_train_cli_bad_crop_exits_with_message(train_cli_bad_crop):
    result, text = train_cli_bad_crop
    assert result.returncode != 0
    assert "crop_size=100 must be a positive multiple of 16" in text


def test_train_cli_bad_crop_has_no_traceback(train_cli_bad_crop):
    result, text = train_cli_bad_crop
    assert result.returncode != 0
    assert "Traceback" not in text
