"""Dispatcher-level counters of one forward: host reads, dispatched ops per engine component, op sequences.

``DispatchCounter`` is a context manager (a TorchFunctionMode + a TorchDispatchMode) and an engine probe
(``step_lightning.models.segments.probing``), so ops are attributed to the component the engine last marked
(policy, layout, embed, blocks, heads, exits, read, output; ``other`` outside the engine's marks).

Host reads (a device -> host transfer the CPU waits for; on CUDA each one is a sync):
* ``.item()``, ``int()``, ``float()``, ``bool()`` / ``if tensor:``, ``.tolist()``, ``.numpy()`` (counted once
  at the Python level: on CPU ``.tolist()`` never reaches the dispatcher);
* ``aten._local_scalar_dense`` reached otherwise, ``nonzero``, ``masked_select``, ``unique``-style ops,
  indexing with a boolean mask (``aten.index`` / ``index_put`` with bool indices: a hidden ``nonzero``);
* copies from a non-CPU device to the CPU (``.cpu()``, ``.to("cpu")``).

``ops`` counts every dispatched op that is not a view or metadata op per component: a proxy of kernel
launches on a GPU (one op ~ one launch in eager mode). ``sequence`` (``record=True``) lists (op, input
shapes) in order: two forwards with equal sequences ran the same static-shape program.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from step_lightning.models.segments import Probe, probing

aten = torch.ops.aten

READING_METHODS = {"tolist", "numpy", "item", "__bool__", "__int__", "__float__", "__index__", "__array__"}
READING_OPS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
    aten.repeat_interleave.Tensor,  # without output_size the output length is read back
}
FREE_OPS = {aten.detach.default, aten.lift_fresh.default, aten.alias.default, aten.empty.memory_format}


def _bool_indices(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _device_to_host(func, args, kwargs) -> bool:
    if func in (aten._to_copy.default,):
        device = kwargs.get("device")
        return isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu" and device is not None and (
            torch.device(device).type == "cpu")
    if func in (aten.copy_.default,):
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


def _shapes(args) -> tuple:
    return tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else
                 tuple(tuple(t.shape) for t in a if isinstance(t, torch.Tensor)) if isinstance(a, (list, tuple))
                 else None for a in args)


class _Functions(TorchFunctionMode):
    def __init__(self, counter: DispatchCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name not in READING_METHODS or self.counter._reading:
            return func(*args, **kwargs)
        self.counter._host_read(name)
        self.counter._reading = True
        try:
            return func(*args, **kwargs)
        finally:
            self.counter._reading = False


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: DispatchCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        counter = self.counter
        if not counter._reading and (
            func in READING_OPS
            or (func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and _bool_indices(args))
            or _device_to_host(func, args, kwargs)
        ):
            counter._host_read(str(func.overloadpacket.__name__))
        if not (func.is_view or func in FREE_OPS):
            counter.ops[counter.section] += 1
            if counter.record:
                counter.sequence.append((str(func), _shapes(args)))
        return func(*args, **kwargs)


class DispatchCounter(Probe):
    """``with DispatchCounter() as c: model(images)`` -> ``c.host_reads`` [(section, what)], ``c.ops``
    {section: ops}, ``c.sequence`` [(op, input shapes)] with ``record=True``."""

    def __init__(self, record: bool = False):
        self.record = record
        self.section = "other"
        self.ops: Counter[str] = Counter()
        self.host_reads: list[tuple[str, str]] = []
        self.sequence: list[tuple] = []
        self._reading = False
        self._modes: list = []

    def mark(self, section: str, detail=None) -> None:
        self.section = section

    def _host_read(self, what: str) -> None:
        self.host_reads.append((self.section, what))

    def __enter__(self) -> DispatchCounter:
        self._modes = [probing(self), _Functions(self), _Dispatch(self)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self.section = "other"

    @property
    def total_ops(self) -> int:
        return sum(self.ops.values())


# Ops CUDA's autocast leaves alone (neither cast nor promoted) that refuse mixed floating dtypes; CPU autocast
# promotes some of them (index_copy), so a dtype mismatch that crashes on a GPU passes silently on the CPU.
SAME_DTYPE_OPS = {
    "index_copy", "index_copy_", "index_add", "index_add_", "index_reduce", "index_reduce_", "scatter", "scatter_",
    "scatter_reduce", "scatter_reduce_", "masked_scatter", "masked_scatter_", "put_", "put",
}


class CudaDtypeRules(TorchFunctionMode):
    """CUDA's mixed-precision rules checked on the CPU: inside the block, an op of ``SAME_DTYPE_OPS`` whose
    floating tensor arguments differ in dtype raises, as it would under CUDA autocast. Seen at the Python level,
    before CPU autocast promotes them. Use with ``torch.autocast("cpu", torch.bfloat16)``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in SAME_DTYPE_OPS:
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            dtypes = {a.dtype for a in tensors if a.is_floating_point()}
            if len(dtypes) > 1:
                raise RuntimeError(f"{name}: mixed dtypes {sorted(map(str, dtypes))}, which CUDA autocast does not "
                                   "reconcile; cast explicitly")
        return func(*args, **kwargs)
