"""Early token exit: halting rules, physical removal (packed store) vs masking (padded store, dense oracle),
canvas semantics, GFLOPs under token removal, training gradients and exit statistics."""

from __future__ import annotations

import pytest
import torch
from fvcore.nn import FlopCountAnalysis

from step_lightning.core import ConfigError
from step_lightning.measure.gflops import EXTRA_HANDLES, count_gflops
from step_lightning.metrics import ExitStats
from step_lightning.models.early_exit import EarlyExitSegmenter
from step_lightning.models.engine import InferenceOptions, Tokens, TokenStore
from step_lightning.models.factory import ModelSpec, build_model
from step_lightning.models.halting import (
    ConfidenceHalting,
    HaltingRule,
    forced_halting_mask,
    halting_mask,
)
from step_lightning.models.loss import ATMLoss
from step_lightning.models.packed import Packing
from step_lightning.models.tokenizer import DCTSTokenizer
from step_lightning.models.vit import ViTEncoder
from tests.reference import masked_forward

PACKED, PADDED = InferenceOptions(), InferenceOptions(engine="padded")

NUM_CLASSES = 4


def make_model(prune_heads=(1, 2), tokenizer=None, seed: int = 0) -> EarlyExitSegmenter:
    torch.manual_seed(seed)
    encoder = ViTEncoder("vit_t", img_size=64, depth=4, drop_path_rate=0.0)
    model = EarlyExitSegmenter(encoder, NUM_CLASSES, prune_heads, tokenizer, ConfidenceHalting(0.9, keep_top_k=2))
    # Random heads are unsure about everything; sharper presence logits spread the confidences.
    for head in model.heads:
        head.class_embed.weight.data.mul_(50)
    return model.eval()


def first_exit_confidences(model: EarlyExitSegmenter, images, labels=None) -> torch.Tensor:
    rule, model.halting = model.halting, HaltingRule()
    with torch.no_grad():
        out = masked_forward(model, images, labels)["outputs"][0]
    model.halting = rule
    return model.heads[0].semantic_scores(out["class_logits"], out["mask_logits"]).amax(1).flatten(1)


def set_threshold(model: EarlyExitSegmenter, threshold: float) -> None:
    model.halting = ConfidenceHalting(threshold, model.halting.keep_top_k)


def block_labels(batch: int, size: int) -> torch.Tensor:
    """Piecewise-constant labels, a different split per image, so the oracle merges differently."""
    labels = torch.zeros(batch, size, size, dtype=torch.long)
    for b in range(batch):
        cut = size // 4 * (b + 1)
        labels[b, :, cut:] = 1
        labels[b, cut // 2 : cut, : size // 4] = 2
    return labels


# ---------------------------------------------------------------- halting rule on hand-made scores


def scores_from(conf: list[float], cls: list[int], num_classes: int = 2) -> torch.Tensor:
    """[1, K, N] scores whose max over classes is ``conf`` at class ``cls`` (other classes lower)."""
    conf_t = torch.tensor(conf)
    scores = (conf_t * 0.5).repeat(num_classes, 1)
    scores[torch.tensor(cls), torch.arange(len(conf))] = conf_t
    return scores[None]


def test_halting_keeps_top_k_candidates_per_class():
    # class 0: seven candidates (> 0.9) -> the five most confident stay, the two least confident halt;
    # class 1: two candidates -> both stay; token 9 is below the threshold; token 10 is padding.
    conf = [0.91, 0.99, 0.95, 0.92, 0.97, 0.93, 0.98, 0.96, 0.94, 0.5, 0.999]
    cls = [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0]
    valid = torch.tensor([[True] * 10 + [False]])
    halt = halting_mask(scores_from(conf, cls), valid, threshold=0.9, k=5)
    assert halt[0].tolist() == [True, False, False, True, False, False, False, False, False, False, False]


def test_halting_is_per_image_and_respects_k():
    conf = [0.95, 0.96, 0.97, 0.2]
    scores = torch.cat([scores_from(conf, [0, 0, 0, 0]), scores_from(conf, [0, 1, 1, 1])])
    valid = torch.ones(2, 4, dtype=torch.bool)
    assert halting_mask(scores, valid, 0.9, k=1).tolist() == [[True, True, False, False], [False, True, False, False]]
    assert not halting_mask(scores, valid, 0.9, k=5).any()  # k above the token count: nothing can halt
    assert not halting_mask(scores, valid, 1.0, k=0).any()  # threshold 1.0: no candidates at all


def test_forced_halting_halts_exact_fraction_of_most_confident():
    conf = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.3, 0.0], [0.6, 0.2, 0.8, 0.4, 0.0, 0.0]])
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    halt = forced_halting_mask(conf[:, None], valid, 0.5)
    assert halt.tolist() == [[False, True, True, True, False, False], [True, False, True, False, False, False]]
    assert forced_halting_mask(conf[:, None], valid, 0.99).sum(1).tolist() == [5, 3]  # one token always stays


