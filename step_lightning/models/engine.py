"""The packed inference engine: every eval-mode forward of a segmenter (``model.engine = "packed"``, default).

The surviving tokens of the whole batch live in one [rows, C] buffer (``step_lightning.models.packed``):
no per-image padding, no key masks in the encoder, variable-length attention. The forward is a few
*segments* of static shapes separated by at most one host read per decision:

* tokenizer (policy or oracle scores -> dCTS/CTS size map -> token counts);
  READ 1 (dCTS only): total and longest token count after the layout, rounded up the bucket ladder;
* [pack the layout + pyramid embedding] -> blocks -> head(s), halting at an exit that can halt;
  READ 2.. (early exit only): total and longest survivor count after each exit that can halt;
* compaction of the survivors (cumsum + index_copy, no argsort) -> blocks -> ... -> final head ->
  one unshare of every head's mask logits to the patch grid.

Reads per forward: SegViT 0, CTS 0 (T = B * (Hp*Wp - 3k) is known from shapes), dCTS 1, early exit
1 (dCTS only) + one per exit that can halt. They all go through ``read_sizes``; nothing else in the engine
leaves the device (tests/test_models_engine.py counts host reads at the dispatcher).

Between two reads shapes depend only on (batch, image size, bucket), so each segment can be captured:
``model.fast = True`` runs the segments as CUDA graphs captured per bucket (``fast_backend="cudagraphs"``,
the default) or through ``torch.compile(fullgraph=True, dynamic=False)`` specialised per bucket
(``"compile"``: mode reduce-overhead, i.e. inductor + CUDA graphs; ``"compile:eager"``: dynamo only, for
tracing checks on any device), and uses the policy network with BatchNorm folded in channels_last. On CPU
``fast`` with the default backend runs the same segments eagerly (only the fused policy differs).

``model.engine = "padded"`` selects the padded reference (per-image padding, key masks, argsort
compaction) for debugging; training always runs the static masked computation.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from step_lightning.models.base import SegmenterOutput
from step_lightning.models.packed import Packing, block_rows, bucket
from step_lightning.models.packed_heads import atm_head_rows
from step_lightning.models.tokenizer import SupertokenTokenizer, patch_grid
from step_lightning.tokens.embed import SupertokenEmbed
from step_lightning.tokens.layout import TokenLayout, cts_k_for_grid, cts_size_map, dcts_size_map
from step_lightning.tokens.packed import PackedLayout, pack_layout, token_starts
from step_lightning.tokens.policy import fused_policy

ENGINES = ("packed", "padded")
FAST_BACKENDS = ("cudagraphs", "compile", "compile:eager")
# Components a probe sees (``probing``): dispatched ops and time are attributed to the last one marked.
SECTIONS = ("policy", "layout", "embed", "blocks", "heads", "exits", "read", "output")


# ---------------------------------------------------------------- probes and the one host read

_PROBE = None


class Probe:
    """Told where the engine is: ``mark(section)`` at each component boundary (eager segments only)."""

    def mark(self, section: str) -> None:  # pragma: no cover - interface
        pass


@contextlib.contextmanager
def probing(probe: Probe):
    """Report component boundaries to ``probe`` during the block (forces eager segments)."""
    global _PROBE
    previous, _PROBE = _PROBE, probe
    try:
        yield probe
    finally:
        _PROBE = previous


def mark(section: str) -> None:
    if _PROBE is not None:
        _PROBE.mark(section)


def host_read(values: Tensor) -> list[int]:
    """The engine's only device -> host transfer (one small int64 vector)."""
    return values.tolist()


def read_sizes(counts: Tensor, cap_rows: int, cap_len: int) -> tuple[int, int, int]:
    """Host read: total and longest of ``counts`` [B] -> (rows, dense length, longest). rows = the bucket
    of the total (<= cap_rows), dense length = the bucket of the longest (<= cap_len; = rows at batch 1)."""
    mark("read")
    total, longest = host_read(torch.stack((counts.sum(), counts.max())))
    rows = bucket(total, cap_rows)
    length = rows if counts.shape[0] == 1 else bucket(longest, cap_len)
    return rows, length, longest


