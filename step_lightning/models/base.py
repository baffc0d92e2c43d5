"""What every segmenter shares: tokenizer, encoder cut into stages, the heads after them, one forward.

``Segmenter`` (SegViT's cascaded head after the last stage) and ``EarlyExitSegmenter`` (DToP exit heads after
every stage) only say which blocks form each stage and which head follows it; the forward itself is
``step_lightning.models.engine.forward``, the same for training, inference, GFLOPs counting and export.
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from torch import nn

from step_lightning.models.engine import InferenceOptions, SegmenterOutput, forward
from step_lightning.models.halting import HaltingRule
from step_lightning.models.tokenizer import PatchTokenizer
from step_lightning.models.vit import ViTEncoder

DEFAULT_OPTIONS = InferenceOptions()


class SegmenterBase(nn.Module, abc.ABC):
    """Tokenizer -> ViT encoder in ``stages`` (0-indexed [start, end) block ranges) -> a head after some.

    ``cascade``: the head reads every stage's output, deepest first (SegViT); otherwise a head reads its own
    stage (exits). ``halting``: the rule of the exits (``HaltingRule()`` halts nothing)."""

    exit_layers: tuple[int, ...] = ()
    cascade: bool = False

    def __init__(self, encoder: ViTEncoder, num_classes: int, tokenizer: nn.Module | None = None,
                 halting: HaltingRule | None = None):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer or PatchTokenizer()
        self.num_classes = num_classes
        self.halting = halting or HaltingRule()
        self.stages: list[tuple[int, int]] = []

    @property
    def num_exits(self) -> int:
        return len(self.exit_layers)

    @abc.abstractmethod
    def stage_head(self, index: int) -> nn.Module | None:
        """The ATM head after stage ``index`` (None: no head there)."""

    @property
    def final_head(self) -> nn.Module:
        """The ATM head whose output is the prediction."""
        return self.stage_head(len(self.stages) - 1)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                options: InferenceOptions | None = None) -> SegmenterOutput:
        """``labels`` are read only by an oracle policy; ``options`` apply in eval mode."""
        return forward(self, images, labels, options or DEFAULT_OPTIONS)

    def head_scores(self, output: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-class scores [B, K, ...] of one head output (its class logits combined with its masks), in fp32
        under mixed precision (sliding windows add them up; decisions compare them)."""
        logits = output["mask_logits"]
        with torch.autocast(logits.device.type, enabled=False):
            return self.final_head.semantic_scores(output["class_logits"].float(), logits.float())

    @torch.no_grad()
    def predict(
        self, images: torch.Tensor, labels: torch.Tensor | None = None, options: InferenceOptions | None = None
    ) -> tuple[torch.Tensor, SegmenterOutput]:
        """Per-class scores [B, K, H, W] (combined on the patch grid, then upsampled bilinearly, as DToP's
        heads) and the forward's output, whose token counts and extras feed the statistics."""
        out = self(images, labels, options)
        scores = self.head_scores(out.outputs[-1])
        return F.interpolate(scores, size=images.shape[-2:], mode="bilinear", align_corners=False), out