# ---------------------------------------------------------------- masked training path == physical removal


def check_pruned_matches_masked(model: EarlyExitSegmenter, images, labels=None,
                                options: InferenceOptions = PACKED) -> torch.Tensor:
    """Both stores (packed: halted tokens removed; padded: halted tokens masked) against the dense masked
    oracle: halted and active counts equal, every head's scores equal; the stores' ``halt_head`` equal and
    consistent."""
    with torch.no_grad():
        masked = masked_forward(model, images, labels) if options.force_halt is None else None
        runs = {store: model(images, labels, InferenceOptions(engine=store, force_halt=options.force_halt))
                for store in ("packed", "padded")}
    for pruned in runs.values():
        if masked is not None:
            assert torch.equal(pruned.extras["halted"], masked["halted"])
            assert torch.equal(pruned.extras["active_after"], masked["active_after"])
            ran = [o for i, o in enumerate(masked["outputs"]) if i == model.num_exits or model.halting.can_halt(i)]
            assert len(pruned.outputs) == len(ran)
            for p, m in zip(pruned.outputs, ran, strict=True):
                torch.testing.assert_close(model.head_scores(p), model.head_scores(m), atol=1e-4, rtol=0)
        halt_head = pruned.extras["halt_head"]
        for i in range(model.num_exits):
            assert torch.equal((halt_head == i).sum(1), pruned.extras["halted"][:, i])
    assert torch.equal(runs["packed"].extras["halt_head"], runs["padded"].extras["halt_head"])
    assert torch.equal(runs["packed"].extras["halted"], runs["padded"].extras["halted"])
    for p, m in zip(runs["packed"].outputs, runs["padded"].outputs, strict=True):
        torch.testing.assert_close(p["mask_logits"], m["mask_logits"], atol=1e-5, rtol=0)
    return runs["packed"].extras["active_after"]


@pytest.mark.parametrize("batch", [1, 3])
def test_pruned_inference_matches_masked_patch_tokens(batch):
    model = make_model()
    images = torch.randn(batch, 3, 128, 128)
    set_threshold(model, first_exit_confidences(model, images).median().item())
    active = check_pruned_matches_masked(model, images)
    assert (active[:, -1] < 64).all()  # tokens did halt
    if batch == 3:
        assert len(set(active[:, 0].tolist())) > 1  # survivor counts differ: the padded path ran


def test_pruned_inference_matches_masked_supertokens():
    model = make_model(tokenizer=DCTSTokenizer(policy=None))
    images, labels = torch.randn(3, 3, 128, 128), block_labels(3, 128)
    set_threshold(model, first_exit_confidences(model, images, labels).median().item())
    with torch.no_grad():
        tokens = model(images, labels).tokens
    assert len(set(tokens.tolist())) > 1 and (tokens < 64).all()  # merged, padded supertoken batch
    active = check_pruned_matches_masked(model, images, labels)
    assert (active[:, -1] < tokens).any()


