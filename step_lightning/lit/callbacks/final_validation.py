"""Every training phase ends with a validation of its last weights, whatever ``val_check_interval`` (Lightning
validates only at multiples of it, so a 40k-step phase at interval 16k would end scored at step 32k), and the
phase's result is those weights, in its ``last.ckpt``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback

from step_lightning.lit.callbacks.durability import LastCheckpoint


class ValidateLastStep(Callback):
    """Sets ``trainer.should_stop`` after the last optimiser step: Lightning's training loop then validates
    before it leaves (as after early stopping), inside the fit, so the best-checkpoint and ``last.ckpt``
    callbacks see that validation. ``validated_step`` is the step of the last validation that completed."""

    def __init__(self) -> None:
        super().__init__()
        self.validated_step: int | None = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *_: Any) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validated_step = trainer.global_step


def validate_last_weights(trainer: Trainer, module: LightningModule, final: ValidateLastStep, **loaders: Any) -> None:
    """After ``trainer.fit``: validate the module's weights (the last step's) unless the fit already did. A run
    resumed from a checkpoint of its last step (stopped during that final validation) trains nothing and
    validates here."""
    if final.validated_step != trainer.global_step:
        trainer.validate(module, verbose=False, **loaders)


def save_last_unless_saved(trainer: Trainer, last: Path) -> None:
    """The last weights in ``last``: ``LastCheckpoint`` wrote them at the end of the fit; without it
    (``callbacks.last_checkpoint=null``) they are written here."""
    if not any(isinstance(callback, LastCheckpoint) for callback in trainer.callbacks):
        trainer.save_checkpoint(last)
