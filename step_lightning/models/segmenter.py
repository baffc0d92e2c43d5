"""SegViT segmenter: tokenizer -> plain ViT encoder -> cascaded ATM head, predictions on the dense patch grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from step_lightning.models.atm import ATMHead
from step_lightning.models.base import SegmenterBase, SegmenterOutput
from step_lightning.models.engine import packed_forward, uses_packed
from step_lightning.models.vit import ViTEncoder


class Segmenter(SegmenterBase):
    """SegViT: a tokenizer (plain patches, or dCTS/CTS supertokens) -> ViT -> the cascaded ATM head
    reading the tapped layers. Padded supertoken slots are masked out as keys everywhere."""

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
        self.head = ATMHead(encoder.embed_dim, num_classes, num_inputs=len(taps), num_layers=head_layers)

    @property
    def final_head(self) -> nn.Module:
        return self.head

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> SegmenterOutput:
        """``labels`` are read only by the oracle policy. Eval mode runs the packed engine unless
        ``engine="padded"`` (this method's own padded computation, the reference)."""
        if uses_packed(self):
            return packed_forward(self, images, labels)
        tokens = self.tokenize(images, labels)
        x, mask = tokens.x, tokens.key_padding_mask
        feats, start = [], 0
        for tap in self.taps:
            x = self.encoder.forward_blocks(x, mask, start=start, end=tap)
            feats.append(x)
            start = tap
        outputs = self.head(feats[::-1], mask)  # deepest first
        outputs = [{**o, "mask_logits": tokens.to_grid(o["mask_logits"])} for o in outputs]
        return SegmenterOutput(outputs, tokens.counts, {"layout": tokens.layout})

    @torch.no_grad()
    def predict(
        self, images: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, SegmenterOutput]:
        """SegViT's inference order: the final mask logits are upsampled to the input size first, then
        sigmoid and the class combination run per pixel (early-exit heads combine on the grid instead)."""
        out = self(images, labels)
        final = out.outputs[-1]
        logits = F.interpolate(final["mask_logits"], size=images.shape[-2:], mode="bilinear", align_corners=False)
        return self.head_scores({**final, "mask_logits": logits}), out