# ---------------------------------------------------------------- running segments eagerly, as graphs, compiled


class SegmentRunner:
    """Runs a segment ``fn(*args)`` (args: a pytree of tensors and static values). ``eager`` calls it;
    ``cudagraphs`` captures one CUDA graph per (segment, static values, tensor shapes) on first use and
    replays it; ``compile`` / ``compile:eager`` call ``torch.compile(fn, fullgraph=True, dynamic=False)``,
    which specialises per bucket the same way. Outputs of graphs are cloned (the graph reuses its buffers)."""

    def __init__(self, backend: str = "eager"):
        if backend not in ("eager", *FAST_BACKENDS):
            raise ValueError(f"segment backend '{backend}' must be eager or one of {FAST_BACKENDS}")
        self.backend = backend
        self.graphs: dict = {}
        self.compiled: dict = {}
        self.captures = 0

    def __call__(self, name: str, fn, *args, key: tuple = ()):
        """``key``: static values ``fn`` reads besides its arguments (model settings baked into a graph)."""
        if self.backend == "eager" or _PROBE is not None:
            return fn(*args)
        if self.backend == "compile:eager":  # dynamo guards on the settings itself
            return self._compiled(fn)(*args)
        if self.backend == "compile":  # cudagraph trees reuse output buffers: keep ours
            return pytree.tree_map(_clone, self._compiled(fn)(*args))
        return self._graph(name, fn, args, key)

    @staticmethod
    def _capture(fn, static_args):
        """One CUDA graph of ``fn(*static_args)`` (after a warm-up run on a side stream: lazy inits, cuDNN
        autotuning); returns it and the output tensors it writes at every replay."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn(*static_args)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(*static_args)
        return graph, out

    @staticmethod
    def _replay(graph) -> None:
        graph.replay()

    def key(self, model: nn.Module) -> tuple:
        """The model settings a captured graph depends on (``settings_key``); () for other backends."""
        return settings_key(model) if self.backend == "cudagraphs" else ()

    def _compiled(self, fn):
        if fn not in self.compiled:
            import torch._dynamo

            # one specialisation per bucket: allow as many as the ladder has sizes
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
            if self.backend == "compile:eager":
                self.compiled[fn] = torch.compile(fn, fullgraph=True, dynamic=False, backend="eager")
            else:
                self.compiled[fn] = torch.compile(fn, fullgraph=True, dynamic=False, mode="reduce-overhead")
        return self.compiled[fn]

    def _graph(self, name: str, fn, args, extra: tuple):
        leaves, spec = pytree.tree_flatten(args)
        tensors = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
        key = (name, fn, extra, str(spec), tuple(
            (leaf.shape, leaf.dtype, leaf.device) if isinstance(leaf, Tensor) else _static(leaf) for leaf in leaves
        ))
        entry = self.graphs.get(key)
        if entry is None:
            static = list(leaves)
            for i in tensors:
                static[i] = leaves[i].clone()
            graph, out = self._capture(fn, pytree.tree_unflatten(static, spec))
            entry = self.graphs[key] = (graph, [static[i] for i in tensors], out)
            self.captures += 1
        graph, inputs, out = entry
        for buffer, i in zip(inputs, tensors, strict=True):
            buffer.copy_(leaves[i])
        self._replay(graph)
        return pytree.tree_map(_clone, out)


def _clone(value):
    return value.clone() if isinstance(value, Tensor) else value


def settings_key(model: nn.Module) -> tuple:
    """Model settings the segments read as Python values (a captured graph bakes them in), and where the
    weights live (a graph reads them by address: moving the model must not replay a stale graph)."""
    first = next(model.parameters())
    tokenizer = model.tokenizer
    return (
        getattr(model, "prune_threshold", None), getattr(model, "force_halt", None),
        getattr(model, "keep_top_k", None), getattr(tokenizer, "thresholds", None), getattr(tokenizer, "cts_k", None),
        first.data_ptr(), first.dtype,
    )


def _static(value):
    """Hashable stand-in of a non-tensor segment argument for the graph key."""
    if isinstance(value, nn.Module):
        return ("module", id(value))
    return value


@dataclass
class _Cache:
    runner_key: tuple = ()
    runner: SegmentRunner = field(default_factory=SegmentRunner)
    policy_key: tuple = ()
    policy: nn.Module | None = None


_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> _Cache (kept out of its state)


def _cache(model: nn.Module) -> _Cache:
    if model not in _CACHES:
        _CACHES[model] = _Cache()
    return _CACHES[model]


def segment_runner(model: nn.Module, device: torch.device) -> SegmentRunner:
    """The model's runner for its current ``fast`` / ``fast_backend`` and device."""
    backend = "eager"
    if model.fast:
        backend = model.fast_backend
        if backend not in FAST_BACKENDS:
            raise ValueError(f"fast_backend={backend} must be one of {FAST_BACKENDS}")
        if backend != "compile:eager" and device.type != "cuda":
            backend = "eager"  # CUDA graphs / inductor graphs need a GPU: eager packed segments on CPU
    cache = _cache(model)
    key = (backend, str(device))
    if cache.runner_key != key:
        cache.runner_key, cache.runner = key, SegmentRunner(backend)
    return cache.runner


