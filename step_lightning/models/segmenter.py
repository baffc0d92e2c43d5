"""SegViT segmenter: tokenizer -> plain ViT encoder -> cascaded ATM head reading the tapped layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from step_lightning.models.atm import ATMHead
from step_lightning.models.base import SegmenterBase
from step_lightning.models.engine import InferenceOptions, SegmenterOutput
from step_lightning.models.vit import ViTEncoder


class Segmenter(SegmenterBase):
    """SegViT: a tokenizer (plain patches, or dCTS/CTS supertokens) -> ViT -> the cascaded ATM head reading
    the tapped layers (deepest first). The encoder's stages end at the taps."""

    cascade = True

    def __init__(
        self,
        encoder: ViTEncoder,
        num_classes: int,
        taps: tuple[int, ...],
        tokenizer: nn.Module | None = None,
        head_layers: int = 3,
    ):
        super().__init__(encoder, num_classes, tokenizer)
        if any(not 1 <= t <= encoder.depth for t in taps) or list(taps) != sorted(set(taps)):
            raise ValueError(f"taps {taps} must be increasing layer numbers within 1..{encoder.depth}")
        self.taps = tuple(taps)
        bounds = (0, *self.taps)
        self.stages = list(zip(bounds[:-1], bounds[1:], strict=True))
        self.head = ATMHead(encoder.embed_dim, num_classes, num_inputs=len(taps), num_layers=head_layers)

    def stage_head(self, index: int) -> nn.Module | None:
        return self.head if index == len(self.stages) - 1 else None

    @torch.no_grad()
    def predict(
        self, images: torch.Tensor, labels: torch.Tensor | None = None, options: InferenceOptions | None = None
    ) -> tuple[torch.Tensor, SegmenterOutput]:
        """SegViT's inference order: the final mask logits are upsampled to the input size first, then
        sigmoid and the class combination run per pixel (early-exit heads combine on the grid instead)."""
        out = self(images, labels, options)
        final = out.outputs[-1]
        logits = F.interpolate(final["mask_logits"], size=images.shape[-2:], mode="bilinear", align_corners=False)
        return self.head_scores({**final, "mask_logits": logits}), out
