"""Segmenter checkpoints are self-contained: model spec, policy weights, the dataset's classes, palette and
normalisation, the evaluation protocol. Rebuilding reads no other file."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import step_lightning
from step_lightning.config.model import build_model_from_config
from step_lightning.lit.checkpoint import load_module
from step_lightning.lit.module import SegmentationModule
from step_lightning.models.factory import ModelSpec, build_encoder
from tests.helpers import compose_config, run_train, write_policy_checkpoint


def test_checkpoint_holds_the_dataset_metadata(tiny_checkpoint):
    hparams = torch.load(tiny_checkpoint("dcts"), weights_only=False)["hyper_parameters"]
    assert hparams["dataset"] == {
        "name": "synthetic",
        "class_names": hparams["dataset"]["class_names"],
        "palette": hparams["dataset"]["palette"],
        "mean": [123.675, 116.28, 103.53],
        "std": [58.395, 57.12, 57.375],
        "ignore_index": 255,
        "eval_scale": [2048, 64],
    }
    assert len(hparams["dataset"]["class_names"]) == len(hparams["dataset"]["palette"]) == 8
    assert (hparams["eval_mode"], hparams["eval_crop"], hparams["eval_stride"]) == ("whole", 64, 42)
    assert hparams["model"]["pretrained"] is None and hparams["init_from"] is None


def test_lightning_load_from_checkpoint(tiny_checkpoint):
    path = tiny_checkpoint("dcts")
    module = SegmentationModule.load_from_checkpoint(path, map_location="cpu")
    reference = load_module(path)
    assert module.hparams.dataset == reference.hparams.dataset
    for name, tensor in reference.model.state_dict().items():
        assert torch.equal(module.model.state_dict()[name], tensor), name
    images = torch.randn(2, 3, 64, 64)
    module.eval()
    assert torch.equal(module.model.predict(images)[0], reference.model.predict(images)[0])


@pytest.mark.slow
def test_trained_checkpoint_rebuilds_without_any_other_file(tmp_path):
    """Train a dCTS model from a pretrained backbone file, a policy checkpoint and an init_from checkpoint, then
    remove all of them and the rest of the run folder: the checkpoint alone rebuilds the same model (the
    policy's weights included)."""
    inputs = tmp_path / "inputs"
    policy = write_policy_checkpoint(inputs / "policy.ckpt", noise=1.0)
    spec = ModelSpec(backbone="vit_t", num_classes=8, img_size=64, depth=2)
    pretrained = inputs / "vit_t.pth"
    torch.save(build_encoder(spec).state_dict(), pretrained)
    overrides = ["debug=tiny", "data.num_train=8", "data.num_val=2", "method=dcts", "tau=5555", f"policy={policy}",
                 f"backbone.pretrained={pretrained}"]
    init = inputs / "init.ckpt"
    initial = build_model_from_config(compose_config(overrides), num_classes=8)
    torch.save({"state_dict": {f"model.{k}": v for k, v in initial.state_dict().items()}}, init)
    run = tmp_path / "run"
    summary = run_train([*overrides, f"init_from={init}"], run)

    kept = tmp_path / "kept" / "model.ckpt"
    kept.parent.mkdir()
    shutil.move(summary["checkpoint"], kept)
    policy_state = torch.load(policy, weights_only=False)["state_dict"]
    before = step_lightning.load(kept)
    image = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    expected = before.predict(image, return_scores=True)
    for folder in (inputs, run):
        shutil.rmtree(folder)

    cfg = compose_config(overrides)
    for module in (load_module(kept), SegmentationModule.load_from_checkpoint(kept, map_location="cpu")):
        loaded_policy = module.model.tokenizer.policy.state_dict()
        assert all(torch.equal(loaded_policy[k.removeprefix("policy.")], v) for k, v in policy_state.items())
        assert module.hparams.dataset["class_names"][:2] == ["sky", "ground"]
        assert module.hparams.dataset["mean"] == list(cfg.backbone.mean)
    after = step_lightning.load(kept).predict(image, return_scores=True)
    assert torch.equal(after.labels, expected.labels) and torch.equal(after.scores, expected.scores)