def policy_for(model: nn.Module) -> nn.Module | None:
    """The tokenizer's policy network (None: patches or the oracle); with ``fast`` its fused eval copy
    (BatchNorm folded, channels_last), rebuilt when the weights, device or dtype change."""
    tokenizer = model.tokenizer
    policy = getattr(tokenizer, "policy", None)
    if policy is None or not model.fast:
        return policy
    # cheap staleness check: loading weights or moving the policy changes the first tensor's version or
    # address (after editing single weights in place, call ``reset(model)``)
    first = next(policy.parameters())
    key = (first.data_ptr(), first._version, first.dtype)
    cache = _cache(model)
    if cache.policy_key != key:
        cache.policy_key, cache.policy = key, fused_policy(policy)
    return cache.policy


def reset(model: nn.Module) -> None:
    """Drop captured graphs, compiled segments and the fused policy (e.g. after moving the model)."""
    _CACHES.pop(model, None)


@contextlib.contextmanager
def reference_engine(model: nn.Module):
    """Run ``model`` with the padded reference engine inside the block (exact FLOP counting, debugging)."""
    previous, model.engine = model.engine, "padded"
    try:
        yield model
    finally:
        model.engine = previous


# ---------------------------------------------------------------- tokens


@dataclass
class Tokens:
    """Encoder input rows: x [rows, C], their packing, the packed layout (None: one token per patch) and
    ``cell_slot`` [B * Hp * Wp], the dense slot of each cell's token (None: cell = slot, plain patches)."""

    x: Tensor
    packing: Packing
    layout: PackedLayout | None
    cell_slot: Tensor | None


def _kind(model: nn.Module) -> str:
    tokenizer = model.tokenizer
    return tokenizer.mode if isinstance(tokenizer, SupertokenTokenizer) else "patch"


def _scores(model, policy, images, labels) -> dict:
    mark("policy")
    if policy is not None:
        return policy(images)
    return model.tokenizer.scores(images, patch_grid(images), labels)


def dcts_counts(model, policy, images, labels) -> tuple[Tensor, ...]:
    """Segment before READ 1 (dCTS): scores -> size map -> start cells, token counts, owner offsets."""
    scores = _scores(model, policy, images, labels)
    mark("layout")
    size_map = dcts_size_map(scores, patch_grid(images), model.tokenizer.thresholds)
    return (size_map, *token_starts(size_map))


