"""The policy phase of a STEP run: train the dCTS policy network on the datamodule's labels, in the run's
``policy/`` folder, before the segmenter whose tokenizer it drives."""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from step_lightning.config.model import policy_architecture, tokenizer_kind
from step_lightning.lit.loggers import finish_wandb, instantiate_group
from step_lightning.lit.policy_module import PolicyModule


def train_policy(cfg: DictConfig, datamodule, output_dir: Path) -> dict:
    """Train the dCTS policy network on the datamodule's labels; returns its checkpoint and metrics."""
    pcfg = cfg.policy_train
    sizes, head = policy_architecture(tokenizer_kind(cfg), cfg.crop_size)
    module = PolicyModule(
        pretrained=pcfg.pretrained,
        sizes=sizes,
        head=head,
        schedule=pcfg.schedule,
        mean=list(cfg.backbone.mean),
        std=list(cfg.backbone.std),
        ignore_index=datamodule.ignore_index,
        lr=pcfg.lr,
        weight_decay=pcfg.weight_decay,
        warmup_steps=pcfg.warmup_steps,
    )
    checkpoint = ModelCheckpoint(dirpath=output_dir / "policy", filename="policy-step{step:06d}",
                                 auto_insert_metric_name=False, monitor="val/loss", mode="min")
    # The group's last_checkpoint callback writes policy/last.ckpt: it follows the best-checkpoint folder.
    loggers = instantiate_group(cfg.get("logger"), name_suffix="policy")
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        max_steps=pcfg.max_steps,
        val_check_interval=pcfg.val_check_interval,
        callbacks=[checkpoint, *instantiate_group(cfg.get("callbacks"), exclude=("model_checkpoint",))],
        logger=loggers or False,
    )
    datamodule.trainer = trainer  # the datamodule reads the world size and rank from it
    batch_size = pcfg.get("batch_size") or datamodule.batch_size
    train_loader = datamodule.policy_dataloader(pcfg.get("whole_image_size"), batch_size, trainer.world_size)
    datamodule.setup("validate")
    try:
        trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=datamodule.val_dataloader())
    finally:
        finish_wandb(loggers)  # the segmenter's training is a separate W&B run
    best = checkpoint.best_model_path or checkpoint.last_model_path
    metrics = trainer.validate(module, dataloaders=datamodule.val_dataloader(), ckpt_path=best or None,
                               verbose=False)[0]
    print("policy: " + " ".join(f"{k.removeprefix('val/')}={v:.3f}" for k, v in sorted(metrics.items())))
    return {"checkpoint": best, "metrics": metrics, "steps": trainer.global_step}
