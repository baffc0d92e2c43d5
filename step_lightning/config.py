"""Config resolvers and the checks that run before any data or model is loaded."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from step_lightning.core import PATCH_SIZE, ConfigError
from step_lightning.models.vit import backbone_spec
from step_lightning.tokens.tau import parse_tau


def default_eval_stride(crop: int) -> int:
    """Sliding-window stride of the SegViT/mmseg test configs: two thirds of the crop (512 -> 341)."""
    return int(crop) * 2 // 3


def run_tags(*parts) -> list[str]:
    """``${run_tags:${method},${backbone.name},${data.name},${tags}}``: the W&B tags of a run, the user's
    ``tags`` list after method, backbone and dataset."""
    tags = []
    for part in parts:
        tags.extend(str(t) for t in (part if isinstance(part, list | ListConfig) else [part]) if t is not None)
    return list(dict.fromkeys(tags))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("eval_stride"):
        OmegaConf.register_new_resolver("eval_stride", default_eval_stride)
    if not OmegaConf.has_resolver("run_tags"):
        OmegaConf.register_new_resolver("run_tags", run_tags)


def check_prune_heads(prune_heads, depth: int) -> tuple[int, ...]:
    heads = tuple(prune_heads or ())
    if any(not isinstance(h, int) or isinstance(h, bool) for h in heads):
        raise ConfigError(f"prune_heads={list(heads)} must be a list of layer numbers, e.g. prune_heads=[8,16].")
    if list(heads) != sorted(set(heads)):
        raise ConfigError(f"prune_heads={list(heads)} must be strictly increasing, e.g. prune_heads=[8,16].")
    if heads and not (1 <= heads[0] and heads[-1] < depth):
        raise ConfigError(
            f"prune_heads={list(heads)} must lie within 1..{depth - 1} (an exit after layer {depth}, the last one, "
            "is the final head)."
        )
    return heads


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
