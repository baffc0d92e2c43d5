"""GFLOPs with fvcore, the one path for every number the project reports.

One multiply-add = one FLOP (the paper's convention), batch 1, the whole forward traced: the policy network
and the supertoken embedding included, attention matmuls counted (fvcore cannot see inside fused
``scaled_dot_product_attention`` or ``nn.MultiheadAttention``'s fused kernel: the handles below count them).
Content-dependent methods (supertokens, early exit) are counted per image, on the forward every command runs
(the packed store with exact sizes: no bucket rows, halted tokens gone).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from fvcore.nn import FlopCountAnalysis

from step_lightning.models.base import SegmenterBase
from step_lightning.models.engine import InferenceOptions, run_stage, store_from_rows


def _shape(value) -> list[int]:
    return value.type().sizes()


def sdpa_flop_handle(inputs, outputs) -> int:
    q, k, v = (_shape(x) for x in inputs[:3])
    batch_heads = math.prod(q[:-2])
    return batch_heads * q[-2] * k[-2] * (q[-1] + v[-1])


def native_mha_flop_handle(inputs, outputs) -> int:
    """nn.MultiheadAttention's fused inference kernel: in-projections, two attention matmuls, out-projection."""
    query, key = _shape(inputs[0]), _shape(inputs[1])
    batch, length, dim = query
    source = key[1]
    projections = batch * (length + 2 * source) * dim * dim + batch * length * dim * dim
    return projections + 2 * batch * length * source * dim


EXTRA_HANDLES = {
    "aten::scaled_dot_product_attention": sdpa_flop_handle,
    "aten::_native_multi_head_attention": native_mha_flop_handle,
}


class _TensorOutputs(torch.nn.Module):
    """fvcore's JIT trace needs tensor outputs: a segmenter's final head output, a dict's values."""

    def __init__(self, module: torch.nn.Module, options: InferenceOptions | None):
        super().__init__()
        self.module = module
        self.options = options

    def forward(self, *inputs):
        out = self.module(*inputs, options=self.options) if self.options is not None else self.module(*inputs)
        if isinstance(out, torch.Tensor | tuple):
            return out
        if isinstance(out, dict):
            return tuple(out.values())
        final = out.outputs[-1]
        return final["class_logits"], final["mask_logits"]


@torch.no_grad()
def count_gflops(
    module: torch.nn.Module, *inputs: torch.Tensor | None, options: InferenceOptions | None = None
) -> dict:
    """GFLOPs of one forward of ``module`` (a segmenter, or the policy network) on ``inputs`` (an image
    [1, 3, H, W], and a label [1, H, W] that only an oracle policy reads), in eval mode: the total and
    every submodule's share (``by_module``, dotted paths). ``options``: a segmenter's (e.g. ``force_halt``);
    counted eagerly with exact sizes."""
    was_training = module.training
    module.eval()
    if isinstance(module, SegmenterBase):
        options = (options or InferenceOptions()).eager()
    try:
        inputs = tuple(x for x in inputs if x is not None)
        analysis = FlopCountAnalysis(_TensorOutputs(module, options), inputs).set_op_handle(**EXTRA_HANDLES)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        by_module = {k.removeprefix("module."): v / 1e9 for k, v in analysis.by_module().items() if k}
        unsupported = dict(analysis.unsupported_ops())
        return {"gflops": analysis.total() / 1e9, "by_module": by_module, "unsupported": unsupported}
    finally:
        module.train(was_training)


def training_gflops(forward: float, policy: float = 0.0) -> float:
    """Forward + backward of a training step from its forward's GFLOPs: the backward of every matrix product
    costs two of its forwards (gradients of inputs and of weights, the usual 3x rule), except in the frozen
    policy network (``policy`` GFLOPs), which only runs forward."""
    return 3.0 * (forward - policy) + policy



class _Stage(torch.nn.Module):
    """One stage of the model's own forward (``run_stage``: its blocks and its head) on given tokens [1, N, C],
    without the tokenizer: its cost is a polynomial of degree 2 in N (attention N^2; projections, MLPs and the
    ATM heads' cross-attention N)."""

    def __init__(self, model: SegmenterBase, index: int, rule):
        super().__init__()
        self.model, self.index, self.rule = model, index, rule

    def forward(self, x: torch.Tensor):
        store = store_from_rows(self.model, x)
        for index in range(self.index if not self.model.cascade else 0, self.index + 1):
            store = run_stage(self.model, store, index, self.rule)
        return (store.x, *store.canvases, *store.class_logits)


class ForwardCost:
    """GFLOPs of one forward from its token counts, exact: the cost of every stage as a quadratic in its
    tokens (fitted exactly on three fvcore counts) plus what does not depend on tokens (policy, embedding),
    measured on ``image``. Lets a summary or a benchmark cover every image without tracing each one.
    ``policy``: the policy network's share (it runs forward only in training)."""

    SAMPLES = (16, 64, 256)

    def __init__(self, model: SegmenterBase, image: torch.Tensor, label: torch.Tensor | None = None,
                 options: InferenceOptions | None = None):
        options = (options or InferenceOptions()).eager()
        stages = len(model.exit_layers) + 1  # a cascaded head: all its stages counted as one
        self.quadratics = []
        with torch.no_grad():
            for index in range(stages):
                width = model.encoder.embed_dim
                stage = _Stage(model, index if not model.cascade else len(model.stages) - 1, options.rule(model))
                counts = [count_gflops(stage, image.new_zeros(1, n, width))["gflops"] for n in self.SAMPLES]
                self.quadratics.append(np.polyfit(self.SAMPLES, counts, 2))
            was_training = model.training
            out = model.eval()(image, label, options)
            model.train(was_training)
        active = out.extras["active_after"][0].tolist() if "active_after" in out.extras else []
        counted = count_gflops(model, image, label, options=options)
        self.policy = counted["by_module"].get("tokenizer.policy", 0.0)
        self.fixed = counted["gflops"] - self.variable(int(out.tokens[0]), active)

    def variable(self, tokens: int, active_after: list[int]) -> float:
        return float(sum(np.polyval(q, n) for q, n in zip(self.quadratics, [tokens, *active_after], strict=True)))

    def __call__(self, tokens: int, active_after: list[int] | tuple = ()) -> float:
        return self.fixed + self.variable(tokens, list(active_after))
