"""The plain ViT/16 backbones: timm definition, width, depth, heads, and the layers SegViT's head taps."""

from __future__ import annotations

from dataclasses import dataclass

from step_lightning.core import ConfigError


@dataclass(frozen=True)
class BackboneSpec:
    timm_name: str
    embed_dim: int
    depth: int
    num_heads: int
    taps: tuple[int, ...]  # 1-indexed layers whose outputs feed the SegViT head


BACKBONES: dict[str, BackboneSpec] = {
    "vit_t": BackboneSpec("vit_tiny_patch16_224", 192, 12, 3, (6, 8, 12)),
    "vit_s": BackboneSpec("vit_small_patch16_224", 384, 12, 6, (6, 8, 12)),
    "vit_b": BackboneSpec("vit_base_patch16_224", 768, 12, 12, (6, 8, 12)),
    "vit_l": BackboneSpec("vit_large_patch16_224", 1024, 24, 16, (8, 16, 24)),
}


def backbone_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone '{name}'; choose one of {sorted(BACKBONES)} (e.g. backbone=vit_b).")
    return BACKBONES[name]
