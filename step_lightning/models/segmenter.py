"""SegViT segmenter: tokenizer -> plain ViT encoder -> ATM head, predictions on the dense patch grid."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from step_lightning.models.atm import ATMHead
from step_lightning.models.tokenizer import PatchTokenizer
from step_lightning.models.vit import ViTEncoder


@dataclass
class SegmenterOutput:
    """Head outputs (auxiliary first, final last) with mask logits on the dense grid [B, K, Hp, Wp],
    the number of tokens each image entered the encoder with, and per-method extras (layout, exit stats)."""

    outputs: list[dict[str, torch.Tensor]]
    tokens: torch.Tensor
    extras: dict = field(default_factory=dict)


class Segmenter(nn.Module):
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
        super().__init__()
        if any(not 1 <= t <= encoder.depth for t in taps) or list(taps) != sorted(set(taps)):
            raise ValueError(f"taps {taps} must be increasing layer numbers within 1..{encoder.depth}")
        self.encoder = encoder
        self.tokenizer = tokenizer or PatchTokenizer()
        self.taps = tuple(taps)
        self.num_classes = num_classes
        self.head = ATMHead(encoder.embed_dim, num_classes, num_inputs=len(taps), num_layers=head_layers)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> SegmenterOutput:
        """``labels`` are read only by the oracle policy."""
        tokens = self.tokenizer(images, self.encoder, labels)
        x, mask = tokens.x, tokens.key_padding_mask
        feats, start = [], 0
        for tap in self.taps:
            x = self.encoder.forward_blocks(x, mask, start=start, end=tap)
            feats.append(x)
            start = tap
        outputs = self.head(feats[::-1], mask)  # deepest first
        outputs = [{**o, "mask_logits": tokens.to_grid(o["mask_logits"])} for o in outputs]
        return SegmenterOutput(outputs, tokens.counts, {"layout": tokens.layout})

    def head_scores(self, output: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head.semantic_scores(output["class_logits"], output["mask_logits"])

    @torch.no_grad()
    def predict(
        self, images: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, SegmenterOutput]:
        """Per-class scores [B, K, H, W] (combined on the patch grid, then upsampled bilinearly) and the
        forward's output, whose token counts and extras feed the statistics."""
        out = self(images, labels)
        scores = self.head_scores(out.outputs[-1])
        return F.interpolate(scores, size=images.shape[-2:], mode="bilinear", align_corners=False), out
