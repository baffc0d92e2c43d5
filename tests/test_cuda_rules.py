"""The GPU path's dtype rules on the CPU: every method's inference (both stores, fast segments) and training step
under bf16 autocast with CUDA's rules (``CudaDtypeRules``: ops CUDA autocast leaves alone refuse mixed dtypes),
so a mismatch that would crash on a GPU (a fp32 canvas painted with bf16 logits) fails here."""

from __future__ import annotations

import pytest
import torch

from step_lightning.measure.dispatch import CudaDtypeRules
from step_lightning.models.engine import InferenceOptions
from step_lightning.models.loss import ATMLoss
from tests.test_models_engine import METHODS, NUM_CLASSES, build, scene_labels

OPTIONS = [InferenceOptions(), InferenceOptions(engine="padded"), InferenceOptions(fast=True)]


def test_the_rules_catch_what_cuda_autocast_refuses():
    canvas = torch.zeros(4, 3)
    logits = torch.ones(2, 3, dtype=torch.bfloat16)
    with torch.autocast("cpu", torch.bfloat16):
        canvas.index_copy(0, torch.tensor([0, 2]), logits)  # CPU autocast promotes: no error without the rules
        with CudaDtypeRules(), pytest.raises(RuntimeError, match="index_copy: mixed dtypes"):
            canvas.index_copy(0, torch.tensor([0, 2]), logits)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_under_cuda_rules_in_bf16(method):
    model = build(method)
    images, labels = torch.randn(2, 3, 128, 128), scene_labels(2, 128)
    with torch.autocast("cpu", torch.bfloat16), CudaDtypeRules():
        with torch.no_grad():
            for options in OPTIONS:
                scores, out = model.predict(images, labels, options)
                assert torch.isfinite(scores).all() and scores.dtype == torch.float32
        model.train()
        out = model(images, labels)
    loss = ATMLoss(NUM_CLASSES)(out.outputs, labels)["loss"]
    with CudaDtypeRules():
        loss.backward()
    assert torch.isfinite(loss)