def _embed_layout(model, images, size_map, is_start, counts, offset, packing: Packing) -> Tokens:
    mark("layout")
    grid = patch_grid(images)
    layout = pack_layout(size_map, is_start, counts, offset, packing.rows)
    cell_slot = layout.cell_row.flatten()
    if not packing.aligned:
        cell_slot = packing.row_dense.index_select(0, cell_slot)
    mark("embed")
    encoder = model.encoder
    feats = SupertokenEmbed.pyramid(images, grid, encoder.patch_embed.proj, encoder.pos_embed_grid(*grid))
    x = feats.reshape(-1, feats.shape[-1]).index_select(0, layout.row_feature)
    return Tokens(x, packing, layout, cell_slot)


def tokens_static(model, policy, images, labels) -> Tokens:
    """Plain patches or CTS: token counts are known from shapes, no host read."""
    b = images.shape[0]
    hp, wp = patch_grid(images)
    if _kind(model) == "patch":
        mark("embed")
        x = model.encoder.embed(images)
        return Tokens(x.reshape(-1, x.shape[-1]), Packing.regular(b, hp * wp, images.device), None, None)
    scores = _scores(model, policy, images, labels)
    mark("layout")
    tokenizer = model.tokenizer
    k = tokenizer.cts_k if tokenizer.cts_k is not None else cts_k_for_grid(hp, wp)
    size_map = cts_size_map(scores[2], (hp, wp), k)
    packing = Packing.regular(b, hp * wp - 3 * k, images.device)
    return _embed_layout(model, images, size_map, *token_starts(size_map), packing)


def tokens_dcts(model, images, size_map, is_start, counts, offset, rows: int, length: int) -> Tokens:
    """dCTS after READ 1: pack the layout into ``rows`` rows (dense view ``length``), embed."""
    mark("layout")
    return _embed_layout(model, images, size_map, is_start, counts, offset, Packing.from_counts(counts, rows, length))


def _tokens(model, policy, images, labels, pre) -> Tokens:
    return tokens_static(model, policy, images, labels) if pre is None else tokens_dcts(model, images, *pre)


def token_layout(tokens: Tokens) -> TokenLayout | None:
    """The batch's ``TokenLayout`` on the dense view [B, L] (for callers: statistics, rendering)."""
    if tokens.layout is None:
        return None
    packing, layout = tokens.packing, tokens.layout
    b, length = packing.batch, packing.max_len
    cell_to_token = layout.cell_row - packing.cu_seqlens[:-1, None].long()
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


def _pre_read(model, policy, images, labels, runner) -> tuple[tuple | None, int | None]:
    """dCTS: the tokenizer segment and READ 1 (tokens after the layout). Others: nothing to read."""
    if _kind(model) != "dcts":
        return None, None
    size_map, is_start, counts, offset = runner("tokens", dcts_counts, model, policy, images, labels,
                                                key=runner.key(model))
    n = size_map.shape[1] * size_map.shape[2]
    rows, length, longest = read_sizes(counts, counts.shape[0] * n, n)  # READ: tokens after the dCTS layout
    return (size_map, is_start, counts, offset, rows, length), longest


# ---------------------------------------------------------------- SegViT (cascaded head)


def segmenter_segment(model, policy, images, labels, pre) -> tuple[list, Tensor, TokenLayout | None]:
    """Everything after the last read of a SegViT-head model: tokens -> blocks -> head -> grid."""
    tokens = _tokens(model, policy, images, labels, pre)
    mark("blocks")
    x, feats, start = tokens.x, [], 0
    for tap in model.taps:
        for block in model.encoder.blocks[start:tap]:
            x = block_rows(block, x, tokens.packing)
        feats.append(x)
        start = tap
    mark("heads")
    outs = atm_head_rows(model.head, feats[::-1], tokens.packing)  # deepest first
    mark("output")
    masks = torch.stack([o["mask_logits"] for o in outs])  # [S, B, L, K]
    masks = masks.reshape(masks.shape[0], -1, masks.shape[-1])
    grids = to_grid(masks, tokens.cell_slot, images.shape[0], patch_grid(images))
    outputs = [{"class_logits": o["class_logits"], "mask_logits": g} for o, g in zip(outs, grids, strict=True)]
    return outputs, tokens.packing.counts, token_layout(tokens)


