"""The packed inference engine against the padded reference: equal outputs per image for every method, batch
composition and bucket; exactly the documented host reads; static shapes between reads; compilable segments."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils import _pytree as pytree

from step_lightning.measure.dispatch import DispatchCounter
from step_lightning.models import engine
from step_lightning.models.factory import ModelSpec, build_model
from step_lightning.models.packed import bucket, ladder
from step_lightning.tokens.layout import dcts_layout
from step_lightning.tokens.policy import OraclePolicy
from step_lightning.tokens.tau import parse_tau

NUM_CLASSES = 4
METHODS = {
    "segvit": {},
    "cts": {"tokenizer": "cts"},
    "dcts": {"tokenizer": "dcts", "tau": 6899},
    "dtop": {"prune_heads": (1, 2)},
    "step": {"tokenizer": "dcts", "tau": 6899, "prune_heads": (1, 2)},
    "step_net": {"tokenizer": "dcts", "tau": 4999, "prune_heads": (2,), "policy": "net"},
    "cts_net": {"tokenizer": "cts", "policy": "net"},
    "cts_dtop": {"tokenizer": "cts", "prune_heads": (2,)},
}


def build(method: str, depth: int = 3, size: int = 128, **more):
    torch.manual_seed(0)
    options = {**METHODS[method], **more}
    spec = ModelSpec(backbone="vit_t", num_classes=NUM_CLASSES, img_size=size, depth=depth, drop_path_rate=0.0,
                     taps=tuple(range(1, depth + 1))[-3:], **options)
    model = build_model(spec).eval()
    if spec.prune_heads:
        for head in model.heads:  # random heads are unsure: sharper presence logits spread the confidences
            head.class_embed.weight.data.mul_(50)
        # halt about half the tokens of a typical image at the first exit
        images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        model.prune_threshold = 1.0
        with torch.no_grad():
            out = model.forward_masked(images, scene_labels(2, size)).outputs[0]
        confidence = model.heads[0].semantic_scores(out["class_logits"], out["mask_logits"]).amax(1)
        model.prune_threshold = confidence.median().item()
    return model


def scene_labels(batch: int, size: int) -> torch.Tensor:
    """Very different token counts per image: a random class per patch, two halves, one region, ..."""
    g = torch.Generator().manual_seed(batch)
    labels = torch.zeros(batch, size, size, dtype=torch.long)
    for b in range(batch):
        if b % 3 == 1:
            labels[b, :, size // 2 :] = 1
        elif b % 3 == 0:
            cells = torch.randint(0, NUM_CLASSES, (size // 16, size // 16), generator=g)
            labels[b] = cells.repeat_interleave(16, 0).repeat_interleave(16, 1)
    return labels


def dcts_count(labels: torch.Tensor) -> int:
    grid = (labels.shape[-2] // 16, labels.shape[-1] // 16)
    return int(dcts_layout(OraclePolicy()(labels, grid), grid, parse_tau(6899)).num_tokens[0])


@functools.cache
def close_token_counts(n: int = 8, size: int = 512) -> list[torch.Tensor]:
    """``n`` label maps whose oracle dCTS token counts all differ and lie within 10 % of each other: noise
    cells are added one by one to a two-region scene, each new count is kept."""
    g = torch.Generator().manual_seed(0)
    side = size // 16
    labels = torch.zeros(1, size, size, dtype=torch.long)
    labels[..., size // 2 :] = 1
    found: dict[int, torch.Tensor] = {}
    for cell in torch.randperm(side * side, generator=g).tolist():
        r, c = divmod(cell, side)
        labels[0, 16 * r : 16 * r + 16, 16 * c : 16 * c + 16] = 2 + cell % 2
        count = dcts_count(labels)
        found.setdefault(count, labels.clone())
        window = [k for k in found if count / 1.1 <= k <= count]
        if len(window) >= n:
            return [found[k] for k in sorted(window)[-n:]]
    raise AssertionError("no label maps with close token counts")


def run(model, images, labels, engine_name: str):
    model.engine = engine_name
    with torch.no_grad():
        scores, out = model.predict(images, labels)
    return scores, out


def assert_same(packed, padded, atol: float = 1e-5):
    (p_scores, p), (r_scores, r) = packed, padded
    assert len(p.outputs) == len(r.outputs)
    for a, b in zip(p.outputs, r.outputs, strict=True):
        torch.testing.assert_close(a["class_logits"], b["class_logits"], atol=atol, rtol=0)
        torch.testing.assert_close(a["mask_logits"], b["mask_logits"], atol=atol, rtol=0)
    torch.testing.assert_close(p_scores, r_scores, atol=atol, rtol=0)
    assert torch.equal(p.tokens, r.tokens)
    for key in ("halted", "active_after", "halt_head"):
        assert (key in p.extras) == (key in r.extras)
        if key in r.extras:
            assert torch.equal(p.extras[key], r.extras[key]), key
    a, b = p.extras["layout"], r.extras["layout"]
    assert (a is None) == (b is None)
    if b is not None:
        for name in ("cell_to_token", "token_size", "token_pos", "valid"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("method", list(METHODS))
def test_packed_engine_equals_padded_reference(method, batch):
    model = build(method)
    images, labels = torch.randn(batch, 3, 128, 128), scene_labels(batch, 128)
    padded, packed = run(model, images, labels, "padded"), run(model, images, labels, "packed")
    assert_same(packed, padded)
    if batch == 3 and METHODS[method].get("tokenizer") == "dcts" and "policy" not in METHODS[method]:
        assert len(set(packed[1].tokens.tolist())) == 3  # very different token counts in one batch
    if "prune_heads" in METHODS[method]:
        assert packed[1].extras["halted"].sum() > 0  # tokens did halt


def test_non_square_images():
    model = build("step")
    images, labels = torch.randn(2, 3, 96, 160), scene_labels(2, 160)[..., :96, :]
    assert_same(run(model, images, labels, "packed"), run(model, images, labels, "padded"))


def test_an_image_alone_equals_the_same_image_in_a_batch():
    model = build("step")
    images, labels = torch.randn(3, 3, 128, 128), scene_labels(3, 128)
    scores, out = run(model, images, labels, "packed")
    assert len(set(out.tokens.tolist())) == 3
    for i in range(3):
        alone_scores, alone = run(model, images[i : i + 1], labels[i : i + 1], "packed")
        torch.testing.assert_close(alone_scores[0], scores[i], atol=1e-5, rtol=0)
        assert torch.equal(alone.extras["halted"][0], out.extras["halted"][i])
        n = int(out.tokens[i])
        assert torch.equal(alone.extras["halt_head"][0, :n], out.extras["halt_head"][i, :n])


@pytest.mark.parametrize("method", ["dcts", "step"])
def test_outputs_do_not_depend_on_the_bucket(method, monkeypatch):
    """The exact token count, its bucket and the next two ladder sizes give the same outputs."""
    model = build(method, size=256)
    images, labels = torch.randn(1, 3, 256, 256), close_token_counts(1, 256)[0]

    def shifted(steps):
        def pick(n, cap=None):
            if steps < 0:
                return n
            sizes = ladder(10 * max(n, 64))
            return sizes[sizes.index(bucket(n)) + steps]

        return pick

    results = []
    for steps in (-1, 0, 1, 2):
        monkeypatch.setattr(engine, "bucket", shifted(steps))
        results.append(run(model, images, labels, "packed"))
    for other in results[1:]:
        assert_same(other, results[0])
    assert_same(results[0], run(model, images, labels, "padded"))


READS = {"segvit": 0, "cts": 0, "cts_net": 0, "dcts": 1, "dtop": 2, "step": 3, "step_net": 2, "cts_dtop": 1}


@pytest.mark.parametrize("method", list(READS))
def test_host_reads_are_exactly_the_documented_ones(method):
    model = build(method)
    images, labels = torch.randn(2, 3, 128, 128), scene_labels(2, 128)
    with torch.no_grad(), DispatchCounter() as counter:
        model(images, labels)
    assert counter.host_reads == [("read", "tolist")] * READS[method]
    if model.exit_layers:  # an exit that cannot halt costs no read
        model.prune_threshold, model.force_halt = 1.0, 0.3
        with torch.no_grad(), DispatchCounter() as counter:
            model(images, labels)
        assert len(counter.host_reads) == READS[method] - model.num_exits + 1


@pytest.mark.parametrize("method", ["dcts", "step"])
def test_close_token_counts_run_few_distinct_static_programs(method):
    model = build(method, depth=2, size=512, **({"prune_heads": (1,)} if method == "step" else {}))
    if model.exit_layers:
        model.force_halt = 0.5
    images = torch.randn(1, 3, 512, 512)
    sequences, counts = set(), set()
    for labels in close_token_counts(8, 512):
        with torch.no_grad(), DispatchCounter(record=True) as counter:
            out = model(images, labels)
        counts.add(int(out.tokens[0]))
        sequences.add(tuple(counter.sequence))
    assert len(counts) == 8 and max(counts) <= 1.1 * min(counts)
    assert len(sequences) <= 3


@pytest.mark.parametrize("method", ["step", "cts_net"])
def test_every_segment_traces_as_one_graph(method):
    """Each segment between two reads compiles with fullgraph=True (dynamo, eager backend), same outputs."""
    import torch._dynamo

    model = build(method)
    images, labels = torch.randn(2, 3, 128, 128), scene_labels(2, 128)
    reference = run(model, images, labels, "packed")
    model.fast, model.fast_backend = True, "compile:eager"
    torch._dynamo.reset()
    try:
        compiled = run(model, images, labels, "packed")
    finally:
        model.fast = False
        engine.reset(model)
    assert_same(compiled, reference)


def test_fast_on_cpu_runs_the_fused_policy_eagerly():
    model = build("step_net")
    images = torch.randn(2, 3, 128, 128)
    reference = run(model, images, None, "packed")
    keys = set(model.state_dict())
    model.fast = True
    fast = run(model, images, None, "packed")
    assert engine.policy_for(model) is not model.tokenizer.policy  # the fused copy, cached outside the state
    assert set(model.state_dict()) == keys
    assert_same(fast, reference)


def test_engine_switch():
    model = build("step")
    images, labels = torch.randn(1, 3, 64, 64), scene_labels(1, 64)
    model.engine = "nope"
    with pytest.raises(ValueError, match="engine"):
        model(images, labels)
    model.engine = "packed"
    model.train()
    calls = []
    original = engine.packed_forward
    engine.packed_forward = lambda *a: calls.append(a)
    try:
        out = model(images, labels)  # training: the static masked computation, never the engine
    finally:
        engine.packed_forward = original
    assert not calls and len(out.outputs) == 3
    with pytest.raises(RuntimeError, match="inference only"):
        engine.packed_forward(model, images, labels)


class ReplayRunner(engine.SegmentRunner):
    """The CUDA-graph runner with graphs simulated on CPU: capture runs the segment once and keeps its output
    buffers; a replay recomputes from the static input buffers and overwrites those same output buffers, as a
    CUDA graph does."""

    def __init__(self):
        super().__init__("cudagraphs")

    @staticmethod
    def _capture(fn, static_args):
        out = fn(*static_args)
        return (fn, static_args, out), out

    @staticmethod
    def _replay(graph) -> None:
        fn, static_args, out = graph
        fresh = fn(*static_args)
        for buffer, value in zip(pytree.tree_leaves(out), pytree.tree_leaves(fresh), strict=True):
            if isinstance(buffer, torch.Tensor):
                buffer.copy_(value)


@pytest.mark.parametrize("method", ["step", "segvit"])
def test_graph_runner_captures_once_per_bucket_and_keeps_outputs(method, monkeypatch):
    model = build(method)
    runner = ReplayRunner()
    monkeypatch.setattr(engine, "segment_runner", lambda *a: runner)
    labels = scene_labels(1, 128)
    images = torch.randn(3, 1, 3, 128, 128)
    eager = [run(model, x, labels, "packed") for x in images]
    model.fast = True
    first = [run(model, x, labels, "packed") for x in images]  # the same buckets: one capture per segment
    captures = runner.captures
    assert captures == {"segvit": 1, "step": 4}[method]  # step: tokens, stage 0, stage 1, final
    second = run(model, images[0], labels, "packed")
    assert runner.captures == captures
    for out, reference in zip([*first, second], [*eager, eager[0]], strict=True):
        assert_same(out, reference)  # earlier outputs were not overwritten by later replays
    model.prune_threshold = 0.0  # a setting baked into the graphs: new captures, new outputs
    changed = run(model, images[0], labels, "packed")
    assert runner.captures > captures
    model.fast = False
    assert_same(changed, run(model, images[0], labels, "packed"))
