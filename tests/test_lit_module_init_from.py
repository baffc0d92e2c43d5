"""DToP's two-phase recipe: a model trained without halting initialises the one fine-tuned with halting."""

from __future__ import annotations

import pytest
import torch

from step_lightning.config.model import build_model_from_config, model_spec
from step_lightning.core import ConfigError
from step_lightning.lit.module import SegmentationModule
from tests.helpers import compose_config

TINY = ["method=step", "policy=oracle", "backbone.depth=3", "backbone.taps=[1,2,3]", "prune_heads=[1,2]",
        "crop_size=64"]


def spec(tmp_path) -> dict:
    return model_spec(compose_config(TINY, output_dir=tmp_path), num_classes=8, ignore_index=255).to_dict()


def test_init_from_copies_every_matching_tensor(tmp_path):
    phase1 = build_model_from_config(compose_config([*TINY, "prune_threshold=1.0"], output_dir=tmp_path), num_classes=8)
    ckpt = tmp_path / "phase1.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in phase1.state_dict().items()}}, ckpt)
    phase2 = SegmentationModule(spec(tmp_path), init_from=str(ckpt)).model
    for name, tensor in phase1.state_dict().items():
        assert torch.equal(phase2.state_dict()[name], tensor), name
    assert phase2.halting.threshold == 0.9 and not phase1.halting.can_halt(0)


def test_init_from_rejects_missing_or_foreign_checkpoints(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        SegmentationModule(spec(tmp_path), init_from=str(tmp_path / "nope.ckpt"))
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"something.else": torch.zeros(3)}}, foreign)
    with pytest.raises(ConfigError, match="shares no weights"):
        SegmentationModule(spec(tmp_path), init_from=str(foreign))


def test_segvit_parameter_groups(tmp_path):
    """mmcv custom_keys of SegViT: heads x10 with decay (norms, biases, queries too); backbone norms without decay;
    backbone biases and the position embedding with decay."""
    from step_lightning.lit.module import param_groups

    model = SegmentationModule(spec(tmp_path)).model
    groups = param_groups(model, lr=1.0, weight_decay=0.01, head_lr_mult=10.0, rule="segvit")
    setting = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert setting[id(named["heads.0.queries.weight"])] == (10.0, 0.01)
    assert setting[id(named["heads.0.stages.0.input_norm.bias"])] == (10.0, 0.01)
    assert setting[id(named["encoder.blocks.0.norm1.weight"])] == (1.0, 0.0)
    assert setting[id(named["encoder.blocks.0.attn.qkv.bias"])] == (1.0, 0.01)
    assert setting[id(named["encoder.pos_embed"])] == (1.0, 0.01)
    timm_rule = param_groups(model, lr=1.0, weight_decay=0.01, head_lr_mult=10.0, rule="timm")
    assert {id(p): g["weight_decay"] for g in timm_rule for p in g["params"]}[id(named["encoder.pos_embed"])] == 0.0


def test_init_from_that_fills_too_little_of_the_model_is_refused(tmp_path):
    """The module's own guard (the Python API builds modules without the training's pre-checks)."""
    other = build_model_from_config(compose_config([*TINY, "backbone=vit_s"], output_dir=tmp_path), num_classes=8)
    ckpt = tmp_path / "vit_s.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in other.state_dict().items()}}, ckpt)
    with pytest.raises(ConfigError, match=r"fills \d+/\d+ of this model's tensors, fewer than init_from_min_fraction"):
        SegmentationModule(spec(tmp_path), init_from=str(ckpt))
    partial = SegmentationModule(spec(tmp_path), init_from=str(ckpt), init_from_min_fraction=0.0).model.state_dict()
    shared = [k for k, v in other.state_dict().items() if k in partial and partial[k].shape == v.shape]
    assert shared and all(torch.equal(partial[k], other.state_dict()[k]) for k in shared)  # on purpose: loaded


def test_init_from_leaves_the_policy_network_to_policy(tmp_path):
    """A policy network's weights come from policy= (trained in this run, or its checkpoint); init_from only
    starts the segmenter, so another run's policy in its checkpoint is not copied."""
    cts = ["method=cts", "policy=random", "backbone.depth=3", "backbone.taps=[1,2,3]", "crop_size=64"]
    torch.manual_seed(0)
    source = build_model_from_config(compose_config(cts, output_dir=tmp_path), num_classes=8)
    ckpt = tmp_path / "cts.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}, ckpt)
    target_spec = model_spec(compose_config(cts, output_dir=tmp_path), 8, 255).to_dict()
    torch.manual_seed(1)
    own_policy = SegmentationModule(target_spec).model.state_dict()
    torch.manual_seed(1)
    state = SegmentationModule(target_spec, init_from=str(ckpt)).model.state_dict()
    policy = [k for k in state if k.startswith("tokenizer.policy.")]
    assert policy and all(torch.equal(state[k], own_policy[k]) for k in policy)
    assert not torch.equal(state[policy[0]], source.state_dict()[policy[0]])  # the seeds gave other weights
    assert all(torch.equal(state[k], v) for k, v in source.state_dict().items() if k not in policy)
