"""What every segmenter shares: the output record, tokenizing, scoring and prediction.

``Segmenter`` (SegViT's cascaded head) and ``EarlyExitSegmenter`` (DToP exit heads) subclass
``SegmenterBase``, so callers never probe a model for attributes: ``exit_layers`` is empty for a model
without exits and ``force_halt`` is ignored there.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from step_lightning.models.tokenizer import PatchTokenizer, TokenBatch
from step_lightning.models.vit import ViTEncoder


@dataclass
class SegmenterOutput:
    """Head outputs (auxiliary first, final last) with mask logits on the dense grid [B, K, Hp, Wp],
    the number of tokens each image entered the encoder with, and per-method extras: ``layout`` (None =
    one token per patch); early exit adds ``halted`` / ``active_after`` [B, exits] and, at inference,
    ``halt_head`` [B, N] (the exit that halted each token, -1 = final head)."""

    outputs: list[dict[str, torch.Tensor]]
    tokens: torch.Tensor
    extras: dict = field(default_factory=dict)


class SegmenterBase(nn.Module, abc.ABC):
    """Tokenizer -> ViT encoder -> ATM head(s). Subclasses define ``forward`` and ``final_head``."""

    exit_layers: tuple[int, ...] = ()
    # Inference engine (step_lightning.models.engine): "packed" (default; packed variable-length tokens) or
    # "padded" (the per-image padded reference, for debugging). ``fast``: CUDA graphs / compile per bucket
    # (``fast_backend``) and the fused policy. Training always runs the static masked computation.
    engine: str = "packed"
    fast: bool = False
    fast_backend: str = "cudagraphs"

    def __init__(self, encoder: ViTEncoder, num_classes: int, tokenizer: nn.Module | None = None):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer or PatchTokenizer()
        self.num_classes = num_classes
        self.force_halt: float | None = None  # speed-study knob of early exit (see EarlyExitSegmenter)

    @property
    @abc.abstractmethod
    def final_head(self) -> nn.Module:
        """The ATM head whose output is the prediction."""

    def tokenize(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> TokenBatch:
        """Encoder input tokens; ``labels`` are read only by an oracle policy."""
        return self.tokenizer(images, self.encoder, labels)

    def head_scores(self, output: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-class scores [B, K, ...] of one head output (its class logits combined with its masks)."""
        return self.final_head.semantic_scores(output["class_logits"], output["mask_logits"])

    @torch.no_grad()
    def predict(
        self, images: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, SegmenterOutput]:
        """Per-class scores [B, K, H, W] (combined on the patch grid, then upsampled bilinearly, as DToP's
        heads) and the forward's output, whose token counts and extras feed the statistics."""
        out = self(images, labels)
        scores = self.head_scores(out.outputs[-1])
        return F.interpolate(scores, size=images.shape[-2:], mode="bilinear", align_corners=False), out
