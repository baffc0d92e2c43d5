"""Config resolvers and the checks that run before any data or model is loaded."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from step_lightning.data.base import ConfigError
from step_lightning.models.vit import PATCH_SIZE, backbone_spec


def default_eval_stride(crop: int) -> int:
    """Sliding-window stride of the SegViT/mmseg test configs: two thirds of the crop (512 -> 341)."""
    return int(crop) * 2 // 3


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("eval_stride"):
        OmegaConf.register_new_resolver("eval_stride", default_eval_stride)


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
    devices = cfg.trainer.get("devices", 1)
    if isinstance(devices, int) and devices > 0 and "batch_size" in cfg.data:
        world = devices * cfg.trainer.get("num_nodes", 1)
        if cfg.data.batch_size % world:
            raise ConfigError(
                f"data.batch_size={cfg.data.batch_size} (global) is not divisible by the {world} devices; "
                f"use a multiple of {world}."
            )
    if cfg.eval.mode not in ("whole", "slide"):
        raise ConfigError(f"eval.mode={cfg.eval.mode} must be 'whole' or 'slide'.")
    if cfg.optim.schedule not in ("poly", "cosine"):
        raise ConfigError(f"optim.schedule={cfg.optim.schedule} must be 'poly' or 'cosine'.")
