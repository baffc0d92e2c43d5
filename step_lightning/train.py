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
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from step_lightning.config import check_config, register_resolvers
from step_lightning.flops import mean_gflops
from step_lightning.lit.module import SegmentationModule
from step_lightning.models.factory import build_model, tokenizer_kind
from step_lightning.utils import write_json


def instantiate_group(group: DictConfig | None, exclude: tuple[str, ...] = (), name_suffix: str = "") -> list:
    """Instantiate every ``_target_`` entry of a callbacks/logger group (``name_suffix`` separates the
    loggers of a second training in the same run, e.g. the policy's)."""
    items = []
    for key, c in (group or {}).items():
        if c is None or "_target_" not in c or key in exclude:
            continue
        extra = {"name": f"{c.name}_{name_suffix}"} if name_suffix and "name" in c else {}
        items.append(hydra.utils.instantiate(c, **extra))
    return items


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


def sample_batch(datamodule, count: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A few validation images (and labels, for an oracle policy) center-cropped to crop x crop, the
    model's input size, for the per-image GFLOPs count (token counts, hence FLOPs, vary per image)."""
    images, labels = [], []
    for i in range(min(count, len(datamodule.val_set))):
        sample = datamodule.val_set[i]
        image, label = sample["image"], sample["label"]
        if label.shape != image.shape[1:]:
            label = F.interpolate(label[None, None].float(), size=image.shape[1:], mode="nearest")[0, 0].long()
        images.append(image)
        labels.append(label)
    crop = min(datamodule.crop_size, *(img.shape[1] for img in images), *(img.shape[2] for img in images))
    crop -= crop % 16
    return (torch.stack([img[:, :crop, :crop] for img in images]), torch.stack([lab[:crop, :crop] for lab in labels]))


def train_policy(cfg: DictConfig, datamodule, output_dir: Path) -> dict:
    """Train the dCTS policy network on the datamodule's labels; returns its checkpoint and metrics."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from step_lightning.lit.policy_module import PolicyModule

    pcfg = cfg.policy_train
    module = PolicyModule(
        pretrained=pcfg.pretrained,
        mean=list(cfg.backbone.mean),
        std=list(cfg.backbone.std),
        ignore_index=datamodule.ignore_index,
        lr=pcfg.lr,
        weight_decay=pcfg.weight_decay,
        warmup_steps=pcfg.warmup_steps,
    )
    checkpoint = ModelCheckpoint(dirpath=output_dir / "policy", filename="policy-step{step:06d}",
                                 auto_insert_metric_name=False, monitor="val/loss", mode="min", save_last=True)
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        max_steps=pcfg.max_steps,
        val_check_interval=pcfg.val_check_interval,
        callbacks=[checkpoint, *instantiate_group(cfg.get("callbacks"), exclude=("model_checkpoint",))],
        logger=instantiate_group(cfg.get("logger"), name_suffix="policy") or False,
    )
    trainer.fit(module, datamodule=datamodule)
    best = checkpoint.best_model_path or checkpoint.last_model_path
    metrics = trainer.validate(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)[0]
    print("policy: " + " ".join(f"{k.removeprefix('val/')}={v:.3f}" for k, v in sorted(metrics.items())))
    return {"checkpoint": best, "metrics": metrics, "steps": trainer.global_step}


def train(cfg: DictConfig) -> dict:
    """Fit and evaluate; returns the final validation metrics (also written to summary.json).

    ``task=policy`` trains only the dCTS policy. With a supertoken method and ``policy=train``, the policy
    is trained first in this run (``<run>/policy/``) and then drives the segmenter's tokenizer.
    """
    start = time.time()
    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    datamodule = hydra.utils.instantiate(cfg.data)
    if cfg.task == "policy":
        policy = train_policy(cfg, datamodule, output_dir)
        summary = {"task": "policy", **policy, "wall_time_s": time.time() - start,
                   "config": OmegaConf.to_container(cfg, resolve=True)}
        return finish(summary, output_dir, f"policy checkpoint: {policy['checkpoint']}")
    policy_summary = None
    if cfg.policy == "train" and tokenizer_kind(cfg) != "patch":
        policy_summary = train_policy(cfg, datamodule, output_dir)
        cfg.policy = policy_summary["checkpoint"]
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
        "method": cfg.get("method"),
        "mIoU": val["mIoU"],
        "aAcc": val["aAcc"],
        "per_class_IoU": dict(zip(datamodule.class_names, val["IoU"].tolist(), strict=True)),
        "gflops": mean_gflops(module.model, *sample_batch(datamodule)),
        "tokens_per_image": val["token_stats"]["total"]["mean"],
        "token_stats": val["token_stats"],
        "exit_stats": val["exit_stats"],
        "wall_time_s": time.time() - start,
        "checkpoint": checkpoint,
        "steps": trainer.global_step,
        "policy": policy_summary,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    line = f"mIoU={summary['mIoU']:.2f} aAcc={summary['aAcc']:.2f} gflops={summary['gflops']:.2f} " + \
        f"tokens_per_image={summary['tokens_per_image']:.1f} reduction={summary['token_stats']['reduction']:.2f}x"
    if summary["exit_stats"]:
        line += f" halted_fraction={summary['exit_stats']['halted_fraction']:.3f}"
    return finish(summary, output_dir, line)


def finish(summary: dict, output_dir: Path, headline: str) -> dict:
    """Write summary.json atomically (rank 0 only) and print its path last, for scripts to parse."""
    if rank_zero_only.rank == 0:
        path = write_json(output_dir / "summary.json", summary)
        print(headline)
        print(f"summary: {path}")
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return float(train(cfg)["mIoU"])  # the objective for Hydra sweepers


if __name__ == "__main__":
    register_resolvers()
    main()
