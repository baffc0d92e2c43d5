"""The one forward of every segmenter: tokenize -> stages of blocks -> head(s) -> canvas -> unshare.

Training, inference, GFLOPs counting and export all run ``forward`` below over a ``TokenStore``: the tokens of
the whole batch as rows [T, C] with their ``Packing`` (``step_lightning.models.packed``), the canvas of mask
logits and the halting bookkeeping. A stage is written once (``run_stage``): the encoder blocks over the rows
(``RowBlock``: timm's block, attention kernel chosen by the packing), the stage's head (ATM over rows), the
canvas painted with its logits and, at an exit, the halting rule's decision. Two stores differ only in how
halted tokens leave:

* packed (``engine="packed"``, default for training and inference): rows packed without padding; halted rows
  are removed (a host read of the survivor count sizes the next stage), so later blocks cost fewer tokens;
* padded (``engine="padded"``): image b in rows b * L .., halted tokens stay as frozen rows masked out as
  keys; static shapes (torch.export, and the oracle the tests compare the packed store with).

Host reads (``read_sizes`` / ``read_longest``; each marked ``# READ``; tests/test_models_engine.py counts them
at the dispatcher): SegViT 0, CTS 0 (tokens known from shapes), dCTS 1 (tokens after the layout), early exit one
more per exit that can halt (packed store). Between two reads shapes depend only on (batch, image size, sizes),
so with ``InferenceOptions.fast`` the code between reads (a *segment*) runs as a CUDA graph captured per bucket
or compiled (``step_lightning.models.segments``), with sizes rounded up the bucket ladder and the fused policy.
On CPU ``fast`` with the default backend runs the same segments eagerly.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from step_lightning.core import ConfigError
from step_lightning.models.halting import BudgetHalting, ForcedHalting, HaltingRule
from step_lightning.models.packed import Packing
from step_lightning.models.segments import (
    FAST_BACKENDS,
    mark,
    policy_for,
    read_longest,
    read_sizes,
    segment_runner,
    settings_key,
)
from step_lightning.models.tokenizer import patch_grid
from step_lightning.tokens.budget import budget_tokens
from step_lightning.tokens.embed import embed_pyramid
from step_lightning.tokens.layout import TokenLayout
from step_lightning.tokens.packed import PackedLayout, pack_layout, token_starts

ENGINES = ("packed", "padded")


@dataclass(frozen=True)
class InferenceOptions:
    """How an eval-mode forward runs (training always runs the packed store, eagerly).

    engine: ``packed`` or ``padded`` (the static-shape store); fast: segments as CUDA graphs / compiled
    (``fast_backend``) with the fused policy; force_halt: a speed-study knob replacing the model's halting rule
    by ``ForcedHalting`` (that fraction of each image's tokens halts at the first exit). Compute budgets of a
    trained model (no retraining): ``budget`` (dCTS: at most that fraction of the patches, or that many tokens,
    per image) and ``halt_budget`` (every exit halts that fraction of each image's tokens, ``BudgetHalting``).
    With both, a forward has static shapes and no host read."""

    engine: str = "packed"
    fast: bool = False
    fast_backend: str = "cudagraphs"
    force_halt: float | None = None
    budget: float | None = None
    halt_budget: float | None = None

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ConfigError(f"engine={self.engine} must be one of {', '.join(ENGINES)}.")
        if self.fast_backend not in FAST_BACKENDS:
            raise ConfigError(f"fast_backend={self.fast_backend} must be one of {', '.join(FAST_BACKENDS)}.")
        if self.force_halt is not None:
            ForcedHalting(self.force_halt)  # validates the fraction
        if self.halt_budget is not None:
            BudgetHalting(self.halt_budget)
        if self.budget is not None:
            budget_tokens(self.budget, (1, 1))  # validates the value

    @classmethod
    def from_config(cls, cfg) -> InferenceOptions:
        """From a command's config keys ``engine``, ``fast``, ``fast_backend``, ``force_halt``, ``budget``,
        ``halt_budget`` (all optional)."""

        def number(key):
            value = cfg.get(key)
            return None if value is None else value if isinstance(value, int | float) else float(value)

        return cls(str(cfg.get("engine", "packed")), bool(cfg.get("fast", False)),
                   str(cfg.get("fast_backend", "cudagraphs")), number("force_halt"), number("budget"),
                   number("halt_budget"))

    def eager(self, engine: str = "packed") -> InferenceOptions:
        """These options on ``engine``, eagerly (measurements count and time what each op does, unrounded)."""
        return replace(self, engine=engine, fast=False)

    def rule(self, model: nn.Module) -> HaltingRule:
        if self.force_halt is not None:
            return ForcedHalting(self.force_halt)
        if self.halt_budget is not None:
            base = model.halting
            return BudgetHalting(self.halt_budget, getattr(base, "keep_top_k", 5), model.num_classes)
        return model.halting


@dataclass
class SegmenterOutput:
    """Head outputs (auxiliary first, final last) with mask logits on the dense grid [B, K, Hp, Wp],
    the number of tokens each image entered the encoder with, and per-method extras: ``layout`` (None =
    one token per patch); early exit adds ``halted`` / ``active_after`` [B, exits] and ``halt_head`` [B, N]
    (the exit that halted each token, -1 = final head or padding)."""

    outputs: list[dict[str, Tensor]]
    tokens: Tensor
    extras: dict = field(default_factory=dict)


# ---------------------------------------------------------------- tokens


@dataclass
class Tokens:
    """Encoder input rows: x [rows, C], their packing, the packed layout (None: one token per patch) and
    ``cell_slot`` [B * Hp * Wp], the dense slot of each cell's token (None: cell = slot, plain patches)."""

    x: Tensor
    packing: Packing
    layout: PackedLayout | None
    cell_slot: Tensor | None


def count_tokens(model, policy, images, labels) -> tuple[Tensor, ...]:
    """Segment before READ 1 (content-dependent token counts): scores -> size map -> start cells, counts,
    owner offsets."""
    mark("policy")
    size_map = model.tokenizer.size_map(images, labels, policy)  # no budget here: a budget needs no read
    mark("layout")
    return (size_map, *token_starts(size_map))


def embed(model, policy, images, labels, pre, budget, masked: bool) -> Tokens:
    """The encoder's input rows. ``pre``: None (the count is known from shapes) or the output of
    ``count_tokens`` and the packing its read chose; ``budget``: the tokenizer's, or None for its own."""
    b = images.shape[0]
    grid = patch_grid(images)
    encoder = model.encoder
    if pre is None:
        mark("policy")
        size_map = model.tokenizer.size_map(images, labels, policy, budget)
        count = model.tokenizer.static_count(grid, budget)
        if size_map is None:  # plain patches
            mark("embed")
            x = encoder.embed(images)
            return Tokens(x.reshape(-1, x.shape[-1]), Packing.regular(b, count, images.device), None, None)
        is_start, counts, offset = token_starts(size_map)
        if model.tokenizer.exact_count:  # every image exactly ``count`` tokens
            packing = Packing.regular(b, count, images.device)
        else:  # at most ``count`` tokens per image: static sizes, real counts
            packing = Packing.padded(counts, count) if masked else Packing.from_counts(counts, b * count, count)
    else:
        size_map, is_start, counts, offset, packing = pre
    mark("layout")
    layout = pack_layout(size_map, is_start, counts, offset, packing.rows, None if packing.contiguous else
                         packing.max_len)
    cell_slot = layout.cell_row.flatten()
    if not packing.aligned:
        cell_slot = packing.row_dense.index_select(0, cell_slot)
    mark("embed")
    feats = embed_pyramid(images, grid, encoder.patch_embed.proj, encoder.pos_embed_grid(*grid))
    x = feats.reshape(-1, feats.shape[-1]).index_select(0, layout.row_feature)
    return Tokens(x, packing, layout, cell_slot)


def token_layout(tokens: Tokens) -> TokenLayout | None:
    """The batch's ``TokenLayout`` on the dense view [B, L] (for callers: statistics, rendering)."""
    if tokens.layout is None:
        return None
    packing, layout = tokens.packing, tokens.layout
    b, length = packing.batch, packing.max_len
    cell_to_token = layout.cell_row - (packing.cu_seqlens[:-1, None].long() if packing.contiguous else
                                       torch.arange(b, device=layout.cell_row.device)[:, None] * length)
    size, pos = packing.to_dense(layout.row_size), packing.to_dense(layout.row_pos)
    valid = packing.key_mask
    if valid is None:
        valid = torch.ones(b, length, dtype=torch.bool, device=size.device)
    else:
        size, pos = size * valid, pos * valid[..., None]
    return TokenLayout(cell_to_token, size, pos, valid, layout.grid)


def to_grid(values: Tensor, cell_slot: Tensor | None, batch: int, grid: tuple[int, int]) -> Tensor:
    """Unshare per-slot values [S, >= B * L, K] (S snapshots, slots on the first dense view) to the patch grid:
    [S, B, K, Hp, Wp] (a permuted view of one gather; ``cell_slot`` None: slot = cell)."""
    hp, wp = grid
    if cell_slot is None:
        cells = values[:, : batch * hp * wp]
    else:
        cells = values.index_select(1, cell_slot)
    return cells.reshape(values.shape[0], batch, hp, wp, values.shape[-1]).permute(0, 1, 4, 2, 3)


def _slice_layout(layout: TokenLayout | None, length: int) -> TokenLayout | None:
    if layout is None or layout.valid.shape[1] == length:
        return layout
    return TokenLayout(layout.cell_to_token, layout.token_size[:, :length], layout.token_pos[:, :length],
                       layout.valid[:, :length], layout.grid)


# ---------------------------------------------------------------- the token store


@dataclass
class TokenStore:
    """The state of one forward between its stages.

    x [rows, C] and ``packing``: the tokens; ``slot`` [rows]: each row's column in the canvas (the first dense
    view, B * L0 slots, + one dump slot for rows that are not active tokens); ``keep`` [rows]: rows surviving
    the last exit, to be compacted (packed store; None otherwise); ``counts`` [B] active tokens; ``canvas``
    [B * L0 + 1, K] fp32 mask logits and ``canvases`` its state after each head output; ``taps``: the stage
    outputs a cascaded head reads; ``halt_head`` [B * L0 + 1] the exit that halted each slot, -1 = none;
    ``masked``: halted rows stay, frozen and masked out as keys (the padded store)."""

    x: Tensor
    packing: Packing
    slot: Tensor
    keep: Tensor | None
    counts: Tensor
    canvas: Tensor
    canvases: list
    class_logits: list
    halted: list
    active: list
    taps: list
    halt_head: Tensor
    tokens: Tokens
    masked: bool = False

    @staticmethod
    def start(tokens: Tokens, num_classes: int, masked: bool) -> TokenStore:
        packing = tokens.packing
        dump = packing.batch * packing.max_len
        slots = torch.arange(packing.rows, device=tokens.x.device)
        if not packing.aligned:
            slots = packing.row_dense
        if not packing.uniform:
            slots = torch.where(packing.real, slots, dump)
        canvas = tokens.x.new_zeros(dump + 1, num_classes, dtype=torch.float32)
        halt_head = torch.full((dump + 1,), -1, dtype=torch.long, device=tokens.x.device)
        return TokenStore(tokens.x, packing, slots, None, packing.counts, canvas, [], [], [], [], [], halt_head,
                          tokens, masked)

    def run_blocks(self, blocks, first: int, tap: bool) -> TokenStore:
        """``blocks`` (encoder blocks ``first``, ``first`` + 1, ...) over the rows; frozen rows keep their values."""
        x = self.x
        for index, block in enumerate(blocks, first):
            mark("blocks", index)
            y = block(x, self.packing)
            x = torch.where(self.packing.real[:, None], y, x) if self.masked and not self.packing.uniform else y
        return replace(self, x=x, taps=[*self.taps, x] if tap else self.taps)

    def paint(self, out: dict) -> TokenStore:
        """A head output's mask logits (dense view [B, L, K]) replace the canvas columns of the active rows."""
        rows = self.packing.from_dense(out["mask_logits"]).float()  # fp32 canvas: heads may run in bf16
        canvas = self.canvas.index_copy(0, self.slot, rows)
        return replace(self, canvas=canvas, canvases=[*self.canvases, canvas],
                       class_logits=[*self.class_logits, out["class_logits"]])

    def idle_exit(self) -> TokenStore:
        """An exit that cannot halt: its head is skipped (inference), nothing halts."""
        return replace(self, halted=[*self.halted, torch.zeros_like(self.counts)], active=[*self.active, self.counts])

    def decide(self, rule: HaltingRule, index: int, head: nn.Module, out: dict) -> TokenStore:
        """The halting rule's decision at exit ``index`` from its head's output; never differentiated.
        Packed store: the halted rows are marked to leave at the next ``compact``; padded store: they stop being
        keys and their rows freeze."""
        packing = self.packing
        valid = packing.key_mask
        if valid is None:
            valid = torch.ones(packing.batch, packing.max_len, dtype=torch.bool, device=self.x.device)
        # Thresholds like 0.9 / 0.95 must not meet bf16-rounded scores: decide in fp32 under mixed precision.
        with torch.no_grad(), torch.autocast(self.x.device.type, enabled=False):
            scores = head.semantic_scores(out["class_logits"].float(), out["mask_logits"].transpose(1, 2).float())
            halt = rule.decide(index, scores, valid) & valid
        halt_rows = packing.from_dense(halt)
        if not packing.uniform:
            halt_rows = halt_rows & packing.real
        dump = self.canvas.shape[0] - 1
        halt_head = self.halt_head.index_fill(0, torch.where(halt_rows, self.slot, dump), index)
        halted_now = halt.sum(1)
        counts = self.counts - halted_now
        state = replace(self, counts=counts, halted=[*self.halted, halted_now], active=[*self.active, counts],
                        halt_head=halt_head)
        if self.masked:
            packing = packing.with_key_mask(valid & ~halt)
            return replace(state, packing=packing, slot=torch.where(packing.real, self.slot, dump))
        return replace(state, keep=~halt_rows if packing.uniform else packing.real & ~halt_rows)

    def compact(self, rows: int, length: int) -> TokenStore:
        """Keep the rows that survived the last exit, in order: cumsum of the keep flags numbers them, an
        index_copy with distinct destinations inverts that into each new row's source, one index_select moves
        the tokens (dummy rows copy row 0: finite, never read)."""
        keep, old = self.keep, self.packing
        device = keep.device
        packing = Packing.from_counts(self.counts, rows, length)
        order = torch.arange(old.rows, device=device)
        dest = torch.where(keep, keep.cumsum(0) - 1, rows + order)
        source = torch.zeros(rows + old.rows, dtype=torch.long, device=device).index_copy_(0, dest, order)[:rows]
        dump = self.canvas.shape[0] - 1
        slot = torch.where(packing.real, self.slot.index_select(0, source), dump)
        return replace(self, x=self.x.index_select(0, source), packing=packing, slot=slot, keep=None)


def _register(cls, static: tuple[str, ...] = ()) -> None:
    """Make a dataclass a pytree node (tensors and lists as children, ``static`` fields as context) so the
    CUDA-graph runner can flatten segment arguments."""
    names = [f for f in cls.__dataclass_fields__ if f not in static]

    def flatten(obj):
        return [getattr(obj, f) for f in names], tuple(getattr(obj, f) for f in static)

    def unflatten(children, context):
        return cls(**dict(zip(names, children, strict=True)), **dict(zip(static, context, strict=True)))

    pytree.register_pytree_node(cls, flatten, unflatten, serialized_type_name=f"{cls.__module__}.{cls.__qualname__}")


_register(PackedLayout, static=("grid",))
_register(TokenLayout, static=("grid",))
_register(Tokens)
_register(TokenStore, static=("masked",))


# ---------------------------------------------------------------- the stage loop


def run_stage(model, store: TokenStore, index: int, rule: HaltingRule) -> TokenStore:
    """Stage ``index``: its encoder blocks, then its head if it has one (an exit's, or the final one), the
    canvas painted with the head's outputs and, at an exit, the halting decision. At inference an exit that
    cannot halt skips its head; in training every head runs (each gets a loss)."""
    start, end = model.stages[index]
    store = store.run_blocks(model.encoder.blocks[start:end], start, tap=model.cascade)
    head = model.stage_head(index)
    if head is None:
        return store
    is_exit = index < model.num_exits
    if is_exit and not model.training and not rule.can_halt(index):
        return store.idle_exit()
    mark("exits", ("head", index)) if is_exit else mark("heads")
    outs = head(store.taps[::-1] if model.cascade else [store.x], store.packing)  # cascade: deepest first
    for out in outs:
        store = store.paint(out)
    if is_exit:
        mark("exits", ("rule", index))
        store = store.decide(rule, index, head, outs[-1])
        if rule.static and not store.masked:  # survivors bounded from shapes: they leave now, no read
            mark("exits", ("select", index))
            bound = rule.survivors(index, store.packing.max_len)
            store = store.compact(store.packing.batch * bound, bound)
    return store


def run_segment(model, rule, policy, images, labels, pre, store, sizes, first: int, last: int, masked: bool,
                budget):
    """Stages ``first``..``last`` between two reads: [tokens | compaction] -> stages; the outputs after the last
    stage, else the store."""
    if store is None:
        store = TokenStore.start(embed(model, policy, images, labels, pre, budget, masked), model.num_classes,
                                  masked)
    elif sizes is not None:
        mark("exits", ("select", first - 1))
        store = store.compact(*sizes)
    for index in range(first, last + 1):
        store = run_stage(model, store, index, rule)
    return _finish(images, store) if last == len(model.stages) - 1 else store


def _finish(images, store: TokenStore):
    mark("output")
    tokens = store.tokens
    b, length = tokens.packing.batch, tokens.packing.max_len
    grids = to_grid(torch.stack(store.canvases), tokens.cell_slot, b, patch_grid(images))
    outputs = [{"class_logits": c, "mask_logits": g} for c, g in zip(store.class_logits, grids, strict=True)]
    halt_head = store.halt_head[: b * length].view(b, length)
    return outputs, tokens.packing.counts, token_layout(tokens), store.halted, store.active, halt_head


def _pre_read(model, policy, images, labels, runner, key, masked: bool, bucketed: bool, budget):
    """Content-dependent token counts (dCTS): the tokenizer segment and READ 1. Otherwise nothing to read."""
    if model.tokenizer.static_count(patch_grid(images), budget) is not None:
        return None, None
    size_map, is_start, counts, offset = runner("tokens", count_tokens, model, policy, images, labels, key=key)
    if masked:
        longest = read_longest(counts)  # READ: the longest image sizes the padded rows
        return (size_map, is_start, counts, offset, Packing.padded(counts, longest)), longest
    n = size_map.shape[1] * size_map.shape[2]
    rows, length, longest = read_sizes(counts, counts.shape[0] * n, n, bucketed)  # READ: tokens after the layout
    return (size_map, is_start, counts, offset, Packing.from_counts(counts, rows, length)), longest


def forward(model, images: Tensor, labels: Tensor | None, options: InferenceOptions):
    """The forward of ``SegmenterBase``: outputs (one per head output, mask logits on the patch grid), tokens
    per image and the extras (layout; early exit: halted / active_after [B, exits], halt_head [B, N])."""
    training = model.training
    if training:
        options = InferenceOptions()  # training: the packed store, eager, the model's own rule
    masked = options.engine == "padded"
    fast = options.fast
    rule = options.rule(model)
    runner = segment_runner(model, images.device, options)
    policy = policy_for(model, fast)
    budget = options.budget
    key = (*settings_key(model, rule), budget) if runner.backend == "cudagraphs" else ()
    grad = contextlib.nullcontext() if not fast else torch.no_grad()  # graphs and compiled segments: inference
    with grad:
        pre, longest = _pre_read(model, policy, images, labels, runner, key, masked, fast, budget)
        last_stage = len(model.stages) - 1
        # the packed store reads the survivors of every exit that halts (unless the rule bounds them): a segment
        # ends there
        ends = [] if masked or rule.static else [i for i in range(model.num_exits) if rule.can_halt(i)]
        store, sizes, first = None, None, 0
        for last in [*ends, last_stage]:
            result = runner(f"stage {last}", run_segment, model, rule, policy, images, labels, pre, store, sizes,
                            first, last, masked, budget, key=key)
            if last == last_stage:
                break
            store, first = result, last + 1
            # READ: survivors of exit `last`, to size the next segment
            sizes = read_sizes(store.counts, store.packing.rows, store.packing.max_len, bucketed=fast)[:2]
    outputs, counts, layout, halted, active, halt_head = result
    if longest is not None and not isinstance(longest, torch.SymInt):
        layout, halt_head = _slice_layout(layout, longest), halt_head[:, :longest]
    extras = {"layout": layout}
    if model.num_exits:
        extras |= {"halted": torch.stack(halted, 1), "active_after": torch.stack(active, 1), "halt_head": halt_head}
    return SegmenterOutput(outputs, counts, extras)


def computed_counts(model, options: InferenceOptions, grid: tuple[int, int], tokens: int,
                    active_after: list[int]) -> tuple[int, list[int]]:
    """The tokens per image each stage computes, from an image's real counts: a budget's padding and a static
    rule's survivor bound are computed like real tokens (the price of static shapes), counts read on the host
    are exact."""
    static = model.tokenizer.static_count(grid, options.budget)
    first = static if static is not None and not model.tokenizer.exact_count else tokens
    rule, computed, stages = options.rule(model), first, []
    for index, active in enumerate(active_after):
        if rule.can_halt(index):
            computed = rule.survivors(index, computed) if rule.static else active
        stages.append(computed)
    return first, stages


def store_from_rows(model, x: Tensor) -> TokenStore:
    """A store holding given tokens [1, N, C] (cost models evaluate one stage on N tokens)."""
    packing = Packing.regular(1, int(x.shape[1]), x.device)  # a plain int, also while fvcore traces
    return TokenStore.start(Tokens(x[0], packing, None, None), model.num_classes, masked=False)
