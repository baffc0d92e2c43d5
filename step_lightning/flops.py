"""GFLOPs of a segmenter at batch 1, without a dataset (fvcore, one multiply-add = one FLOP).

    python -m step_lightning.flops backbone=vit_b num_classes=150 resolution=512

With supertokens the count depends on the image: ``image=<file>`` (+ ``label=<file>`` for policy=oracle), or
a synthetic scene by default. ``ckpt_path=`` counts a trained run's model, rebuilt from its checkpoint alone
(its exit heads decide what halts); the command line then sets only the input.
Prints the count per top-level module, writes flops.json and ends with ``gflops=<value>``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from step_lightning.cli import checked_command_line, run_command
from step_lightning.config.checks import check_config
from step_lightning.config.model import build_model_from_config, tokenizer_kind
from step_lightning.core.files import write_json
from step_lightning.lit.checkpoint import load_module
from step_lightning.measure.gflops import count_gflops
from step_lightning.measure.inputs import flops_input
from step_lightning.models.factory import ModelSpec

log = logging.getLogger(__name__)


def flops(cfg: DictConfig) -> float:
    check_config(cfg)
    torch.manual_seed(cfg.seed)
    if cfg.get("ckpt_path"):  # the trained model (its exit heads decide what halts), rebuilt from the checkpoint
        module = load_module(cfg.ckpt_path)
        model, spec = module.model, ModelSpec(**module.hparams["model"])
        setting = (f"ckpt_path={cfg.ckpt_path}: {spec.backbone} classes={spec.num_classes} tokenizer={spec.tokenizer} "
                   f"tau={spec.tau} prune_heads={list(spec.prune_heads)}")
        tokenizer = spec.tokenizer
    else:
        model = build_model_from_config(cfg, cfg.num_classes)
        setting = (f"{cfg.backbone.name} classes={cfg.num_classes} method={cfg.method} tau={cfg.tau} "
                   f"prune_heads={list(cfg.prune_heads)}")
        tokenizer = tokenizer_kind(cfg)
    image, label = flops_input(cfg, tokenizer)
    result = count_gflops(model, image, label)
    top_level = {k: v for k, v in result["by_module"].items() if "." not in k}
    rows = [("total", result["gflops"])] + sorted(top_level.items())
    log.info(f"{cfg.resolution}x{cfg.resolution} {setting}")
    log.info(f"{'module':<24}{'GFLOPs':>10}")
    for name, value in rows:
        log.info(f"{name:<24}{value:>10.2f}")
    out = Path(cfg.paths.output_dir) / "flops.json"
    write_json(out, {**result, "config": OmegaConf.to_container(cfg, resolve=True)})
    log.info(f"json: {out}")
    log.info(f"gflops={result['gflops']:.2f}")
    return result["gflops"]


@checked_command_line()
@hydra.main(version_base="1.3", config_path="conf", config_name="flops")
def main(cfg: DictConfig) -> float:
    return run_command(flops, cfg)


if __name__ == "__main__":
    main()
