"""What only a GPU can show (marked ``gpu``, skipped without CUDA; ``make gpu-check`` runs them): no host sync but
the documented reads (``set_sync_debug_mode("error")``), bf16 autocast inference and training of every method,
the packed store (varlen attention) against the padded one (dense attention) in bf16, CUDA-graph capture and
replay under autocast and across grad modes."""

from __future__ import annotations

import pytest
import torch

from step_lightning.models import segments
from step_lightning.models.engine import InferenceOptions
from step_lightning.models.loss import ATMLoss
from step_lightning.models.packed import Packing, self_attention, use_flash_varlen
from tests.test_models_engine import METHODS, NUM_CLASSES, build, scene_labels

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")
FAST = InferenceOptions(fast=True)


def cuda_model(method: str, size: int = 256):
    model = build(method, size=size).to(CUDA)
    images, labels = torch.randn(3, 3, size, size, device=CUDA), scene_labels(3, size).to(CUDA)
    return model, images, labels


@pytest.mark.parametrize("options", [InferenceOptions(), FAST], ids=["packed", "fast"])
@pytest.mark.parametrize("method", list(METHODS))
def test_no_sync_but_the_documented_reads(method, options):
    model, images, labels = cuda_model(method)
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        model.predict(images, labels, options)  # warm-up: lazy inits, graph captures
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any other device -> host wait raises
        try:
            model.predict(images, labels, options)
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("method", list(METHODS))
def test_bf16_inference_and_training_of_every_method(method):
    model, images, labels = cuda_model(method)
    with torch.autocast("cuda", torch.bfloat16):
        with torch.no_grad():
            for options in (InferenceOptions(), InferenceOptions(engine="padded"), FAST):
                scores, _ = model.predict(images, labels, options)
                assert torch.isfinite(scores).all()
        model.train()
        out = model(images, labels)
    loss = ATMLoss(NUM_CLASSES)(out.outputs, labels)["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("method", ["segvit", "dcts", "cts", "step"])
def test_packed_varlen_equals_padded_dense_in_bf16(method):
    model, images, labels = cuda_model(method)
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        packed, p = model.predict(images, labels)
        padded, q = model.predict(images, labels, InferenceOptions(engine="padded"))
    assert torch.equal(p.tokens, q.tokens)
    # bf16 rounding differs between the two kernels: scores within a few bf16 steps, decisions mostly equal
    assert (packed - padded).abs().max() < 0.05
    assert (packed.argmax(1) == padded.argmax(1)).float().mean() > 0.98


def test_varlen_attention_runs_and_equals_the_dense_kernel():
    counts = torch.tensor([37, 5, 64], device=CUDA)
    packing = Packing.from_counts(counts, 128, 64)
    qkv = torch.randn(128, 3, 4, 32, device=CUDA, dtype=torch.bfloat16)
    assert use_flash_varlen(qkv, packing)
    varlen = self_attention(qkv, packing, 32**-0.5)
    dense = self_attention(qkv.float(), packing, 32**-0.5)  # fp32: the dense kernel
    real = packing.real
    torch.testing.assert_close(varlen[real].float(), dense[real], atol=2e-2, rtol=2e-2)


def test_packed_training_backward_through_varlen():
    model, images, labels = cuda_model("step")
    model.train()
    criterion = ATMLoss(NUM_CLASSES)
    losses = {}
    for name, bf16 in (("bf16", True), ("fp32", False)):
        model.zero_grad()
        with torch.autocast("cuda", torch.bfloat16, enabled=bf16):
            out = model(images, labels)
        losses[name] = criterion(out.outputs, labels)["loss"]
        losses[name].backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert abs(losses["bf16"].item() - losses["fp32"].item()) < 0.05 * abs(losses["fp32"].item())


@pytest.mark.parametrize("method", ["segvit", "step"])
def test_graph_capture_and_replay_under_autocast(method):
    model, images, labels = cuda_model(method)
    segments.reset(model)
    with torch.autocast("cuda", torch.bfloat16):
        with torch.inference_mode():
            eager, _ = model.predict(images, labels)
            first, _ = model.predict(images, labels, FAST)
        runner = segments.segment_runner(model, CUDA, FAST)
        captures = runner.captures
        with torch.inference_mode():
            second, _ = model.predict(images, labels, FAST)
        assert runner.captures == captures  # replayed, not captured again
        with torch.no_grad():  # another grad mode: its own graphs, no replay of inference-mode ones
            third, _ = model.predict(images, labels, FAST)
    for out in (first, second, third):
        assert (out - eager).abs().max() < 0.05
    assert torch.equal(first, second)


def test_python_api_runs_bf16_on_the_gpu(tiny_checkpoint):
    import numpy as np

    import step_lightning

    model = step_lightning.load(tiny_checkpoint("step"), device="cuda")
    assert model.dtype == torch.bfloat16  # the packed store then runs varlen flash attention
    image = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    labels = model.predict(image)
    full = step_lightning.load(tiny_checkpoint("step"), device="cuda", precision="fp32").predict(image)
    assert labels.shape == (70, 90) and (labels == full).float().mean() > 0.9