@pytest.mark.parametrize("store", ["padded", "packed"])
def test_threshold_one_is_no_early_exit(store):
    """Exit heads that cannot halt are skipped at inference; the final head sees every token."""
    model = make_model()
    set_threshold(model, 1.0)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(images, options=InferenceOptions(engine=store))
        reference = masked_forward(model, images)
    torch.testing.assert_close(out.outputs[-1]["class_logits"], reference["outputs"][-1]["class_logits"],
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(out.outputs[-1]["mask_logits"], reference["outputs"][-1]["mask_logits"],
                               atol=1e-5, rtol=0)
    assert len(out.outputs) == 1  # exit heads that cannot halt are skipped at inference
    assert not out.extras["halted"].any() and not reference["halted"].any()
    assert (out.extras["active_after"] == 16).all()


class Recording(HaltingRule):
    """Wraps a rule and keeps each decision."""

    def __init__(self, rule):
        self.rule, self.decisions = rule, []

    def can_halt(self, exit_index):
        return self.rule.can_halt(exit_index)

    def decide(self, exit_index, scores, valid):
        self.decisions.append(self.rule.decide(exit_index, scores, valid) & valid)
        return self.decisions[-1]


def test_halted_tokens_keep_the_logits_of_the_head_that_halted_them():
    model = make_model()
    images = torch.randn(2, 3, 128, 128)
    set_threshold(model, first_exit_confidences(model, images).quantile(0.3).item())
    model.halting = Recording(model.halting)
    with torch.no_grad():
        out = model(images, options=PADDED)  # the padded store keeps token positions: decisions line up
    canvases = [o["mask_logits"].flatten(2) for o in out.outputs]
    halted0, halted1 = model.halting.decisions
    assert halted0.any() and halted1.any()
    final = canvases[-1].transpose(1, 2)
    assert torch.equal(final[halted0], canvases[0].transpose(1, 2)[halted0])
    assert torch.equal(final[halted1], canvases[1].transpose(1, 2)[halted1])
    assert not torch.equal(final[halted1], canvases[0].transpose(1, 2)[halted1])
    survivors = ~(halted0 | halted1)
    assert not torch.equal(final[survivors], canvases[1].transpose(1, 2)[survivors])
    torch.testing.assert_close(model.head_scores(out.outputs[-1]),
                               model.heads[-1].semantic_scores(out.outputs[-1]["class_logits"], canvases[-1])
                               .unflatten(-1, (8, 8)))
    with torch.no_grad():
        packed = model(images)
    torch.testing.assert_close(packed.outputs[-1]["mask_logits"], out.outputs[-1]["mask_logits"], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- GFLOPs follow the shorter sequences


class OneBlock(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x[0], Packing.regular(1, x.shape[1], x.device))


def block_gflops(model: EarlyExitSegmenter, length: int) -> float:
    x = torch.randn(1, length, model.encoder.embed_dim)
    analysis = FlopCountAnalysis(OneBlock(model.encoder.blocks[0]), (x,)).set_op_handle(**EXTRA_HANDLES)
    analysis.unsupported_ops_warnings(False).tracer_warnings("none")
    return analysis.total() / 1e9


def test_gflops_fall_with_forced_halting_and_count_short_sequences():
    model = make_model(prune_heads=(1,))
    image = torch.randn(1, 3, 128, 128)
    results = {}
    for frac in (0.0, 0.2, 0.4, 0.8):
        results[frac] = count_gflops(model, image, options=InferenceOptions(force_halt=frac))
    totals = [r["gflops"] for r in results.values()]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == len(totals)
    patch_embed = results[0.0]["by_module"]["encoder"] - 4 * block_gflops(model, 64)
    for frac, r in results.items():
        survivors = 64 - round(frac * 64)
        expected = patch_embed + block_gflops(model, 64) + 3 * block_gflops(model, survivors)
        assert r["by_module"]["encoder"] == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- training


class HalfThenConfident(HaltingRule):
    """Half the tokens at the first exit, then DToP's rule at threshold 0 (down to top-k per class)."""

    def can_halt(self, exit_index):
        return True

    def decide(self, exit_index, scores, valid):
        if exit_index == 0:
            return forced_halting_mask(scores, valid, 0.5)
        return halting_mask(scores, valid, 0.0, 2)


def test_training_step_gives_gradients_to_every_head():
    model = make_model().train()
    images = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, NUM_CLASSES, (2, 64, 64))
    model.halting = HalfThenConfident()
    out = model(images, labels)
    assert len(out.outputs) == 3
    assert out.outputs[0]["mask_logits"].shape == (2, NUM_CLASSES, 4, 4)
    assert (out.extras["halted"][:, 0] == 8).all() and out.extras["halted"][:, 1].gt(0).all()
    loss = ATMLoss(NUM_CLASSES)(out.outputs, labels)["loss"]
    loss.backward()
    for head in model.heads:
        for name, p in head.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.encoder.blocks[-1].mlp.fc2.weight.grad.abs().sum() > 0


def test_invalid_settings_are_rejected():
    encoder = ViTEncoder("vit_t", img_size=64, depth=4, drop_path_rate=0.0)
    with pytest.raises(ValueError, match="prune_heads"):
        EarlyExitSegmenter(encoder, NUM_CLASSES, [4])
    with pytest.raises(ConfigError, match="force_halt"):
        InferenceOptions(force_halt=1.0)


# ---------------------------------------------------------------- statistics


def test_exit_stats():
    stats = ExitStats()
    stats.update(torch.tensor([[10, 2], [20, 4]]), torch.tensor([100, 100]))
    stats.update(torch.tensor([[0, 6]]), torch.tensor([50]))
    result = stats.compute()
    assert result["per_head"] == [
        {"halted_mean": 10.0, "halted_max": 20.0, "halted_min": 0.0},
        {"halted_mean": 4.0, "halted_max": 6.0, "halted_min": 2.0},
    ]
    assert result["halted_fraction"] == pytest.approx(42 / 250)


def test_exit_stats_from_model_output():
    model = make_model()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64), options=InferenceOptions(force_halt=0.25))
    stats = ExitStats()
    stats.update(out.extras["halted"], out.tokens)
    assert stats.compute()["per_head"][0] == {"halted_mean": 4.0, "halted_max": 4.0, "halted_min": 4.0}


