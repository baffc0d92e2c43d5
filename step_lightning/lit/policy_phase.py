"""The policy phase of a STEP run: train the dCTS policy network on the datamodule's labels, in the run's
``policy/`` folder, before the segmenter whose tokenizer it drives.

Its training data (``policy_train.data``) follow CTS's per-dataset ``policynet`` datasets: whole images resized
to the crop the segmenter scores (ADE20K, COCO-Stuff), or random crops of the full-resolution frame (Cityscapes).
It checkpoints like the segmenter's phase (``policy/last.ckpt`` every N steps, at the end and on SIGTERM; the
best by validation loss) and resumes from ``policy/last.ckpt``. Its result, whatever the trainer's settings
(``fast_dev_run``, a phase shorter than its validation interval), is its last weights (CTS uses its final
model), validated, in ``policy/last.ckpt``, with the best validated checkpoint beside them; ``policy/policy.json``
records it when the phase is over.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from step_lightning.config.model import policy_architecture
from step_lightning.core import ConfigError
from step_lightning.core.files import write_json
from step_lightning.lit.callbacks.durability import LAST, BestCheckpoint
from step_lightning.lit.callbacks.final_validation import (
    ValidateLastStep,
    save_last_unless_saved,
    validate_last_weights,
)
from step_lightning.lit.loggers import finish_wandb, instantiate_group
from step_lightning.lit.policy_module import PolicyModule
from step_lightning.lit.resume import POLICY_DIR, POLICY_RESULT
from step_lightning.lit.summary import best_validated

log = logging.getLogger(__name__)


def train_policy(cfg: DictConfig, datamodule, output_dir: Path, resume: Path | None = None,
                 state: dict | None = None) -> dict:
    """Train the dCTS policy network on the datamodule's labels (continuing from the policy checkpoint
    ``resume``, whose dict is ``state``); returns its last weights' checkpoint, metrics and steps, and the best
    validated checkpoint."""
    pcfg = cfg.policy_train
    sizes, head = policy_architecture(cfg)
    if state is not None and tuple((state.get("hyper_parameters") or {}).get("sizes", ())) != sizes:
        raise ConfigError(
            f"{resume} scores windows of {tuple(state['hyper_parameters']['sizes'])} patches, a {cfg.crop_size} px "
            f"crop trains {sizes}; resume with the crop_size it was trained with."
        )
    module = PolicyModule(
        pretrained=pcfg.pretrained and resume is None,  # a resumed phase has all its weights in the checkpoint
        sizes=sizes,
        head=head,
        schedule=pcfg.schedule,
        mean=list(cfg.backbone.mean),
        std=list(cfg.backbone.std),
        ignore_index=datamodule.ignore_index,
        lr=pcfg.lr,
        weight_decay=pcfg.weight_decay,
        warmup_steps=pcfg.warmup_steps,
        exclude_border=pcfg.exclude_border,
    )
    folder = output_dir / POLICY_DIR
    checkpoint = BestCheckpoint(dirpath=folder, filename="policy-step{step:06d}", auto_insert_metric_name=False,
                                monitor="val/loss", mode="min")
    # The group's last_checkpoint callback writes policy/last.ckpt: it follows the best-checkpoint folder.
    last = folder / LAST
    final = ValidateLastStep()
    loggers = instantiate_group(cfg.get("logger"), name_suffix="policy")
    try:
        trainer: L.Trainer = hydra.utils.instantiate(
            cfg.trainer,
            max_steps=pcfg.max_steps,
            val_check_interval=pcfg.val_check_interval,
            callbacks=[checkpoint, *instantiate_group(cfg.get("callbacks"), exclude=("model_checkpoint",)), final],
            logger=loggers or False,
        )
        datamodule.trainer = trainer  # the datamodule reads the world size and rank from it
        batch_size = pcfg.get("batch_size") or datamodule.batch_size
        train_loader = datamodule.policy_dataloader(pcfg.data, pcfg.size, batch_size, trainer.world_size)
        datamodule.setup("validate")
        val_loader = datamodule.val_dataloader()
        trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader,
                    ckpt_path=str(resume) if resume else None)
        validate_last_weights(trainer, module, final, dataloaders=val_loader)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        save_last_unless_saved(trainer, last)
    finally:
        finish_wandb(loggers)  # after the policy's last log; the segmenter's training is a separate W&B run
    log.info("policy: " + " ".join(f"{k.removeprefix('val/')}={v:.3f}" for k, v in sorted(metrics.items())))
    best = best_validated(checkpoint, last, trainer.global_step, metrics["val/loss"], "val/loss")
    result = {"checkpoint": str(last), "metrics": metrics, "steps": trainer.global_step, "best": best}
    if rank_zero_only.rank == 0:
        write_json(folder / POLICY_RESULT, result)
    return result
