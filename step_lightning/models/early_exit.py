"""DToP-style early token exit on a plain ViT (STEP §3.2.2): exit heads halt confident tokens.

The encoder is cut into stages at ``prune_heads`` (1-indexed layer numbers). After each stage an
independent single-input ATM head (own class queries, 2-way "present / no object" classifier) scores the
tokens still active; tokens the halting rule picks halt for good and keep that head's mask logits. The final
head reads the last layer. One canvas of mask logits covers all tokens; each head overwrites only the columns
of its active tokens, and the prediction is the final head's presence x sigmoid(canvas). Halted tokens leave
the sequence in training and inference alike (``step_lightning.models.engine``).
"""

from __future__ import annotations

from torch import nn

from step_lightning.models.atm import ATMHead
from step_lightning.models.base import SegmenterBase
from step_lightning.models.halting import ConfidenceHalting, HaltingRule
from step_lightning.models.vit import ViTEncoder


class EarlyExitSegmenter(SegmenterBase):
    """Tokenizer -> ViT cut at ``prune_heads`` with an exit ATM head after each stage -> final ATM head.

    ``halting``: the rule deciding which tokens halt at an exit (default DToP's ``ConfidenceHalting``).
    ``head_layers``: ATM decoder layers of the final head; ``exit_head_layers`` those of every exit head (None =
    the same; 1 makes exits cheaper); ``head_num_heads``: their attention heads.

    Output (``SegmenterOutput``): ``outputs`` = one dict per head that ran, exits first, final last,
    ``{"class_logits": [B, K, 2], "mask_logits": that head's canvas on the patch grid [B, K, Hp, Wp]}``.
    Training runs every head; inference skips exit heads that cannot halt anything. ``extras``:
    ``layout``, ``halted`` int64 [B, exits] tokens halted at each exit, ``active_after`` int64 [B, exits]
    tokens still active after each exit, ``halt_head`` int64 [B, N] the exit that halted each token
    (0-based), -1 = reached the final head (and padding).
    """

    def __init__(
        self,
        encoder: ViTEncoder,
        num_classes: int,
        prune_heads: tuple[int, ...] | list[int],
        tokenizer: nn.Module | None = None,
        halting: HaltingRule | None = None,
        head_layers: int = 3,
        head_num_heads: int | None = None,
        exit_head_layers: int | None = None,
    ):
        super().__init__(encoder, num_classes, tokenizer, halting or ConfidenceHalting())
        heads = tuple(prune_heads)
        if not heads or list(heads) != sorted(set(heads)) or heads[0] < 1 or heads[-1] >= encoder.depth:
            raise ValueError(
                f"prune_heads {list(heads)} must be increasing layer numbers within 1..{encoder.depth - 1}"
            )
        self.prune_heads = heads
        bounds = (0, *heads, encoder.depth)
        self.stages = list(zip(bounds[:-1], bounds[1:], strict=True))  # 0-indexed [start, end) block ranges
        exit_depth = head_layers if exit_head_layers is None else exit_head_layers
        self.heads = nn.ModuleList(
            ATMHead(encoder.embed_dim, num_classes, num_inputs=1, presence_only=True,
                    num_layers=head_layers if i == len(heads) else exit_depth, num_heads=head_num_heads)
            for i in range(len(self.stages))
        )

    @property
    def exit_layers(self) -> tuple[int, ...]:
        return self.prune_heads

    def stage_head(self, index: int) -> nn.Module:
        return self.heads[index]