def test_exit_head_width_option():
    model = build_model(ModelSpec("vit_t", num_classes=3, img_size=32, depth=2, prune_heads=(1,), exit_num_heads=6))
    for head in model.heads:
        assert head.stages[0].layers[0].cross_attn.num_heads == 6
        assert head.stages[0].layers[0].self_attn.num_heads == 6


def test_halting_decides_in_fp32_on_bf16_outputs():
    """sigmoid(2.203125) = 0.9005 halts at 0.9 in fp32, but rounds to 0.8984 in bf16."""
    model = build_model(ModelSpec("vit_t", num_classes=2, img_size=32, depth=2, prune_heads=(1,), keep_top_k=0))
    class_logits = torch.tensor([[[10.0, -10.0], [-10.0, 10.0]]], dtype=torch.bfloat16)
    mask_logits = torch.full((1, 2, 4), -10.0, dtype=torch.bfloat16)
    mask_logits[0, 0] = 2.203125
    head_out = {"class_logits": class_logits, "mask_logits": mask_logits.transpose(1, 2)}  # dense [B, L, K]
    packing = Packing.regular(1, 4, "cpu")
    store = TokenStore.start(Tokens(torch.zeros(4, 8, dtype=torch.bfloat16), packing, None, None), 2, masked=False)
    store = store.decide(model.halting, 0, model.heads[0], head_out)
    assert store.halted[0].tolist() == [4]


def test_exit_head_depth_is_an_option():
    from step_lightning.models.factory import ModelSpec, build_model

    spec = ModelSpec(backbone="vit_t", num_classes=NUM_CLASSES, img_size=64, depth=3, drop_path_rate=0.0,
                     prune_heads=(1,), exit_head_layers=1)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    assert [len(head.stages[0].layers) for head in model.heads] == [1, 3]
    default = build_model(ModelSpec(**{**spec.to_dict(), "exit_head_layers": 3}))
    extra = set(default.state_dict()) - set(model.state_dict())
    assert extra and all(key.startswith(("heads.0.stages.0.layers.1.", "heads.0.stages.0.layers.2.")) for key in extra)
    check_pruned_matches_masked(model, torch.randn(2, 3, 64, 64), options=InferenceOptions(force_halt=0.5))
