"""Running the forward's segments: the component probes, the documented host reads, and the runner that executes
the code between two reads eagerly, as CUDA graphs captured per bucket, or compiled.

A *segment* is the code between two host reads (``step_lightning.models.engine.forward``): its shapes depend only
on (batch, image size, sizes read), so with ``InferenceOptions.fast`` it runs as one CUDA graph per bucket
(``cudagraphs``) or compiled (``compile``: inductor + CUDA graphs; ``compile:eager``: dynamo only, for tracing
checks on any device). Per model, the runners and the fused policy network are cached here, outside its state.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from step_lightning.models.halting import HaltingRule
from step_lightning.models.packed import bucket
from step_lightning.tokens.policy import fused_policy

FAST_BACKENDS = ("cudagraphs", "compile", "compile:eager")
# Components a probe sees (``probing``): dispatched ops and time are attributed to the last one marked.
SECTIONS = ("policy", "layout", "embed", "blocks", "heads", "exits", "read", "output")
MAX_GRAPHS = 64  # captured graphs kept per model (least recently used dropped): bounded memory in long evals


# ---------------------------------------------------------------- probes and the one host read

_PROBE = None


class Probe:
    """Told where the forward is: ``mark(section, detail)`` at each component boundary (eager segments only);
    ``detail``: the block index in "blocks", ("head" | "rule" | "select", exit index) in "exits"."""

    def mark(self, section: str, detail=None) -> None:  # pragma: no cover - interface
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


def mark(section: str, detail=None) -> None:
    if _PROBE is not None:
        _PROBE.mark(section, detail)


def host_read(values: Tensor) -> list[int]:
    """The forward's only device -> host transfer (one small int64 vector). Allowed under
    ``torch.cuda.set_sync_debug_mode("error")``, which then catches every other sync of a forward."""
    if not values.is_cuda:
        return values.tolist()
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        return values.tolist()
    finally:
        torch.cuda.set_sync_debug_mode(mode)


def read_sizes(counts: Tensor, cap_rows: int, cap_len: int, bucketed: bool) -> tuple[int, int, int]:
    """Host read: total and longest of ``counts`` [B] -> (rows, dense length, longest). Exact sizes, or the
    buckets of the total (<= cap_rows) and of the longest (<= cap_len); dense length = rows at batch 1."""
    mark("read")
    total, longest = host_read(torch.stack((counts.sum(), counts.max())))
    rows = bucket(total, cap_rows) if bucketed else total
    length = bucket(longest, cap_len) if bucketed else longest
    return rows, rows if counts.shape[0] == 1 else length, longest


def read_longest(counts: Tensor) -> int:
    """Host read of the padded store: the longest image (symbolic under torch.export, at least 2 so that
    attention never treats a one-token sequence as a broadcast)."""
    mark("read")
    (longest,) = host_read(counts.max()[None])
    return torch.sym_max(longest, 2) if isinstance(longest, torch.SymInt) else longest


# ---------------------------------------------------------------- running segments eagerly, as graphs, compiled


class SegmentRunner:
    """Runs a segment ``fn(*args)`` (args: a pytree of tensors and static values). ``eager`` calls it;
    ``cudagraphs`` captures one CUDA graph per (segment, settings, grad mode, tensor shapes) on first use and
    replays it; ``compile`` / ``compile:eager`` call ``torch.compile(fn, fullgraph=True, dynamic=False)``, which
    specialises per bucket the same way. Outputs of graphs are cloned (the graph reuses its buffers).

    CUDA graphs share one memory pool per runner, at most ``MAX_GRAPHS`` are kept (least recently used dropped),
    capture is thread-local (a DataLoader's pin-memory thread may run CUDA calls meanwhile) and runs with the
    autocast weight cache off (cached bf16 weight copies are freed when autocast exits, while a graph would keep
    reading their addresses)."""

    def __init__(self, backend: str = "eager"):
        if backend not in ("eager", *FAST_BACKENDS):
            raise ValueError(f"segment backend '{backend}' must be eager or one of {FAST_BACKENDS}")
        self.backend = backend
        self.graphs: OrderedDict = OrderedDict()
        self.compiled: dict = {}
        self.captures = 0
        self.pool = None

    def __call__(self, name: str, fn, *args, key: tuple = ()):
        """``key``: static values ``fn`` reads besides its arguments (model settings baked into a graph)."""
        if self.backend == "eager" or _PROBE is not None:
            return fn(*args)
        if self.backend == "compile:eager":  # dynamo guards on the settings itself
            return self._compiled(fn)(*args)
        if self.backend == "compile":  # cudagraph trees reuse output buffers: keep ours
            return pytree.tree_map(_clone, self._compiled(fn)(*args))
        return self._graph(name, fn, args, key)

    def _capture(self, fn, static_args):
        """One CUDA graph of ``fn(*static_args)`` (after a warm-up run on a side stream: lazy inits, cuDNN
        autotuning); returns it and the output tensors it writes at every replay."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        autocast = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.autocast("cuda", dtype=dtype, enabled=autocast, cache_enabled=False):
            with torch.cuda.stream(stream):
                fn(*static_args)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = fn(*static_args)
        return graph, out

    @staticmethod
    def _replay(graph) -> None:
        graph.replay()

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
        modes = (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cuda"),
                 torch.get_autocast_dtype("cuda"))
        key = (name, fn, extra, modes, str(spec), tuple(
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
            while len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        graph, inputs, out = entry
        for buffer, i in zip(inputs, tensors, strict=True):
            buffer.copy_(leaves[i])
        self._replay(graph)
        return pytree.tree_map(_clone, out)


def _clone(value):
    return value.clone() if isinstance(value, Tensor) else value


def _static(value):
    """Hashable stand-in of a non-tensor segment argument for the graph key."""
    if isinstance(value, nn.Module):
        return ("module", id(value))
    return value


def settings_key(model: nn.Module, rule: HaltingRule) -> tuple:
    """What the segments read as Python values (a captured graph bakes them in): the tokenizer's and the
    halting rule's settings, and where the weights live (a graph reads them by address)."""
    first = next(model.parameters())
    return (model.tokenizer.settings(), rule.settings(), first.data_ptr(), first.dtype)


@dataclass
class _Cache:
    runners: dict = field(default_factory=dict)  # (backend, device) -> SegmentRunner: callers may alternate
    policy_key: tuple = ()
    policy: nn.Module | None = None


_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> _Cache (kept out of its state)


def _cache(model: nn.Module) -> _Cache:
    if model not in _CACHES:
        _CACHES[model] = _Cache()
    return _CACHES[model]


def segment_runner(model: nn.Module, device: torch.device, options) -> SegmentRunner:
    """The model's runner for ``options`` (an ``InferenceOptions``) on ``device`` (eager unless ``fast``)."""
    backend = "eager"
    if options.fast:
        backend = options.fast_backend
        if backend != "compile:eager" and device.type != "cuda":
            backend = "eager"  # CUDA graphs / inductor graphs need a GPU: eager segments on CPU
    runners = _cache(model).runners
    key = (backend, str(device))
    if key not in runners:
        runners[key] = SegmentRunner(backend)
    return runners[key]


def policy_for(model: nn.Module, fast: bool) -> nn.Module | None:
    """The tokenizer's policy network (None: patches or the oracle); with ``fast`` its fused eval copy
    (BatchNorm folded, channels_last), rebuilt when the weights, device or dtype change."""
    policy = model.tokenizer.policy
    if policy is None or not fast:
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