def segmenter_forward(model, images: Tensor, labels: Tensor | None) -> SegmenterOutput:
    runner = segment_runner(model, images.device)
    policy = policy_for(model)
    pre, longest = _pre_read(model, policy, images, labels, runner)
    outputs, counts, layout = runner("segmenter", segmenter_segment, model, policy, images, labels, pre,
                                     key=runner.key(model))
    if longest is not None:
        layout = _slice_layout(layout, longest)
    return SegmenterOutput(outputs, counts, {"layout": layout})


# ---------------------------------------------------------------- early exit


@dataclass
class ExitState:
    """Carried between the segments of an early-exit forward.

    x [rows, C] and ``packing``: the active tokens; ``slot`` [rows]: each row's slot in the canvas (the first
    dense view, B * L0 slots + one dump slot for dummy rows); ``keep`` [rows]: rows surviving the last exit
    (None before the first); ``counts`` [B] active tokens; ``canvas`` [B * L0 + 1, K] mask logits and
    ``canvases`` its state after each head that ran; ``halt_head`` [B * L0 + 1] exit index or -1."""

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
    halt_head: Tensor
    tokens: Tokens


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
_register(ExitState)


def _start_state(model, tokens: Tokens) -> ExitState:
    packing = tokens.packing
    dump = packing.batch * packing.max_len
    slots = torch.arange(packing.rows, device=tokens.x.device)
    if not packing.aligned:
        slots = packing.row_dense
    if not packing.uniform:
        slots = torch.where(packing.real, slots, dump)
    canvas = tokens.x.new_zeros(dump + 1, model.num_classes)
    halt_head = torch.full((dump + 1,), -1, dtype=torch.long, device=tokens.x.device)
    return ExitState(tokens.x, packing, slots, None, packing.counts, canvas, [], [], [], [], halt_head, tokens)


def _compact(state: ExitState, rows: int, length: int) -> ExitState:
    """Keep the rows that survived the last exit, in order: cumsum of the keep flags numbers them, an
    index_copy with distinct destinations inverts that into each new row's source, one index_select moves
    the tokens (dummy rows copy row 0: finite, never read)."""
    mark("exits")
    keep, old = state.keep, state.packing
    device = keep.device
    packing = Packing.from_counts(state.counts, rows, length)
    order = torch.arange(old.rows, device=device)
    dest = torch.where(keep, keep.cumsum(0) - 1, rows + order)
    source = torch.zeros(rows + old.rows, dtype=torch.long, device=device).index_copy_(0, dest, order)[:rows]
    dump = state.canvas.shape[0] - 1
    slot = torch.where(packing.real, state.slot.index_select(0, source), dump)
    return replace(state, x=state.x.index_select(0, source), packing=packing, slot=slot, keep=None)


