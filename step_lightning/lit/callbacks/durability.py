"""Keeping a run resumable: atomic checkpoint files, ``last.ckpt`` every N steps, at the end and on
SIGTERM/Ctrl-C, the best checkpoint carried over when a run resumes in another folder, and a stop on a
non-finite loss that leaves the last good checkpoint untouched."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.callbacks import ModelCheckpoint as _ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn

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


class BestCheckpoint(_ModelCheckpoint):
    """Lightning's ModelCheckpoint that keeps its best checkpoints when a run resumes.

    From another folder (``ckpt_path=<old run>/checkpoints/last.ckpt`` into a new run directory) Lightning
    keeps only the old ``best_model_path`` and forgets its score, so the first validation of the resumed run
    becomes "best" whatever it scores. Here the old run's best checkpoints are copied into this folder with
    their scores, so the tracking goes on as if the run had not moved and the new folder holds what it
    reports. Best checkpoints that are gone (deleted, or a kill between a better checkpoint replacing them
    and the next last.ckpt) are dropped from the tracking instead of being read at the end.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_dir = state_dict.get("dirpath", self.dirpath)
        saved = dict(state_dict.get("best_k_models") or {})
        kept = {path: score for path, score in saved.items() if Path(path).is_file()}
        if self.dirpath is None or (saved_dir == self.dirpath and len(kept) == len(saved)):
            return super().load_state_dict(state_dict)
        if len(kept) < len(saved):
            rank_zero_warn(f"best checkpoints of the resumed run are gone ({', '.join(set(saved) - set(kept))}); "
                           "tracking goes on with the ones left")
        moved = {path: Path(self.dirpath) / Path(path).name if saved_dir != self.dirpath else Path(path)
                 for path in kept}
        if rank_zero_only.rank == 0:
            for old, new in moved.items():
                if not new.is_file():
                    atomic_write(new, lambda f, source=old: _copy(source, f), binary=True)
        best_k = {str(moved[path]): score for path, score in kept.items()}
        state = {**state_dict, "dirpath": self.dirpath, "best_k_models": best_k, "last_model_path": ""}
        if best_k:
            order = sorted(best_k, key=lambda path: float(best_k[path]), reverse=self.mode == "max")
            state |= {"best_model_path": order[0], "best_model_score": best_k[order[0]],
                      "kth_best_model_path": order[-1], "kth_value": best_k[order[-1]]}
        else:
            state |= {"best_model_path": "", "best_model_score": None, "kth_best_model_path": "",
                      "kth_value": self.kth_value}
        super().load_state_dict(state)


def _copy(source: str, target) -> None:
    with open(source, "rb") as f:
        shutil.copyfileobj(f, target)


def checkpoint_dir(trainer: Trainer) -> Path:
    """The folder of the trainer's best-checkpoint callback (``<run>/checkpoints`` or ``<run>/policy``)."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, _ModelCheckpoint) and callback.dirpath:
            return Path(callback.dirpath)
    return Path(trainer.default_root_dir) / "checkpoints"


class LastCheckpoint(Checkpoint):
    """Owns ``last.ckpt`` next to the best checkpoint: written every ``every_n_train_steps`` optimiser steps,
    again after each validation of the fit (so that it holds the best-checkpoint tracking that validation
    updated, and a resume does not repeat it), at the end of fitting and when SIGTERM (Lightning stops after
    the current step) or Ctrl-C interrupts it. A SIGKILL loses at most ``every_n_train_steps`` steps. Not
    written after other exceptions (a NaN loss, out of memory), so the last good state survives them."""

    def __init__(self, every_n_train_steps: int | None = None):
        super().__init__()
        self.every_n_train_steps = every_n_train_steps
        self._validations = 0
        self._saved: tuple[int, int] | None = None  # (step, validations) of the state last written

    def path(self, trainer: Trainer) -> Path:
        return checkpoint_dir(trainer) / LAST

    def save(self, trainer: Trainer) -> None:
        state = (trainer.global_step, self._validations)
        if state != self._saved:
            trainer.save_checkpoint(self.path(trainer))
            self._saved = state

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *_: Any) -> None:
        n = self.every_n_train_steps
        if n and trainer.global_step % n == 0 and not trainer.sanity_checking:
            self.save(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._validations += 1
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
