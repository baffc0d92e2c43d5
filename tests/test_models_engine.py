"""The one forward: the packed store against the padded store and the dense oracle (tests/reference.py) for every
method, batch composition and bucket, in inference and in training (loss and every gradient); exactly the
documented host reads; static shapes between reads; compilable segments; halting rules as objects."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import pytest
import torch
from torch.utils import _pytree as pytree

from step_lightning.core import ConfigError
from step_lightning.measure.dispatch import DispatchCounter
from step_lightning.models import engine, segments
from step_lightning.models.engine import InferenceOptions
from step_lightning.models.factory import ModelSpec, build_model
from step_lightning.models.halting import ConfidenceHalting, HaltingRule, register_rule
from step_lightning.models.loss import ATMLoss
from step_lightning.models.packed import bucket, ladder
from step_lightning.tokens.layout import dcts_layout
from step_lightning.tokens.policy import OraclePolicy
from step_lightning.tokens.tau import parse_tau
from tests.reference import masked_forward

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
    "dcts_budget": {"tokenizer": "dcts", "tau": 6899, "budget": 0.5},
    "step_budget": {"tokenizer": "dcts", "tau": 6899, "prune_heads": (1, 2), "budget": 0.5, "halt_budget": 0.3},
    "step_net_budget": {"tokenizer": "dcts", "tau": 4999, "prune_heads": (2,), "policy": "net", "budget": 0.4,
                        "halt_budget": 0.4},
}
BUDGETS = [m for m in METHODS if "budget" in METHODS[m]]
PACKED, PADDED = InferenceOptions(), InferenceOptions(engine="padded")
FAST = InferenceOptions(fast=True)  # on CPU: eager segments on bucketed sizes, the fused policy


def no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif isinstance(module, torch.nn.MultiheadAttention):
            module.dropout = 0.0
    return model


def build(method: str, depth: int = 3, size: int = 128, **more):
    torch.manual_seed(0)
    options = {**METHODS[method], **more}
    spec = ModelSpec(backbone="vit_t", num_classes=NUM_CLASSES, img_size=size, depth=depth, drop_path_rate=0.0,
                     taps=tuple(range(1, depth + 1))[-3:], **options)
    model = build_model(spec).eval()
    if spec.prune_heads and spec.halt_budget is None:
        for head in model.heads:  # random heads are unsure: sharper presence logits spread the confidences
            head.class_embed.weight.data.mul_(50)
        # halt about half the tokens of a typical image at the first exit
        images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        model.halting = HaltingRule()
        with torch.no_grad():
            out = masked_forward(model, images, scene_labels(2, size))["outputs"][0]
        confidence = model.heads[0].semantic_scores(out["class_logits"], out["mask_logits"]).amax(1)
        model.halting = ConfidenceHalting(confidence.median().item(), spec.keep_top_k)
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


def run(model, images, labels, options=PACKED):
    with torch.no_grad():
        return model.predict(images, labels, options)


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


def assert_matches_oracle(model, images, labels, out, atol: float = 1e-5):
    """Every head output that ran equals the dense oracle's (inference skips exits that cannot halt)."""
    with torch.no_grad():
        oracle = masked_forward(model, images, labels)
    ran = oracle["outputs"]
    if model.exit_layers:
        ran = [o for i, o in enumerate(ran) if i == model.num_exits or model.halting.can_halt(i)]
        assert torch.equal(out.extras["halted"], oracle["halted"])
        assert torch.equal(out.extras["active_after"], oracle["active_after"])
    assert len(out.outputs) == len(ran)
    for a, b in zip(out.outputs, ran, strict=True):
        torch.testing.assert_close(a["class_logits"], b["class_logits"], atol=atol, rtol=0)
        torch.testing.assert_close(a["mask_logits"], b["mask_logits"], atol=atol, rtol=0)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("method", list(METHODS))
def test_packed_store_equals_padded_store_and_the_dense_oracle(method, batch):
    model = build(method)
    images, labels = torch.randn(batch, 3, 128, 128), scene_labels(batch, 128)
    padded, packed = run(model, images, labels, PADDED), run(model, images, labels)
    assert_same(packed, padded)
    assert_matches_oracle(model, images, labels, packed[1])
    if batch == 3 and METHODS[method].get("tokenizer") == "dcts" and not {"policy", "budget"} & set(METHODS[method]):
        assert len(set(packed[1].tokens.tolist())) == 3  # very different token counts in one batch
    if "prune_heads" in METHODS[method]:
        assert packed[1].extras["halted"].sum() > 0  # tokens did halt


