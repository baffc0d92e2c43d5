"""Log the token visualisation panel (superpatches, halted tokens per exit, prediction, ground truth) during
validation: WandbLogger.log_image, TensorBoardLogger.add_image, otherwise PNG files under the run dir."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from step_lightning.core.resize import resize_labels
from step_lightning.measure.render import render_panels, save_png
from step_lightning.models.base import SegmenterBase


class VisualizationCallback(L.Callback):
    """The first ``num_images`` validation samples, drawn every ``every_n_validations`` validations (rank 0).

    Draws segmenters (``SegmenterBase``); other modules (the policy's) are skipped. Samples are kept from
    the validation batches as they pass, at their own size, and re-run one by one after the epoch, so the
    panels cost ``num_images`` extra forwards per drawn validation.
    """

    def __init__(self, num_images: int = 4, every_n_validations: int = 1, key: str = "val/tokens_panel"):
        super().__init__()
        self.num_images = num_images
        self.every_n_validations = every_n_validations
        self.key = key
        self.validations = 0
        self.samples: list[tuple[torch.Tensor, torch.Tensor, str]] = []

    def _active(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        model = getattr(pl_module, "model", None)
        return (
            trainer.is_global_zero
            and not trainer.sanity_checking
            and isinstance(model, SegmenterBase)
            and self.num_images > 0
            and self.validations % self.every_n_validations == 0
        )

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.samples = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not self._active(trainer, pl_module) or len(self.samples) >= self.num_images:
            return
        names = batch.get("name") or [f"val_{batch_idx}_{i}" for i in range(len(batch["image"]))]
        for image, label, name in zip(batch["image"], batch["label"], names, strict=False):
            if len(self.samples) < self.num_images:
                self.samples.append((image.detach(), label.detach(), str(name)))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        active = self._active(trainer, pl_module) and self.samples
        if not trainer.sanity_checking:
            self.validations += 1
        if not active:
            return
        datamodule = trainer.datamodule
        figures = []
        for image, label, name in self.samples:
            label = resize_labels(label, image.shape[1:])  # validation labels may stay at the original size
            figures += render_panels(
                pl_module.model,
                image[None],
                label[None],
                datamodule.palette,
                datamodule.mean,
                datamodule.std,
                [f"step {trainer.global_step}: {name}"],
            )
        self.samples = []
        self.log_figures(trainer, figures)

    def log_figures(self, trainer: L.Trainer, figures: list) -> None:
        step = trainer.global_step
        as_files = True
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=self.key, images=figures, step=step)
                as_files = False
            elif isinstance(logger, TensorBoardLogger):
                for i, figure in enumerate(figures):
                    logger.experiment.add_image(f"{self.key}/{i}", figure, step, dataformats="HWC")
                as_files = False
        if as_files:  # CSV or no logger: PNGs next to the logger's files (or the run dir)
            # fast_dev_run's DummyLogger has no log_dir
            log_dir = getattr(trainer.loggers[0], "log_dir", None) if trainer.loggers else None
            root = Path(log_dir or trainer.default_root_dir)
            for i, figure in enumerate(figures):
                save_png(figure, root / "vis" / f"step{step:06d}_{i}.png")
