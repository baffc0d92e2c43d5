"""DToP-style early token exit on a plain ViT (STEP §3.2.2): exit heads halt confident tokens.

The encoder is cut into stages at ``prune_heads`` (1-indexed layer numbers). After each stage an
independent single-input ATM head (own class queries, 2-way "present / no object" classifier) scores the
tokens still active; confident tokens halt for good and keep that head's mask logits. The final head
reads the last layer. One canvas of mask logits [B, K, N] covers all tokens; each head overwrites only
the columns of its active tokens, and the prediction is the final head's presence x sigmoid(canvas).

Two executions of the same computation:

* training (``model.train()``), static shapes: halted tokens stay in the tensor, masked out as keys and
  carried through the blocks unchanged, so batching, DDP and the loss see fixed shapes and every head gets
  a canvas to supervise;
* inference (``model.eval()``), halted tokens are physically removed after each exit, so later blocks run
  on shorter sequences: the packed engine (``step_lightning.models.engine``, default) or the padded
  reference ``EarlyExitSegmenter._forward_pruned`` (``model.engine = "padded"``).

``ExitStats`` collects how many tokens each exit halts (paper Table 7).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from step_lightning.models.atm import ATMHead
from step_lightning.models.base import SegmenterBase, SegmenterOutput
from step_lightning.models.canvas import paint_active, paint_slots
from step_lightning.models.engine import packed_forward, uses_packed
from step_lightning.models.halting import forced_halting_mask, halting_mask
from step_lightning.models.tokenizer import TokenBatch
from step_lightning.models.vit import ViTEncoder, key_mask_to_attn_mask


class EarlyExitSegmenter(SegmenterBase):
    """Tokenizer -> ViT cut at ``prune_heads`` with an exit ATM head after each stage -> final ATM head.

    ``prune_threshold`` (read at every forward) is the confidence above which tokens may halt; >= 1.0
    disables halting (phase-1 training, baselines). ``keep_top_k`` tokens per predicted class stay as
    context. ``force_halt`` (None or a fraction in [0, 1)) replaces the rule at the first exit by halting
    exactly that fraction of each image's tokens: a benchmark knob for speed studies, not the method.
    ``bucket``: with batch > 1 the shortened sequences are padded to a multiple of it (fewer shapes; padded
    reference engine only). ``head_layers``: ATM decoder layers of the final head; ``exit_head_layers`` those
    of every exit head (None = the same; 1 makes exits cheaper).

    Output (``SegmenterOutput``): ``outputs`` = one dict per head that ran, exits first, final last,
    ``{"class_logits": [B, K, 2], "mask_logits": that head's canvas on the patch grid [B, K, Hp, Wp]}``.
    Training runs every head; inference skips exit heads that cannot halt anything. ``extras``:
    ``layout``, ``halted`` int64 [B, exits] tokens halted at each exit, ``active_after`` int64 [B, exits]
    tokens still active after each exit; inference only: ``halt_head`` int64 [B, N] the exit that halted
    each token (0-based), -1 = reached the final head (and padding).
    """

    def __init__(
        self,
        encoder: ViTEncoder,
        num_classes: int,
        prune_heads: tuple[int, ...] | list[int],
        tokenizer: nn.Module | None = None,
        prune_threshold: float = 0.9,
        keep_top_k: int = 5,
        head_layers: int = 3,
        head_num_heads: int | None = None,
        exit_head_layers: int | None = None,
    ):
        super().__init__(encoder, num_classes, tokenizer)
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
        self.prune_threshold = prune_threshold
        self.keep_top_k = keep_top_k
        self.bucket = 8

    @property
    def exit_layers(self) -> tuple[int, ...]:
        return self.prune_heads

    @property
    def final_head(self) -> nn.Module:
        return self.heads[-1]

    @property
    def num_exits(self) -> int:
        return len(self.prune_heads)

    def exit_can_halt(self, exit_index: int) -> bool:
        return self.prune_threshold < 1.0 or (exit_index == 0 and self.force_halt is not None)

    def halt(self, exit_index: int, head_out: dict[str, torch.Tensor], may_halt: torch.Tensor) -> torch.Tensor:
        """Tokens [B, N] that halt at this exit, from its head output; never differentiated."""
        # Thresholds like 0.9 / 0.95 must not meet bf16-rounded scores: decide in fp32 under mixed precision.
        with torch.no_grad(), torch.autocast(head_out["mask_logits"].device.type, enabled=False):
            scores = self.heads[exit_index].semantic_scores(
                head_out["class_logits"].float(), head_out["mask_logits"].float()
            )
            if exit_index == 0 and self.force_halt is not None:
                if not 0.0 <= self.force_halt < 1.0:
                    raise ValueError(f"force_halt={self.force_halt} must be a fraction in [0, 1) or None")
                return forced_halting_mask(scores, may_halt, self.force_halt)
            if self.prune_threshold >= 1.0:
                return torch.zeros_like(may_halt)
            return halting_mask(scores, may_halt, self.prune_threshold, self.keep_top_k)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> SegmenterOutput:
        """``labels`` are read only by an oracle tokenizer policy. Training: ``forward_masked``; inference:
        the packed engine (``step_lightning.models.engine``), or ``_forward_pruned`` with ``engine="padded"``."""
        if self.training:
            return self.forward_masked(images, labels)
        if uses_packed(self):
            return packed_forward(self, images, labels)
        return self._forward_pruned(images, labels)

    def _output(self, tokens: TokenBatch, outputs: list, halted: list, active: list, **more) -> SegmenterOutput:
        extras = {"layout": tokens.layout, "halted": torch.stack(halted, 1), "active_after": torch.stack(active, 1)}
        return SegmenterOutput(outputs, tokens.counts, extras | more)

    def forward_masked(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> SegmenterOutput:
        """Static-shape execution (training): halted tokens are carried through unchanged and masked out
        as keys; every head runs on all positions with key mask = active. Gradients reach earlier heads
        through the canvas columns of the tokens they halted."""
        tokens = self.tokenize(images, labels)
        x = tokens.x
        b, n = x.shape[:2]
        active = tokens.key_padding_mask
        if active is None:
            active = torch.ones(b, n, dtype=torch.bool, device=x.device)
        canvas = None
        outputs, halted, active_after = [], [], []
        for i, (start, end) in enumerate(self.stages):
            attn_mask = key_mask_to_attn_mask(active)
            for block in self.encoder.blocks[start:end]:
                x = torch.where(active[..., None], block(x, attn_mask=attn_mask), x)
            out = self.heads[i]([x], active)[0]
            logits = out["mask_logits"]
            canvas = paint_active(canvas, logits, active)
            outputs.append({"class_logits": out["class_logits"], "mask_logits": tokens.to_grid(canvas)})
            if i < self.num_exits:
                halt = self.halt(i, out, active)
                active = active & ~halt
                halted.append(halt.sum(1))
                active_after.append(active.sum(1))
        return self._output(tokens, outputs, halted, active_after)

    def _compact(
        self, x: torch.Tensor, slot: torch.Tensor, keep: torch.Tensor, discard: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Left-align the kept tokens of every image (stable: their order is preserved) and cut the
        sequence to the longest survivor count. Returns tokens, their canvas columns (``discard`` for
        padding) and the key mask (None when every image keeps the same number: no padding at all)."""
        kept = keep.sum(1)
        longest, shortest = torch.stack((kept.max(), kept.min())).tolist()  # the one host sync per stage
        length = longest if longest == shortest else min(math.ceil(longest / self.bucket) * self.bucket, x.shape[1])
        order = keep.to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :length]
        x = x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))
        slot = slot.gather(1, order)
        if longest == shortest:
            return x, slot, None
        live = torch.arange(length, device=x.device) < kept[:, None]
        return x, torch.where(live, slot, discard), live

    def _forward_pruned(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> SegmenterOutput:
        """Inference with physical token removal.

        State per image: the surviving tokens x [B, L, C] left-aligned, ``slot`` [B, L] = each position's
        column in the canvas (column N is a write-only dump for padding positions) and ``live`` [B, L]
        (None = no padding). After each exit the halting decision is a [B, L] bool computed on device;
        ``_compact`` turns it into a stable descending argsort of the keep flags + ``gather`` of tokens and
        slots. Heads write their mask logits with one ``scatter`` into the [B, K, N + 1] canvas.
        Host syncs: exactly one per exit that can halt (``.tolist()`` of the max/min survivor count, to
        size the next stage's tensors); none in blocks or heads. Batch 1 gives a plain shorter tensor;
        larger batches are padded to the longest survivor count rounded up to ``bucket``, with a key mask.
        """
        tokens = self.tokenize(images, labels)
        x, live = tokens.x, tokens.key_padding_mask
        b, n = x.shape[:2]
        slot = torch.arange(n, device=x.device).expand(b, n)
        if live is not None:
            slot = torch.where(live, slot, n)
        active_count = tokens.counts
        canvas = None
        halt_head = torch.full((b, n + 1), -1, device=x.device)  # column n: dump for non-halting positions
        outputs, halted, active_after = [], [], []
        for i, (start, end) in enumerate(self.stages):
            x = self.encoder.forward_blocks(x, live, start, end)
            is_exit = i < self.num_exits
            if is_exit and not self.exit_can_halt(i):
                halted.append(torch.zeros_like(active_count))
                active_after.append(active_count)
                continue
            out = self.heads[i]([x], live)[0]
            canvas = paint_slots(canvas, out["mask_logits"], slot, n)
            outputs.append({"class_logits": out["class_logits"], "mask_logits": tokens.to_grid(canvas[..., :n])})
            if is_exit:
                may_halt = torch.ones_like(slot, dtype=torch.bool) if live is None else live
                halt = self.halt(i, out, may_halt)
                halted.append(halt.sum(1))
                halt_head = halt_head.scatter(1, torch.where(halt, slot, n), i)
                x, slot, live = self._compact(x, slot, may_halt & ~halt, n)
                active_count = active_count - halted[-1]
                active_after.append(active_count)
        return self._output(tokens, outputs, halted, active_after, halt_head=halt_head[:, :n])