def test_non_square_images():
    model = build("step")
    images, labels = torch.randn(2, 3, 96, 160), scene_labels(2, 160)[..., :96, :]
    assert_same(run(model, images, labels), run(model, images, labels, PADDED))


def test_an_image_alone_equals_the_same_image_in_a_batch():
    model = build("step")
    images, labels = torch.randn(3, 3, 128, 128), scene_labels(3, 128)
    scores, out = run(model, images, labels)
    assert len(set(out.tokens.tolist())) == 3
    for i in range(3):
        alone_scores, alone = run(model, images[i : i + 1], labels[i : i + 1])
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
            sizes = ladder(10 * max(n, 64))
            return sizes[sizes.index(bucket(n)) + steps]

        return pick

    results = [run(model, images, labels)]  # exact sizes
    for steps in (0, 1, 2):
        monkeypatch.setattr(segments, "bucket", shifted(steps))
        results.append(run(model, images, labels, FAST))
    for other in results[1:]:
        assert_same(other, results[0])
    assert_same(results[0], run(model, images, labels, PADDED))


READS = {"segvit": 0, "cts": 0, "cts_net": 0, "dcts": 1, "dtop": 2, "step": 3, "step_net": 2, "cts_dtop": 1,
         "dcts_budget": 0, "step_budget": 0, "step_net_budget": 0}


@pytest.mark.parametrize("method", list(READS))
def test_host_reads_are_exactly_the_documented_ones(method):
    model = build(method)
    images, labels = torch.randn(2, 3, 128, 128), scene_labels(2, 128)
    with torch.no_grad(), DispatchCounter() as counter:
        model(images, labels)
    assert counter.host_reads == [("read", "tolist")] * READS[method]
    with torch.no_grad(), DispatchCounter() as counter:
        model(images, labels, PADDED)  # the padded store reads only dCTS's longest image (none with a budget)
    assert len(counter.host_reads) == int(METHODS[method].get("tokenizer") == "dcts" and method not in BUDGETS)
    if model.exit_layers and method not in BUDGETS:  # an exit that cannot halt costs no read
        with torch.no_grad(), DispatchCounter() as counter:
            model(images, labels, InferenceOptions(force_halt=0.3))
        assert len(counter.host_reads) == READS[method] - model.num_exits + 1
        model.train()  # training: one read per exit that halts, as at inference
        with DispatchCounter() as counter:
            model(images, labels)
        assert counter.host_reads == [("read", "tolist")] * READS[method]


@pytest.mark.parametrize("method", ["dcts", "step"])
def test_close_token_counts_run_few_distinct_static_programs(method):
    model = build(method, depth=2, size=512, **({"prune_heads": (1,)} if method == "step" else {}))
    options = replace(FAST, force_halt=0.5 if model.exit_layers else None)
    images = torch.randn(1, 3, 512, 512)
    sequences, counts = set(), set()
    for labels in close_token_counts(8, 512):
        with torch.no_grad(), DispatchCounter(record=True) as counter:
            out = model(images, labels, options)
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
    reference = run(model, images, labels, FAST)
    torch._dynamo.reset()
    try:
        compiled = run(model, images, labels, replace(FAST, fast_backend="compile:eager"))
    finally:
        segments.reset(model)
    assert_same(compiled, reference)


def test_fast_on_cpu_runs_the_fused_policy_eagerly():
    model = build("step_net")
    images = torch.randn(2, 3, 128, 128)
    reference = run(model, images, None)
    keys = set(model.state_dict())
    fast = run(model, images, None, FAST)
    assert segments.policy_for(model, True) is not model.tokenizer.policy  # the fused copy, cached outside the state
    assert set(model.state_dict()) == keys
    assert_same(fast, reference)


