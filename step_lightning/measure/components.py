"""Where the packed engine's time and launches go, per component: the policy network, the layout, the
embedding, the encoder blocks, the final head(s), the exits (exit heads, halting, compaction), the host reads
and the output (unsharing to the grid).

Times come from the engine's own component marks (``step_lightning.models.segments.probing``), synchronised on
CUDA at every mark, so each component is timed alone (the sum exceeds an unprobed forward, which overlaps
them); segments run eagerly while probed. ``read`` is the host read itself on an idle device: its round trip,
the smallest bubble each read adds to an unprobed forward (which also waits for the launches after it).
Ops are counted at the dispatcher (``DispatchCounter``): every non-view op, ~ one kernel launch in eager mode.

``FIXED`` components do not shrink with the number of tokens the encoder runs on.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

import torch
from torch import nn

from step_lightning.measure.dispatch import DispatchCounter
from step_lightning.measure.timing import synchronize
from step_lightning.models.engine import InferenceOptions
from step_lightning.models.segments import SECTIONS, Probe, probing

FIXED = ("policy", "layout", "embed", "exits", "read")


class SectionTimer(Probe):
    """Wall time per component of one forward (synchronising at each mark)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.section = "other"
        self.start = 0.0

    def mark(self, section: str, detail=None) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        self.seconds[self.section] += now - self.start
        self.section, self.start = self.label(section, detail), now

    def label(self, section: str, detail) -> str:
        """The bucket a mark's time goes to (subclasses split sections finer)."""
        return section

    def __enter__(self) -> SectionTimer:
        synchronize(self.device)
        self.section, self.start = "other", time.perf_counter()
        self._probing = probing(self)
        self._probing.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mark("other")
        self._probing.__exit__(*exc)


@torch.no_grad()
def component_times(model: nn.Module, images, labels, device: torch.device, repeats: int,
                    options: InferenceOptions | None = None) -> dict[str, float]:
    """Median milliseconds per component of one eager forward of the packed store on (images, labels), after
    one warm-up forward."""
    options = (options or InferenceOptions()).eager()
    runs = []
    for run in range(repeats + 1):
        with SectionTimer(device) as timer:
            model(images, labels, options)
        if run:
            runs.append(dict(timer.seconds))
    names = [s for s in (*SECTIONS, "other") if any(s in r for r in runs)]
    return {s: statistics.median(r.get(s, 0.0) for r in runs) * 1e3 for s in names}


@torch.no_grad()
def component_ops(model: nn.Module, images, labels, options: InferenceOptions | None = None,
                  engine: str = "packed") -> tuple[dict[str, int], int]:
    """Dispatched (non-view) ops per component of one eager forward on ``engine`` and its number of host reads."""
    with DispatchCounter() as counter:
        model(images, labels, (options or InferenceOptions()).eager(engine))
    return dict(counter.ops), len(counter.host_reads)


def fixed_ms(times: dict[str, float]) -> float:
    return sum(times.get(s, 0.0) for s in FIXED)
