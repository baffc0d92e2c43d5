"""Plain ViT/16 encoder (timm definitions) without class token, its blocks running over token rows."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from step_lightning.core import ConfigError
from step_lightning.models.backbones import BACKBONES, backbone_spec
from step_lightning.models.packed import Packing, drop_path_rows, self_attention
from step_lightning.models.pretrained import vit_state_dict


class RowBlock(Block):
    """timm's ViT ``Block`` (its modules, so timm and pretrained state dicts load unchanged) over token rows
    x [rows, C] of a ``Packing``: norms, projections and the MLP run over the rows, attention per image by the
    kernel the packing selects (variable-length or dense with a key mask), drop path per image. timm's own
    forward assumes [B, N, C]: its DropPath would drop single tokens of rows."""

    def forward(self, x: Tensor, packing: Packing) -> Tensor:
        attn = self.attn
        rows = x.shape[0]
        y = self.norm1(x)
        qkv = attn.qkv(y).view(rows, 3, attn.num_heads, attn.head_dim)
        if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
            q, k, v = qkv.unbind(1)
            qkv = torch.stack((attn.q_norm(q), attn.k_norm(k), v), 1)
        out = self_attention(qkv, packing, attn.scale).reshape(rows, attn.attn_dim)
        out = attn.norm(out)
        if getattr(attn, "gate", None) is not None:
            out = out * attn.gate(y).sigmoid()
        out = attn.proj_drop(attn.proj(out))
        x = x + drop_path_rows(self.drop_path1, self.ls1(out), packing)
        return x + drop_path_rows(self.drop_path2, self.ls2(self.mlp(self.norm2(x))), packing)


class ViTEncoder(nn.Module):
    """timm VisionTransformer blocks driven by our own forward so tokens can be any set of (super)patches.

    No class token and no final norm (SegViT taps raw block outputs). The position embedding is stored for
    the pretraining grid and resized bicubically to the input grid on use.
    """

    def __init__(
        self,
        name: str = "vit_b",
        img_size: int = 512,
        drop_path_rate: float = 0.1,
        pretrained: str | None = None,
        depth: int | None = None,
        pretrained_file: str | None = None,
    ):
        super().__init__()
        spec = backbone_spec(name)
        self.name = name
        self.depth = depth or spec.depth
        if not 1 <= self.depth <= spec.depth:
            raise ConfigError(f"backbone.depth={depth} must be within 1..{spec.depth} for {name}.")
        vit = timm.create_model(
            spec.timm_name,
            pretrained=False,
            num_classes=0,
            class_token=False,
            global_pool="avg",
            img_size=img_size,
            depth=self.depth,
            drop_path_rate=drop_path_rate,
            block_fn=RowBlock,
        )
        self.embed_dim = spec.embed_dim
        self.num_heads = spec.num_heads
        self.patch_embed = vit.patch_embed
        self.pos_embed = vit.pos_embed  # [1, Hp0*Wp0, C]
        self.pos_grid_size = vit.patch_embed.grid_size
        self.blocks = vit.blocks
        self.load_pretrained(pretrained, pretrained_file)

    def load_pretrained(self, source: str | None, pretrained_file: str | None = None) -> None:
        """Weights from a timm tag (timm's Hugging Face cache, or ``pretrained_file``) or a local timm, big_vision
        or mmseg checkpoint; see ``step_lightning.models.pretrained.vit_state_dict``."""
        spec = BACKBONES[self.name]
        state = vit_state_dict(source, self.name, spec, tuple(self.pos_grid_size), self.depth, pretrained_file)
        if state is None:
            return
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"backbone.pretrained={source} does not fit {self.name} ({len(missing)} tensors missing, "
                f"{len(unexpected)} unknown, e.g. {(missing + unexpected)[0]}); give a plain ViT/16 checkpoint."
            )

    def pos_embed_grid(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embedding resized (bicubic, as SegViT) to a grid_h x grid_w token grid: [1, C, Hp, Wp]."""
        pos = self.pos_embed.reshape(1, *self.pos_grid_size, -1).permute(0, 3, 1, 2)
        if (grid_h, grid_w) == tuple(self.pos_grid_size):
            return pos
        return F.interpolate(pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Regular 16x16 patch tokens with position embedding: [B, Hp*Wp, C]."""
        feats = self.patch_embed.proj(images)  # [B, C, Hp, Wp]
        feats = feats + self.pos_embed_grid(*feats.shape[-2:])
        return feats.flatten(2).transpose(1, 2)