def test_inference_options_are_checked():
    for bad in ({"engine": "nope"}, {"fast_backend": "nope"}, {"force_halt": 1.0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            InferenceOptions(**bad)


class ReplayRunner(segments.SegmentRunner):
    """The CUDA-graph runner with graphs simulated on CPU: capture runs the segment once and keeps its output
    buffers; a replay recomputes from the static input buffers and overwrites those same output buffers, as a
    CUDA graph does."""

    def __init__(self):
        super().__init__("cudagraphs")

    def _capture(self, fn, static_args):
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
    eager = [run(model, x, labels, FAST) for x in images]  # the replay runner captured on the first call
    captures = runner.captures
    assert captures == {"segvit": 1, "step": 4}[method]  # step: tokens, stage 0, stage 1, final
    second = run(model, images[0], labels, FAST)
    assert runner.captures == captures
    for out, reference in zip([*eager[1:], second], [*eager[1:], eager[0]], strict=True):
        assert_same(out, reference)  # earlier outputs were not overwritten by later replays
    monkeypatch.undo()
    for out, x in zip(eager, images, strict=True):
        assert_same(out, run(model, x, labels, FAST))  # replayed graphs == eager segments
    if model.exit_layers:  # a setting baked into the graphs: new captures, new outputs
        monkeypatch.setattr(engine, "segment_runner", lambda *a: runner)
        model.halting = ConfidenceHalting(0.0, 5)
        changed = run(model, images[0], labels, FAST)
        assert runner.captures > captures
        monkeypatch.undo()
        assert_same(changed, run(model, images[0], labels, FAST))


# ---------------------------------------------------------------- training on packed tokens


TRAINED = ["segvit", "cts", "dcts", "dtop", "step", "step_net", "cts_net", "dcts_budget", "step_budget"]


@pytest.mark.parametrize("method", TRAINED)
def test_packed_training_equals_masked_training(method):
    """Loss and every parameter's gradient of a training step on packed tokens (halted tokens leave the sequence)
    equal the dense masked computation's (halted tokens carried and masked), fp32, very different token counts."""
    model = no_dropout(build(method)).train()
    images, labels = torch.randn(3, 3, 128, 128), scene_labels(3, 128)
    criterion = ATMLoss(NUM_CLASSES)
    out = model(images, labels)
    assert len(out.outputs) == (len(model.stages) if model.exit_layers else len(model.taps))
    loss = criterion(out.outputs, labels)["loss"]
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    oracle = masked_forward(model, images, labels)
    oracle_loss = criterion(oracle["outputs"], labels)["loss"]
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    oracle_grads = torch.autograd.grad(oracle_loss, [p for _, p in params], allow_unused=True)
    torch.testing.assert_close(loss, oracle_loss, atol=1e-5, rtol=1e-5)
    if model.exit_layers:
        assert out.extras["halted"].sum() > 0 and torch.equal(out.extras["halted"], oracle["halted"])
    for (name, _), grad, expected in zip(params, grads, oracle_grads, strict=True):
        assert (grad is None) == (expected is None), name
        if grad is not None:
            torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4, msg=name)


def test_drop_path_drops_whole_images_in_training():
    """Per image, as timm's DropPath on [B, N, C]: an image's rows all keep or all lose a block's branch."""
    torch.manual_seed(0)
    model = build("dcts")
    block = model.encoder.blocks[0].train()
    block.drop_path1.drop_prob = block.drop_path2.drop_prob = 0.5
    from step_lightning.models.packed import Packing

    counts = torch.tensor([5, 9, 3, 7])
    packing = Packing.from_counts(counts, 32, 9)
    x = torch.randn(32, 192)
    kept = set()
    for _ in range(8):
        out = block(x, packing)
        changed = (out - x).abs().sum(1) > 0
        for span in torch.split(changed[: int(counts.sum())], counts.tolist()):
            assert span.all() or not span.any()
            kept.add(bool(span.all()))
    assert kept == {True, False}


# ---------------------------------------------------------------- method parts as objects


@dataclass(frozen=True)
class EntropyHalting(HaltingRule):
    """A rule of the test's own: a token halts when its class distribution's entropy is below a bound."""

    bound: float = 0.5
    name = "entropy"

    @classmethod
    def from_spec(cls, spec):
        return cls(spec.prune_threshold)

    def can_halt(self, exit_index: int) -> bool:
        return True

    def decide(self, exit_index, scores, valid):
        p = scores / scores.sum(1, keepdim=True).clamp(min=1e-12)
        entropy = -(p * p.clamp(min=1e-12).log()).sum(1)
        return valid & (entropy < self.bound)


def test_a_new_halting_rule_is_one_registered_class():
    register_rule(EntropyHalting)
    spec = ModelSpec(backbone="vit_t", num_classes=NUM_CLASSES, img_size=64, depth=3, drop_path_rate=0.0,
                     prune_heads=(1,), halting="entropy", prune_threshold=1.0)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    assert model.halting == EntropyHalting(1.0)
    images = torch.randn(2, 3, 64, 64)
    scores, out = run(model, images, None)
    assert_same((scores, out), run(model, images, None, PADDED))
    assert_matches_oracle(model, images, None, out)
    with pytest.raises(ConfigError, match="halting=nope"):
        build_model(ModelSpec(**{**spec.to_dict(), "halting": "nope"}))


def test_graph_settings_come_from_the_tokenizer_and_rule_objects():
    model = build("step")
    key = segments.settings_key(model, model.halting)
    model.tokenizer.thresholds = (0.5, 0.5, 0.5, 0.5)
    assert segments.settings_key(model, model.halting) != key
    assert segments.settings_key(model, ConfidenceHalting(0.1, 5)) != segments.settings_key(model, model.halting)


def test_alternating_options_keep_each_runner_and_its_graphs():
    model = build("segvit")
    device = torch.device("cpu")
    compiled = replace(FAST, fast_backend="compile:eager")
    first = segments.segment_runner(model, device, compiled)
    assert segments.segment_runner(model, device, PACKED) is not first
    assert segments.segment_runner(model, device, compiled) is first  # not a fresh runner: nothing re-captured


@dataclass(frozen=True)
class StaticForced(HaltingRule):
    """The forced fraction at every exit, its survivors bounded from shapes (a static rule)."""

    fraction: float = 0.5
    name = "static_forced"
    static = True

    def can_halt(self, exit_index):
        return True

    def decide(self, exit_index, scores, valid):
        from step_lightning.models.halting import forced_halting_mask

        return forced_halting_mask(scores, valid, self.fraction)

    def survivors(self, exit_index, length):
        return length - round(self.fraction * length)


@pytest.mark.parametrize("method", ["dtop", "step"])
def test_a_static_rule_halts_without_host_reads(method):
    """Survivors bounded from shapes leave at once: no read after the exits, the same outputs as the padded store
    and the dense oracle, at inference and in training."""
    model = build(method)
    model.halting = StaticForced(0.5)
    images, labels = torch.randn(3, 3, 128, 128), scene_labels(3, 128)
    with torch.no_grad(), DispatchCounter() as counter:
        packed = model.predict(images, labels)
    assert len(counter.host_reads) == int(method == "step")  # dCTS's token count only
    assert_same(packed, run(model, images, labels, PADDED))
    assert_matches_oracle(model, images, labels, packed[1])
    assert packed[1].extras["halted"].sum() > 0


@pytest.mark.parametrize("method", ["dcts_budget", "step_budget"])
def test_with_budgets_images_of_any_content_run_one_static_program(method):
    """Both budgets: no host read, and eight images whose dCTS counts all differ dispatch one sequence of (op, shapes)
    and get the budget's exact count, 512 - (512 - 1024) % 3 tokens."""
    model = build(method, depth=2, size=512, **({"prune_heads": (1,)} if "step" in method else {}))
    images = torch.randn(1, 3, 512, 512)
    sequences, counts = set(), set()
    for labels in close_token_counts(8, 512):
        with torch.no_grad(), DispatchCounter(record=True) as counter:
            out = model(images, labels)
        assert counter.host_reads == []
        counts.add(int(out.tokens[0]))
        sequences.add(tuple(counter.sequence))
    assert len(sequences) == 1 and counts == {511}


@pytest.mark.parametrize("method", ["step_budget", "step_net_budget"])
def test_with_budgets_the_forward_compiles_as_one_graph(method):
    import torch._dynamo

    model = build(method)
    images, labels = torch.randn(2, 3, 128, 128), scene_labels(2, 128)
    reference = run(model, images, labels)
    torch._dynamo.reset()
    runner = segments.segment_runner(model, images.device, replace(FAST, fast_backend="compile:eager"))
    try:
        compiled = run(model, images, labels, replace(FAST, fast_backend="compile:eager"))
    finally:
        segments.reset(model)
    assert_same(compiled, reference)
    assert len(runner.compiled) == 1  # one segment: the whole forward, no read to split it


def test_budgets_are_inference_options_of_a_trained_model():
    """A model trained without budgets takes them at inference (no retraining): the token count and the halted
    fraction follow the options; without them it is the model it was."""
    model = build("step")
    images, labels = torch.randn(2, 3, 128, 128), scene_labels(2, 128)
    plain = run(model, images, labels)
    budgeted = run(model, images, labels, InferenceOptions(budget=0.5, halt_budget=0.25))
    assert (budgeted[1].tokens <= 32).all()
    active = budgeted[1].extras["active_after"]
    assert torch.equal(active[:, 0], budgeted[1].tokens - (0.25 * budgeted[1].tokens).round().long())
    assert_same(run(model, images, labels), plain)
    with pytest.raises(ConfigError, match="budget=0.5 sets dCTS"):
        run(build("dtop"), images, labels, InferenceOptions(budget=0.5))
