"""Training entry point.

    python -m step_lightning.train [overrides]     e.g. backbone=vit_l prune_heads=[8,16] tau=6899 data=ade20k

Fits, validates the last weights of every phase, writes ``summary.json`` (the last weights' scores, the best
validated checkpoint beside them) in the run directory and prints its path last.
Mistakes the user must fix end with one ``error: ...`` line and exit status 1; SIGTERM saves the phase's
``last.ckpt`` (``policy/`` or ``checkpoints/``), names it and exits with 143.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from step_lightning.cli import checked_command_line, run_command
from step_lightning.config.checks import check_config, check_datamodule, check_sources, check_training_weights
from step_lightning.config.model import tokenizer_kind
from step_lightning.core import ConfigError
from step_lightning.core.files import read_json
from step_lightning.lit.callbacks.durability import LAST, checkpoint_dir
from step_lightning.lit.callbacks.final_validation import (
    ValidateLastStep,
    save_last_unless_saved,
    validate_last_weights,
)
from step_lightning.lit.ddp import job_distributed_scope, use_hydra_ddp_command
from step_lightning.lit.loggers import finish_wandb, instantiate_group, log_final, wandb_offline_unless_logged_in
from step_lightning.lit.module import SegmentationModule
from step_lightning.lit.policy_phase import train_policy
from step_lightning.lit.resume import POLICY_DIR, Resume, plan_resume, save_run_config
from step_lightning.lit.summary import (
    best_validated,
    headline,
    sample_batch,
    validation_gflops,
    validation_summary,
    write_summary,
)
from step_lightning.models.checkpoint import load_weights, read_checkpoint

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict:
    """Fit and evaluate; returns the final validation metrics (also written to summary.json).

    ``task=policy`` trains only the dCTS policy. With a supertoken method and ``policy=train``, the policy
    is trained first in this run (``<run>/policy/``) and then drives the segmenter's tokenizer.
    """
    with job_distributed_scope():
        return train_job(cfg)


class Stopped(SIGTERMException):
    """SIGTERM stopped a phase; ``checkpoint`` is the last.ckpt it saved (LastCheckpoint) to resume from, or
    None where only a rerun of the same command continues (DToP's first phase)."""

    def __init__(self, checkpoint: Path | None):
        super().__init__(143)
        self.checkpoint = checkpoint


def trains_policy(cfg: DictConfig) -> bool:
    return cfg.task == "policy" or (str(cfg.policy) == "train" and tokenizer_kind(cfg) != "patch")


def train_job(cfg: DictConfig) -> dict:
    start = time.time()
    check_config(cfg)
    check_training_weights(cfg)
    check_sources(cfg, trains_policy(cfg))
    output_dir = Path(cfg.paths.output_dir)
    resume = plan_resume(cfg, output_dir, trains_policy(cfg))
    save_run_config(cfg, output_dir)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    policy_to_train = trains_policy(cfg) and (resume is None or resume.phase == "policy")
    check_phases_can_step(cfg, datamodule, policy_to_train)
    check_datamodule(cfg, datamodule)
    if resume is not None and resume.checkpoint is not None:
        log.info(f"resuming from {resume.checkpoint}" + ("" if cfg.get("ckpt_path") else " (auto_resume)"))
    elif resume is not None:
        log.info(f"the policy phase is over ({resume.policy['checkpoint']}); training the segmenter (auto_resume)")
    if cfg.task == "policy":
        policy = policy_phase(cfg, datamodule, output_dir, resume)
        summary = {"task": "policy", **policy, "wall_time_s": time.time() - start,
                   "config": OmegaConf.to_container(cfg, resolve=True)}
        return write_summary(summary, output_dir / "summary.json", f"policy checkpoint: {policy['checkpoint']}")

    policy_summary = resume.policy if resume is not None else None
    if trains_policy(cfg):
        if policy_to_train:
            policy_summary = policy_phase(cfg, datamodule, output_dir, resume)
        if resume is None or resume.checkpoint is None or resume.phase == "policy":
            cfg.policy = policy_summary["checkpoint"]  # the segmenter starts afresh with this policy
    segment_resume = resume if resume is not None and resume.phase == "segment" and resume.checkpoint else None
    phases = {}
    if two_phases(cfg):
        phases[NO_HALTING] = no_halting_phase(cfg, datamodule, output_dir / NO_HALTING, policy_summary, start)
        cfg = halting_phase(cfg, phases[NO_HALTING]["checkpoint"])
    return fit_segmenter(cfg, datamodule, segment_resume, policy_summary, start, phases)


def check_phases_can_step(cfg: DictConfig, datamodule, policy_to_train: bool) -> None:
    """Before any work: a phase whose training split holds fewer images than its global batch would run zero
    steps (Lightning drops the partial batch) and pass for finished; stop with the mismatch instead."""
    batches = []
    if policy_to_train:
        batches.append(("policy_train.batch_size", cfg.policy_train.get("batch_size") or datamodule.batch_size))
    if cfg.task != "policy":
        batches.append(("data.batch_size", datamodule.batch_size))
    if not batches:
        return
    datamodule.setup("fit")
    images = len(datamodule.train_set)
    for key, batch in batches:
        if images < batch:
            raise ConfigError(
                f"the training split of data={cfg.data.name} holds {images} images, fewer than one batch of {batch} "
                f"({key}), so that phase could not take a single step; add images or set {key} to at most {images}."
            )


NO_HALTING = "no_halting"  # the run's subfolder of DToP's first phase


def two_phases(cfg: DictConfig) -> bool:
    """DToP's recipe: exit heads trained without halting first, then fine-tuned with halting."""
    return bool(cfg.prune_heads) and cfg.prune_threshold < 1.0 and cfg.get("halting_finetune_steps", 0) > 0


def no_halting_phase(cfg: DictConfig, datamodule, folder: Path, policy_summary: dict | None, start: float) -> dict:
    """DToP's first phase in ``folder``: the same training with halting off. A finished phase is kept; an
    interrupted one continues from its own last.ckpt."""
    done = folder / "summary.json"
    if done.is_file():
        return read_json(done)
    first = cfg.copy()
    first.paths.output_dir = str(folder)
    first.prune_threshold = 1.0
    last = folder / "checkpoints" / LAST
    resume = Resume("segment", checkpoint=last, state=read_checkpoint(last)) if last.is_file() else None
    try:
        return fit_segmenter(first, datamodule, resume, policy_summary, start)
    except Stopped:
        raise Stopped(None) from None


def halting_phase(cfg: DictConfig, checkpoint: str) -> DictConfig:
    """Fine-tuning with halting from the first phase's last weights (DToP fine-tunes its final model), for
    ``halting_finetune_steps`` steps."""
    second = cfg.copy()
    second.init_from = checkpoint
    second.trainer.max_steps = cfg.halting_finetune_steps
    second.trainer.val_check_interval = min(cfg.trainer.val_check_interval, cfg.halting_finetune_steps)
    return second


def fit_segmenter(
    cfg: DictConfig, datamodule, resume: Resume | None, policy_summary: dict | None, start: float, phases=None
) -> dict:
    """Fit (continuing ``resume``), validate the last weights, write ``<cfg.paths.output_dir>/summary.json``
    (their scores, ``checkpoint`` their file, ``best`` the best validated checkpoint, the summaries of earlier
    ``phases``); returns the summary."""
    output_dir = Path(cfg.paths.output_dir)
    module = SegmentationModule.from_config(cfg, datamodule.num_classes, datamodule.ignore_index, resume is not None,
                                            dataset=datamodule.metadata())
    if resume is not None:  # one line, not Lightning's list of every mismatching tensor
        load_weights(module.model, resume.state, key=f"ckpt_path={resume.checkpoint}")
    loggers = instantiate_group(cfg.get("logger"))
    final = ValidateLastStep()
    try:
        trainer: L.Trainer = hydra.utils.instantiate(
            cfg.trainer, callbacks=[*instantiate_group(cfg.get("callbacks")), final], logger=loggers or False
        )
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        last = checkpoint_dir(trainer) / LAST
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume.checkpoint) if resume else None)
            validate_last_weights(trainer, module, final, datamodule=datamodule)
            save_last_unless_saved(trainer, last)
        except SIGTERMException:
            raise Stopped(last) from None
        scores = validation_summary(module.last_val, datamodule.class_names)
        best_callback = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
        summary = {
            "method": cfg.get("method"),
            **scores,
            "gflops": validation_gflops(module.model, module.last_val, *sample_batch(datamodule, count=1)),
            "wall_time_s": time.time() - start,
            "checkpoint": str(last),
            "best": best_validated(best_callback, last, trainer.global_step, scores["mIoU"], "mIoU"),
            "steps": trainer.global_step,
            "policy": policy_summary,
            "config": OmegaConf.to_container(cfg, resolve=True),
            **({"phases": phases} if phases else {}),
        }
        log_final(loggers, summary, trainer.global_step)
    finally:
        finish_wandb(loggers)  # before the summary line, which stays the last one printed
    return write_summary(summary, output_dir / "summary.json", headline(summary))


