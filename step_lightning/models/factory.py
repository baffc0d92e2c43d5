"""Builds the segmenter that a config describes (method presets resolve to tokenizer + exit heads)."""

from __future__ import annotations

from omegaconf import DictConfig

from step_lightning.config import check_prune_heads
from step_lightning.core import ConfigError
from step_lightning.models.segmenter import Segmenter
from step_lightning.models.tokenizer import PatchTokenizer, SupertokenTokenizer
from step_lightning.models.vit import ViTEncoder
from step_lightning.tokens.tau import parse_tau


def build_encoder(backbone: DictConfig, crop_size: int) -> ViTEncoder:
    return ViTEncoder(
        backbone.name,
        img_size=crop_size,
        drop_path_rate=backbone.drop_path_rate,
        pretrained=backbone.get("pretrained"),
        depth=backbone.get("depth"),
        pretrained_file=backbone.get("pretrained_file"),
    )


def tokenizer_kind(cfg: DictConfig) -> str:
    """'cts' when asked for; otherwise a tau selects dCTS; otherwise plain patches."""
    kind = cfg.get("tokenizer", "patch")
    if kind not in ("patch", "cts", "dcts"):
        raise ConfigError(f"tokenizer={kind} must be one of patch, cts, dcts")
    if kind == "patch" and cfg.get("tau") is not None:
        return "dcts"
    if kind == "dcts" and cfg.get("tau") is None:
        raise ConfigError("tokenizer=dcts needs merging thresholds: set tau, e.g. tau=6899")
    return kind


def build_policy(cfg: DictConfig):
    """None for the oracle, else the frozen trained policy from its checkpoint."""
    policy = cfg.get("policy", "oracle")
    if policy in (None, "oracle"):
        return None
    if policy == "train":
        raise ConfigError(
            "policy=train trains a policy at the start of a training run; here give a checkpoint "
            "(policy=/path/to/policy/last.ckpt) or policy=oracle."
        )
    from pathlib import Path

    from step_lightning.lit.policy_module import load_policy

    if not Path(str(policy)).is_file():
        raise ConfigError(
            f"policy={policy} is neither 'oracle' nor an existing checkpoint; train one with "
            "`python -m step_lightning.train task=policy` or use policy=oracle."
        )
    return load_policy(str(policy), mean=list(cfg.backbone.mean), std=list(cfg.backbone.std))


def build_tokenizer(cfg: DictConfig, ignore_index: int = 255):
    kind = tokenizer_kind(cfg)
    if kind == "patch":
        return PatchTokenizer()
    thresholds = parse_tau(cfg.tau) if kind == "dcts" else (0.6, 0.8, 0.9, 0.9)
    return SupertokenTokenizer(kind, build_policy(cfg), thresholds, cfg.get("cts_k"), ignore_index)


def build_model(cfg: DictConfig, num_classes: int, ignore_index: int = 255) -> Segmenter:
    encoder = build_encoder(cfg.backbone, cfg.crop_size)
    tokenizer = build_tokenizer(cfg, ignore_index)
    prune_heads = check_prune_heads(cfg.get("prune_heads"), encoder.depth)
    if prune_heads:
        from step_lightning.models.early_exit import EarlyExitSegmenter

        return EarlyExitSegmenter(encoder, num_classes, prune_heads, tokenizer, cfg.prune_threshold)
    taps = tuple(t for t in cfg.backbone.taps if t <= encoder.depth)
    return Segmenter(encoder, num_classes, taps, tokenizer)
