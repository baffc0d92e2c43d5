"""Builds the segmenter that a config describes."""

from __future__ import annotations

from omegaconf import DictConfig

from step_lightning.models.segmenter import Segmenter
from step_lightning.models.vit import ViTEncoder


def build_encoder(backbone: DictConfig, crop_size: int) -> ViTEncoder:
    return ViTEncoder(
        backbone.name,
        img_size=crop_size,
        drop_path_rate=backbone.drop_path_rate,
        pretrained=backbone.get("pretrained"),
        depth=backbone.get("depth"),
    )


def build_model(cfg: DictConfig, num_classes: int) -> Segmenter:
    encoder = build_encoder(cfg.backbone, cfg.crop_size)
    taps = tuple(t for t in cfg.backbone.taps if t <= encoder.depth)
    return Segmenter(encoder, num_classes, taps)
