"""The checks that run on a composed config before any data or model is loaded."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, ListConfig

from step_lightning.config.extras import check_logger_extras
from step_lightning.config.model import policy_file, tokenizer_kind
from step_lightning.core import PATCH_SIZE, ConfigError
from step_lightning.models.backbones import backbone_spec
from step_lightning.models.factory import check_prune_heads
from step_lightning.tokens.policy import window_sizes_for
from step_lightning.tokens.tau import parse_tau


def world_size(trainer: DictConfig) -> int | None:
    """Processes the trainer config will run (devices x nodes); None where only Lightning can tell."""
    devices = trainer.get("devices", 1)
    if isinstance(devices, ListConfig | list):
        count = len(devices)
    elif isinstance(devices, str) and devices.strip().isdigit():
        count = int(devices)
    elif isinstance(devices, int) and devices > 0:
        count = devices
    elif devices in (-1, "-1", "auto") and trainer.get("accelerator") in ("gpu", "cuda"):
        count = torch.cuda.device_count()
        if count == 0:
            return None
    else:
        return None
    return count * int(trainer.get("num_nodes", 1) or 1)


def check_config(cfg: DictConfig) -> None:
    """Fail fast, with the fix in the message, on mistakes that would otherwise surface deep in a run."""
    spec = backbone_spec(cfg.backbone.name)
    depth = cfg.backbone.get("depth") or spec.depth
    crop = cfg.crop_size
    if not isinstance(crop, int) or crop <= 0 or crop % PATCH_SIZE:
        raise ConfigError(f"crop_size={crop} must be a positive multiple of {PATCH_SIZE} (e.g. 512).")
    check_prune_heads(cfg.get("prune_heads"), depth)
    taps = list(cfg.backbone.taps)
    if taps != sorted(set(taps)) or taps[0] < 1 or taps[-1] > depth:
        raise ConfigError(f"backbone.taps={taps} must be increasing layer numbers within 1..{depth}.")
    if cfg.get("tau") is not None:
        parse_tau(cfg.tau)
    check_policy(cfg)
    check_policy_data(cfg)
    world = world_size(cfg.trainer)
    if world and "batch_size" in cfg.data and cfg.data.batch_size % world:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} (global) is not divisible by the {world} devices; "
            f"use a multiple of {world}."
        )
    if cfg.eval.mode not in ("whole", "slide"):
        raise ConfigError(f"eval.mode={cfg.eval.mode} must be 'whole' or 'slide'.")
    if cfg.optim.schedule not in ("poly", "cosine"):
        raise ConfigError(f"optim.schedule={cfg.optim.schedule} must be 'poly' or 'cosine'.")
    check_logger_extras(cfg)


def check_training_weights(cfg: DictConfig) -> None:
    """A real dataset's recipe fine-tunes pretrained weights: starting from random ones is asked for explicitly."""
    if cfg.get("task", "segment") == "segment" and cfg.data.get("name") != "synthetic" and not cfg.backbone.pretrained:
        raise ConfigError(
            f"data={cfg.data.name} would train a {cfg.backbone.name} from random weights; name pretrained weights "
            "(backbone.pretrained=<timm tag or file>, e.g. vit_base_patch16_384.augreg_in21k_ft_in1k) or ask for "
            "random ones on purpose with backbone.pretrained=none."
        )


def check_policy(cfg: DictConfig) -> None:
    """A supertoken method's policy: trainable on this crop (policy=train), an existing checkpoint, or an untrained
    network (policy=random: its cost, for speed measurements)."""
    if tokenizer_kind(cfg) == "patch" or cfg.get("policy") in (None, "oracle", "random"):
        return
    if str(cfg.policy) != "train":
        policy_file(cfg)
    elif not window_sizes_for(cfg.crop_size):
        raise ConfigError(
            f"crop_size={cfg.crop_size} holds no 2x2 window of {PATCH_SIZE} px patches for policy=train to learn; "
            f"use crop_size >= {2 * PATCH_SIZE}."
        )


POLICY_DATA = ("augmented", "whole", "crops")


def check_policy_data(cfg: DictConfig) -> None:
    """The policy's training data (``policy_train``): a known mode, and whole images or crops that hold a window
    of every size the policy has a head for (a head without targets would never learn)."""
    policy_train = cfg.get("policy_train")
    if policy_train is None:
        return
    data, size = policy_train.get("data", "augmented"), policy_train.get("size")
    if data not in POLICY_DATA:
        raise ConfigError(f"policy_train.data={data} must be one of {', '.join(POLICY_DATA)}.")
    if data == "augmented":
        return
    if not isinstance(size, int) or size <= 0 or size % PATCH_SIZE:
        raise ConfigError(f"policy_train.size={size} must be a positive multiple of {PATCH_SIZE} (e.g. the crop_size).")
    largest = max(window_sizes_for(cfg.crop_size), default=0)
    if size < largest * PATCH_SIZE:
        raise ConfigError(
            f"policy_train.size={size} holds no {largest}x{largest} window ({largest * PATCH_SIZE} px), which the "
            f"policy scores at crop_size={cfg.crop_size}; use policy_train.size >= {largest * PATCH_SIZE}."
        )
