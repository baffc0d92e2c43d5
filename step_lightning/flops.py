"""GFLOPs of a segmenter at batch 1, without a dataset (fvcore, one multiply-add = one FLOP).

    python -m step_lightning.flops backbone=vit_b num_classes=150 resolution=512

With supertokens the count depends on the image: ``image=<file>`` (+ ``label=<file>`` for policy=oracle), or
a synthetic scene by default. ``ckpt_path=`` takes a trained run's weights (its exit heads decide what halts).
Prints the count per top-level module, writes flops.json and ends with ``gflops=<value>``.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from step_lightning.cli import run_command
from step_lightning.config.checks import check_config
from step_lightning.config.model import build_model_from_config
from step_lightning.core.files import write_json
from step_lightning.measure.gflops import count_gflops
from step_lightning.measure.inputs import flops_input
from step_lightning.models.checkpoint import load_weights


def flops(cfg: DictConfig) -> float:
    check_config(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model_from_config(cfg, cfg.num_classes)
    if cfg.get("ckpt_path"):  # trained exit heads and policy: realistic halting and merging
        load_weights(model, cfg.ckpt_path)
    image, label = flops_input(cfg)
    result = count_gflops(model, image, label)
    top_level = {k: v for k, v in result["by_module"].items() if "." not in k}
    rows = [("total", result["gflops"])] + sorted(top_level.items())
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


@hydra.main(version_base="1.3", config_path="conf", config_name="flops")
def main(cfg: DictConfig) -> float:
    return run_command(flops, cfg)


if __name__ == "__main__":
    main()
