"""GFLOPs of a segmenter with fvcore (one multiply-add = one FLOP, attention matmuls included).

    python -m step_lightning.flops backbone=vit_b num_classes=150 resolution=512

fvcore cannot see inside fused ``scaled_dot_product_attention``; the handle below counts its two
matmuls (Q K^T and attention x V) so numbers are comparable with the paper's.
"""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import torch
from fvcore.nn import FlopCountAnalysis
from omegaconf import DictConfig, OmegaConf

from step_lightning.config import register_resolvers
from step_lightning.core.files import write_json


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


class _ForwardForFlops(torch.nn.Module):
    """Traces the full forward; returns the final output's tensors (fvcore needs tensor outputs)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        final = self.model(images, labels).outputs[-1]
        return final["class_logits"], final["mask_logits"]


@torch.no_grad()
def count_gflops(model: torch.nn.Module, image: torch.Tensor, label: torch.Tensor | None = None) -> dict:
    """GFLOPs of one forward at batch 1, total and by top-level module, on the given image [1,3,H,W]
    (``label`` [1,H,W] only feeds an oracle policy)."""
    was_training = model.training
    model.eval()
    try:
        inputs = (image,) if label is None else (image, label)
        analysis = FlopCountAnalysis(_ForwardForFlops(model), inputs).set_op_handle(**EXTRA_HANDLES)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        total = analysis.total() / 1e9
        by_module = {k.removeprefix("model."): v / 1e9 for k, v in analysis.by_module().items()
                     if k.count(".") == 1 and k.startswith("model.")}
        return {"gflops": total, "by_module": by_module, "unsupported": dict(analysis.unsupported_ops())}
    finally:
        model.train(was_training)


def mean_gflops(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None) -> float:
    """Average batch-1 GFLOPs over images [N,3,H,W] (token counts, hence FLOPs, vary per image)."""
    total = 0.0
    for i in range(len(images)):
        label = None if labels is None else labels[i : i + 1]
        total += count_gflops(model, images[i : i + 1], label)["gflops"]
    return total / len(images)


def flops_input(cfg: DictConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The image (and, for an oracle policy, its label map) to count on, at resolution x resolution.

    Plain patches cost the same on any image, so a random one does; with supertokens the count depends on
    the content: ``image=<file>`` (and ``label=<file>`` for the oracle) or, by default, a synthetic scene.
    """
    import numpy as np
    import torch.nn.functional as F
    from PIL import Image

    from step_lightning.data.synthetic import make_scene
    from step_lightning.models.factory import tokenizer_kind

    size = (cfg.resolution, cfg.resolution)
    if tokenizer_kind(cfg) == "patch":
        return torch.randn(1, 3, *size), None
    if cfg.get("image"):
        pixels = torch.from_numpy(np.asarray(Image.open(cfg.image).convert("RGB"))).permute(2, 0, 1)[None].float()
        label = None
        if cfg.get("label"):
            label = torch.from_numpy(np.asarray(Image.open(cfg.label)).astype(np.int64))[None]
            label = F.interpolate(label[:, None].float(), size=size, mode="nearest")[:, 0].long()
        pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)
    else:
        scene, scene_label = make_scene(cfg.seed, cfg.resolution, 8, 5)
        pixels = torch.from_numpy(scene).permute(2, 0, 1)[None].float()
        label = torch.from_numpy(scene_label.astype(np.int64))[None]
    mean = torch.tensor(list(cfg.backbone.mean)).view(1, 3, 1, 1)
    std = torch.tensor(list(cfg.backbone.std)).view(1, 3, 1, 1)
    return (pixels - mean) / std, label


@hydra.main(version_base="1.3", config_path="conf", config_name="flops")
def main(cfg: DictConfig) -> float:
    from step_lightning.config import check_config
    from step_lightning.models.factory import build_model

    check_config(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, cfg.num_classes)
    if cfg.get("ckpt_path"):  # trained exit heads and policy: realistic halting and merging
        from step_lightning.lit.module import load_weights

        load_weights(model, cfg.ckpt_path)
    image, label = flops_input(cfg)
    result = count_gflops(model, image, label)
    rows = [("total", result["gflops"])] + sorted(result["by_module"].items())
    print(f"{cfg.backbone.name} {cfg.resolution}x{cfg.resolution} classes={cfg.num_classes} method={cfg.method} "
          f"tau={cfg.tau} prune_heads={list(cfg.prune_heads)}")
    print(f"{'module':<24}{'GFLOPs':>10}")
    for name, value in rows:
        print(f"{name:<24}{value:>10.2f}")
    out = Path(cfg.paths.output_dir) / "flops.json"
    write_json(out, {**result, "config": OmegaConf.to_container(cfg, resolve=True)})
    print(f"json: {out}")
    print(f"gflops={result['gflops']:.2f}")
    return result["gflops"]


if __name__ == "__main__":
    register_resolvers()
    main()
