"""Keeping a run resumable: atomic checkpoint files, ``last.ckpt`` every N steps, at the end and on
SIGTERM/Ctrl-C, and a stop on a non-finite loss that leaves the last good checkpoint untouched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.callbacks import ModelCheckpoint as _ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from step_lightning.core.files import atomic_write

LAST = "last.ckpt"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; the message names the step and the last good checkpoint."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file next to the target, fsync, then ``os.replace``.

    Lightning's own save goes through an fsspec transaction whose local temporary file lives in the system
    temp dir; moving it onto another filesystem falls back to copying into the target, so a kill at that
    moment leaves a truncated checkpoint. Remote paths (s3://, gs://) keep Lightning's behaviour.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(str(path).removeprefix("file://"), lambda f: torch.save(checkpoint, f), binary=True)

    def remove_checkpoint(self, path) -> None:
        fs = get_filesystem(path)
        if fs.exists(path):
            fs.rm(path, recursive=True)


def checkpoint_dir(trainer: Trainer) -> Path:
    """The folder of the trainer's best-checkpoint callback (``<run>/checkpoints`` or ``<run>/policy``)."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, _ModelCheckpoint) and callback.dirpath:
            return Path(callback.dirpath)
    return Path(trainer.default_root_dir) / "checkpoints"


class LastCheckpoint(Checkpoint):
    """Owns ``last.ckpt`` next to the best checkpoint: written every ``every_n_train_steps`` optimiser steps,
    at the end of fitting and when SIGTERM (Lightning stops after the current step) or Ctrl-C interrupts
    it. A SIGKILL loses at most ``every_n_train_steps`` steps. Not written after other exceptions (a NaN
    loss, out of memory), so the last good state survives them."""

    def __init__(self, every_n_train_steps: int | None = None):
        super().__init__()
        self.every_n_train_steps = every_n_train_steps
        self._saved_step = -1

    def path(self, trainer: Trainer) -> Path:
        return checkpoint_dir(trainer) / LAST

    def save(self, trainer: Trainer) -> None:
        if trainer.global_step != self._saved_step:
            trainer.save_checkpoint(self.path(trainer))
            self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *_: Any) -> None:
        n = self.every_n_train_steps
        if n and trainer.global_step % n == 0 and not trainer.sanity_checking:
            self.save(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.save(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException | KeyboardInterrupt) and trainer.state.fn == "fit":
            self.save(trainer)
            rank_zero_info(f"interrupted at step {trainer.global_step}; saved {self.path(trainer)}")


class FiniteLossGuard(Callback):
    """Stops training before the optimiser applies a NaN/inf loss. Under DDP every rank learns that some
    rank saw one (an all-reduce of one flag per step), so all stop together instead of hanging."""

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        here = not bool(torch.isfinite(loss.detach()).all())
        bad = trainer.strategy.reduce_boolean_decision(here, all=False) if trainer.world_size > 1 else here
        if not bad:
            return
        last = checkpoint_dir(trainer) / LAST
        kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"
        value = loss.detach().float().sum().item() if here else "non-finite on another rank"
        raise NonFiniteLossError(
            f"training loss is {value} at step {trainer.global_step + 1}; stopped before the update, {kept}. "
            "Lower optim.lr, raise optim.warmup_steps or use trainer.precision=32-true."
        )