def exit_segment(model, policy, images, labels, pre, state, sizes, first: int, last: int):
    """Stages ``first``..``last`` (0-based; stage ``num_exits`` ends at the final head) between two reads:
    [tokens | compaction] -> blocks -> (exits that cannot halt are skipped) -> head ``last`` -> canvas ->
    halting (an exit) or the outputs (the final head)."""
    if state is None:
        state = _start_state(model, _tokens(model, policy, images, labels, pre))
    else:
        state = _compact(state, *sizes)
    x, packing, counts = state.x, state.packing, state.counts
    halted, active = list(state.halted), list(state.active)
    for i in range(first, last + 1):
        mark("blocks")
        start, end = model.stages[i]
        for block in model.encoder.blocks[start:end]:
            x = block_rows(block, x, packing)
        if i < last:  # an exit that cannot halt: its head is skipped, as in the reference
            halted.append(torch.zeros_like(counts))
            active.append(counts)
    final = last == model.num_exits
    mark("heads" if final else "exits")
    out = atm_head_rows(model.heads[last], [x], packing)[0]
    masks = out["mask_logits"]  # [B, L, K]
    canvas = state.canvas.index_copy(0, state.slot, packing.from_dense(masks))
    state = replace(state, x=x, canvas=canvas, canvases=[*state.canvases, canvas],
                    class_logits=[*state.class_logits, out["class_logits"]], halted=halted, active=active)
    if final:
        return _finish(model, images, state)
    valid = packing.key_mask
    if valid is None:
        valid = torch.ones(packing.batch, packing.max_len, dtype=torch.bool, device=x.device)
    halt = model.halt(last, {"class_logits": out["class_logits"], "mask_logits": masks.transpose(1, 2)}, valid)
    halt_rows = packing.from_dense(halt)
    if not packing.uniform:
        halt_rows = halt_rows & packing.real
    dump = canvas.shape[0] - 1
    halt_head = state.halt_head.index_fill(0, torch.where(halt_rows, state.slot, dump), last)
    keep = ~halt_rows if packing.uniform else packing.real & ~halt_rows
    halted_now = halt.sum(1)
    counts = counts - halted_now
    return replace(state, keep=keep, counts=counts, halted=[*halted, halted_now], active=[*active, counts],
                   halt_head=halt_head)


def _finish(model, images, state: ExitState):
    mark("output")
    tokens = state.tokens
    b, length = tokens.packing.batch, tokens.packing.max_len
    grids = to_grid(torch.stack(state.canvases), tokens.cell_slot, b, patch_grid(images))
    outputs = [{"class_logits": c, "mask_logits": g} for c, g in zip(state.class_logits, grids, strict=True)]
    halt_head = state.halt_head[: b * length].view(b, length)
    halted, active = torch.stack(state.halted, 1), torch.stack(state.active, 1)
    return outputs, tokens.packing.counts, token_layout(tokens), halted, active, halt_head


def early_exit_forward(model, images: Tensor, labels: Tensor | None) -> SegmenterOutput:
    runner = segment_runner(model, images.device)
    policy = policy_for(model)
    pre, longest = _pre_read(model, policy, images, labels, runner)
    halting = [i for i in range(model.num_exits) if model.exit_can_halt(i)]
    state, sizes, first = None, None, 0
    for last in [*halting, model.num_exits]:
        result = runner(f"stage {last}", exit_segment, model, policy, images, labels, pre, state, sizes, first, last,
                        key=runner.key(model))
        if last == model.num_exits:
            break
        state, first = result, last + 1
        # READ: survivors of exit `last`, to size the next segment
        sizes = read_sizes(state.counts, state.packing.rows, state.packing.max_len)[:2]
    outputs, counts, layout, halted, active, halt_head = result
    if longest is not None:
        layout, halt_head = _slice_layout(layout, longest), halt_head[:, :longest]
    extras = {"layout": layout, "halted": halted, "active_after": active, "halt_head": halt_head}
    return SegmenterOutput(outputs, counts, extras)


def uses_packed(model: nn.Module) -> bool:
    """Whether this forward of ``model`` runs the packed engine (eval mode and ``engine == "packed"``)."""
    if model.engine not in ENGINES:
        raise ValueError(f"engine={model.engine!r} must be one of {ENGINES}")
    return not model.training and model.engine == "packed"


def packed_forward(model, images: Tensor, labels: Tensor | None = None) -> SegmenterOutput:
    """The packed engine's forward for ``Segmenter`` and ``EarlyExitSegmenter`` (eval mode, no gradients)."""
    if model.training:
        raise RuntimeError("the packed engine runs inference only; training uses the masked computation")
    with torch.no_grad():
        if model.exit_layers:
            return early_exit_forward(model, images, labels)
        return segmenter_forward(model, images, labels)