def policy_phase(cfg: DictConfig, datamodule, output_dir: Path, resume: Resume | None) -> dict:
    """The policy phase, continued from ``resume`` when it is the policy's; SIGTERM names its last.ckpt."""
    continued = resume is not None and resume.phase == "policy"
    try:
        return train_policy(cfg, datamodule, output_dir, resume.checkpoint if continued else None,
                            resume.state if continued else None)
    except SIGTERMException:
        raise Stopped(output_dir / POLICY_DIR / LAST) from None


def train_command(cfg: DictConfig) -> float:
    """The objective for Hydra sweepers: the final val mIoU (NaN for task=policy)."""
    try:
        return float(train(cfg).get("mIoU", float("nan")))
    except Stopped as stop:
        if stop.checkpoint is not None and stop.checkpoint.is_file():
            how = (f"resume with ckpt_path={stop.checkpoint} (or rerun the same command with "
                   f"hydra.run.dir={cfg.paths.output_dir})")
        elif stop.checkpoint is None:
            how = f"rerun the same command with hydra.run.dir={cfg.paths.output_dir} (it continues where it stopped)"
        else:
            how = "nothing was saved yet; rerun the same command"
        log.error(f"error: stopped by SIGTERM; {how}")
        raise SystemExit(143) from None


@checked_command_line()
@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    use_hydra_ddp_command()
    wandb_offline_unless_logged_in(cfg)
    return run_command(train_command, cfg)


if __name__ == "__main__":
    main()
