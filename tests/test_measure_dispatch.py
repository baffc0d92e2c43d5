"""The dispatcher-level counters: every kind of host read is caught once, ordinary ops are not reads, views are
not counted as ops, and ops are attributed to the engine component marked last."""

from __future__ import annotations

import pytest
import torch

from step_lightning.measure.dispatch import DispatchCounter
from step_lightning.models.segments import mark

X = torch.arange(6.0)


@pytest.mark.parametrize(
    ("read", "what"),
    [
        (lambda: X.sum().item(), "item"),
        (lambda: int(X[1]), "__int__"),
        (lambda: float(X[1]), "__float__"),
        (lambda: bool(X[1] > 0), "__bool__"),
        (lambda: 1 if X.max() > 3 else 0, "__bool__"),
        (lambda: X.tolist(), "tolist"),
        (lambda: X.numpy(), "numpy"),
        (lambda: X.nonzero(), "nonzero"),
        (lambda: X.masked_select(X > 2), "masked_select"),
        (lambda: X[X > 2], "index"),
        # values per selected element: index_put_ with a bool index (from torch 2.15 a scalar value is a
        # masked_fill_, which reads nothing)
        (lambda: X.clone().__setitem__(X > 2, torch.tensor([7.0, 8.0, 9.0])), "index_put_"),
        (lambda: X.unique(), "_unique2"),
        (lambda: X.repeat_interleave(torch.tensor([1, 0, 2, 1, 1, 1])), "repeat_interleave"),
        (lambda: range(10)[X.long()[2]], "__index__"),
    ],
)
def test_each_host_read_is_counted_once(read, what):
    with DispatchCounter() as counter:
        read()
    assert counter.host_reads == [("other", what)]


def test_device_side_work_is_not_a_read_and_views_are_not_ops():
    with DispatchCounter(record=True) as counter:
        y = X.view(2, 3).transpose(0, 1)[1:]  # views only
        z = torch.where(X > 2, X, 0.0).cumsum(0).index_select(0, torch.tensor([1, 2]))
        z.topk(1)
        torch.searchsorted(X, z)
    assert counter.host_reads == []
    assert counter.ops["other"] == len(counter.sequence) > 0
    ops = [op for op, _ in counter.sequence]
    assert not any("view" in op or "transpose" in op or "slice" in op for op in ops)
    assert ("aten.cumsum.default", ((6,), None)) in counter.sequence
    del y


def test_ops_and_reads_follow_the_marked_component():
    with DispatchCounter() as counter:
        X + 1
        mark("blocks")
        X * 2
        X * 3
        mark("read")
        X.tolist()
    assert counter.ops == {"other": 1, "blocks": 2}
    assert counter.host_reads == [("read", "tolist")]
    mark("blocks")  # outside a counter: no effect
    assert counter.section == "other"
