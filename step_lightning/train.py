"""Training entry point.

    python -m step_lightning.train [overrides]     e.g. backbone=vit_l data=ade20k method=step tau=6899

Fits, validates the best checkpoint, writes ``summary.json`` in the run directory and prints its path last.
Mistakes the user must fix end with one ``error: ...`` line and exit status 1; SIGTERM saves
``checkpoints/last.ckpt`` and exits with 143.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from step_lightning.cli import launcher_checked, run_command
from step_lightning.config.checks import check_config
from step_lightning.config.model import tokenizer_kind
from step_lightning.core import ConfigError
from step_lightning.lit.callbacks.durability import LAST
from step_lightning.lit.ddp import job_distributed_scope, use_hydra_ddp_command
from step_lightning.lit.loggers import finish_wandb, instantiate_group, log_final, wandb_offline_unless_logged_in
from step_lightning.lit.module import SegmentationModule
from step_lightning.lit.policy_phase import train_policy
from step_lightning.lit.summary import headline, sample_batch, validation_summary, write_summary
from step_lightning.measure.gflops import mean_gflops


def train(cfg: DictConfig) -> dict:
    """Fit and evaluate; returns the final validation metrics (also written to summary.json).

    ``task=policy`` trains only the dCTS policy. With a supertoken method and ``policy=train``, the policy
    is trained first in this run (``<run>/policy/``) and then drives the segmenter's tokenizer.
    """
    with job_distributed_scope():
        return train_job(cfg)


def train_job(cfg: DictConfig) -> dict:
    start = time.time()
    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    resume = resume_path(cfg, output_dir) if cfg.task != "policy" else None
    datamodule = hydra.utils.instantiate(cfg.data)
    if cfg.task == "policy":
        policy = train_policy(cfg, datamodule, output_dir)
        summary = {"task": "policy", **policy, "wall_time_s": time.time() - start,
                   "config": OmegaConf.to_container(cfg, resolve=True)}
        return write_summary(summary, output_dir / "summary.json", f"policy checkpoint: {policy['checkpoint']}")

    policy_summary = None
    if cfg.policy == "train" and tokenizer_kind(cfg) != "patch" and not resume:
        policy_summary = train_policy(cfg, datamodule, output_dir)
        cfg.policy = policy_summary["checkpoint"]
    module = SegmentationModule.from_config(cfg, datamodule.num_classes, datamodule.ignore_index, bool(resume),
                                            dataset=datamodule.metadata())
    loggers = instantiate_group(cfg.get("logger"))
    try:
        trainer: L.Trainer = hydra.utils.instantiate(
            cfg.trainer, callbacks=instantiate_group(cfg.get("callbacks")), logger=loggers or False
        )
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
        best = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
        checkpoint = best.best_model_path if best else ""
        trainer.validate(module, datamodule=datamodule, ckpt_path=checkpoint or None, verbose=False)
        summary = {
            "method": cfg.get("method"),
            **validation_summary(module.last_val, datamodule.class_names),
            "gflops": mean_gflops(module.model, *sample_batch(datamodule)),
            "wall_time_s": time.time() - start,
            "checkpoint": checkpoint,
            "steps": trainer.global_step,
            "policy": policy_summary,
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        log_final(loggers, summary, trainer.global_step)
        return write_summary(summary, output_dir / "summary.json", headline(summary))
    finally:
        finish_wandb(loggers)


def resume_path(cfg: DictConfig, output_dir: Path) -> Path | None:
    """``ckpt_path`` if given, else (``auto_resume``) this run directory's own last.ckpt, which a requeued
    SLURM job or a rerun into the same ``hydra.run.dir`` finds."""
    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise ConfigError(f"ckpt_path={cfg.ckpt_path} does not exist; give a run's checkpoints/{LAST}.")
        return path
    own = output_dir / "checkpoints" / LAST
    if cfg.get("auto_resume") and own.is_file():
        print(f"resuming from {own} (auto_resume)")
        return own
    return None


def train_command(cfg: DictConfig) -> float:
    """The objective for Hydra sweepers: the final val mIoU (NaN for task=policy)."""
    try:
        return float(train(cfg).get("mIoU", float("nan")))
    except SIGTERMException:
        print(f"error: stopped by SIGTERM; resume with ckpt_path={Path(cfg.paths.output_dir) / 'checkpoints' / LAST}",
              file=sys.stderr)
        raise SystemExit(143) from None


@launcher_checked
@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    use_hydra_ddp_command()
    wandb_offline_unless_logged_in(cfg)
    return run_command(train_command, cfg)


if __name__ == "__main__":
    main()
