"""Training entry point.

    python -m step_lightning.train [overrides]     e.g. backbone=vit_l data=ade20k method=step tau=6899

Fits, validates the best checkpoint, writes ``summary.json`` in the run directory and prints its path.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from step_lightning.config import check_config, register_resolvers
from step_lightning.flops import mean_gflops
from step_lightning.lit.module import SegmentationModule
from step_lightning.models.factory import build_model
from step_lightning.utils import write_json


def instantiate_group(group: DictConfig | None) -> list:
    return [hydra.utils.instantiate(c) for c in (group or {}).values() if c is not None and "_target_" in c]


def build_module(cfg: DictConfig, datamodule) -> SegmentationModule:
    model = build_model(cfg, datamodule.num_classes, datamodule.ignore_index)
    return SegmentationModule(
        model,
        num_classes=datamodule.num_classes,
        ignore_index=datamodule.ignore_index,
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        head_lr_mult=cfg.optim.head_lr_mult,
        betas=tuple(cfg.optim.betas),
        warmup_steps=cfg.optim.warmup_steps,
        schedule=cfg.optim.schedule,
        poly_power=cfg.optim.poly_power,
        eval_mode=cfg.eval.mode,
        eval_crop=cfg.eval.crop,
        eval_stride=cfg.eval.stride,
        loss=OmegaConf.to_container(cfg.loss),
    )


def sample_images(datamodule, count: int = 4) -> torch.Tensor:
    """A few validation images cropped to a multiple of 16, for the per-image GFLOPs count."""
    images = []
    for i in range(min(count, len(datamodule.val_set))):
        image = datamodule.val_set[i]["image"]
        images.append(image[:, : image.shape[1] // 16 * 16, : image.shape[2] // 16 * 16])
    size = min(img.shape[1] for img in images), min(img.shape[2] for img in images)
    return torch.stack([img[:, : size[0], : size[1]] for img in images])


def train(cfg: DictConfig) -> dict:
    """Fit and evaluate; returns the final validation metrics (also written to summary.json)."""
    start = time.time()
    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    datamodule = hydra.utils.instantiate(cfg.data)
    module = build_module(cfg, datamodule)
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=instantiate_group(cfg.get("callbacks")), logger=instantiate_group(cfg.get("logger"))
        or False
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    checkpoint = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    trainer.validate(module, datamodule=datamodule, ckpt_path=checkpoint or None, verbose=False)
    val = module.last_val
    summary = {
        "mIoU": val["mIoU"],
        "aAcc": val["aAcc"],
        "per_class_IoU": dict(zip(datamodule.class_names, val["IoU"].tolist(), strict=True)),
        "gflops": mean_gflops(module.model, sample_images(datamodule)),
        "tokens_per_image": val["tokens"],
        "wall_time_s": time.time() - start,
        "checkpoint": checkpoint,
        "steps": trainer.global_step,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if trainer.is_global_zero:
        path = write_json(output_dir / "summary.json", summary)
        print(f"mIoU={summary['mIoU']:.2f} aAcc={summary['aAcc']:.2f} gflops={summary['gflops']:.2f} "
              f"tokens_per_image={summary['tokens_per_image']:.1f}")
        print(f"summary: {path}")
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return float(train(cfg)["mIoU"])  # the objective for Hydra sweepers


if __name__ == "__main__":
    register_resolvers()
    main()
