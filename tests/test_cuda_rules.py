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


class PoisonDummyGradients(torch.autograd.Function):
    """Identity whose backward writes NaN into the rows past the real total, as flash's varlen backward leaves
    those gradient rows unwritten."""

    @staticmethod
    def forward(ctx, values, total):
        ctx.total = total
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad[ctx.total :] = float("nan")
        return grad, None


def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """Variable-length attention on the CPU with flash's contract: rows past the total come back as garbage
    (NaN) and get NaN gradients; the real rows attend within their own sequence."""
    total_q, total_k = int(cu_q[-1]), int(cu_k[-1])
    q, k, v = PoisonDummyGradients.apply(q, total_q), PoisonDummyGradients.apply(k, total_k), \
        PoisonDummyGradients.apply(v, total_k)
    out = torch.full_like(q, float("nan"))
    pieces = []
    for b in range(len(cu_q) - 1):
        qs, ks = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        attn = torch.softmax(torch.einsum("qhd,khd->hqk", q[qs], k[ks]) * scale, -1)
        pieces.append(torch.einsum("hqk,khd->qhd", attn, v[ks]))
    return torch.cat([*pieces, out[total_q:]])


@pytest.mark.parametrize("method", ["step_budget", "dcts_budget", "step"])
def test_training_through_varlen_attention_keeps_dummy_rows_out_of_the_gradients(method, monkeypatch):
    """Training with flash's varlen contract (simulated on the CPU): static budgets leave dummy rows after the
    real ones; their unwritten outputs and gradients must not reach the loss or any weight's gradient."""
    from step_lightning.models import packed

    monkeypatch.setattr(packed, "use_flash_varlen", lambda x, packing: packing.contiguous)
    monkeypatch.setattr(packed, "_varlen_attn", fake_varlen)
    model = build(method).train()
    for module in model.modules():  # the ATM heads' attention dropout would take the dense kernel
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    images, labels = torch.randn(3, 3, 128, 128), scene_labels(3, 128)
    loss = ATMLoss(NUM_CLASSES)(model(images, labels).outputs, labels)["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, bad[:5]
