"""LightningModule training and evaluating a segmenter with the ATM loss."""

from __future__ import annotations

from functools import partial

import lightning as L
import torch
from torch import nn

from step_lightning.inference import infer
from step_lightning.lit.schedules import lr_factor
from step_lightning.metrics import SegMetrics
from step_lightning.models.loss import ATMLoss


def param_groups(model: nn.Module, lr: float, weight_decay: float, head_lr_mult: float) -> list[dict]:
    """Encoder at lr, everything else (heads) at lr x head_lr_mult; no decay on norms, biases, embeddings."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = not name.startswith("encoder.")
        no_decay = p.ndim <= 1 or name.endswith(("pos_embed", "queries.weight"))
        groups.setdefault((is_head, no_decay), []).append(p)
    return [
        {"params": ps, "lr": lr * (head_lr_mult if is_head else 1.0), "weight_decay": 0.0 if no_decay else weight_decay}
        for (is_head, no_decay), ps in groups.items()
    ]


class SegmentationModule(L.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        ignore_index: int = 255,
        lr: float = 6e-5,
        weight_decay: float = 0.01,
        head_lr_mult: float = 10.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 1500,
        schedule: str = "poly",
        poly_power: float = 1.0,
        eval_mode: str = "whole",
        eval_crop: int = 512,
        eval_stride: int = 341,
        loss: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.criterion = ATMLoss(num_classes, ignore_index, **(loss or {}))
        self.val_metrics = SegMetrics(num_classes, ignore_index)
        self.val_tokens: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor):
        return self.model(images)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.model(batch["image"], batch["label"])  # labels reach only an oracle policy
        losses = self.criterion(out.outputs, batch["label"])
        bs = batch["image"].shape[0]
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items() if k != "loss"}, batch_size=bs)
        self.log("train/tokens", out.tokens.float().mean(), batch_size=bs)
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=bs)
        return losses["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images, labels = batch["image"], batch["label"]
        hp = self.hparams
        scores, outs = infer(self.model, images, tuple(labels.shape[-2:]), hp.eval_mode, hp.eval_crop, hp.eval_stride,
                             labels=labels)
        self.val_metrics.update(scores.argmax(1), labels)
        self.val_tokens.extend(out.tokens for out in outs)

    def on_validation_epoch_end(self) -> None:
        metrics = self.val_metrics.compute()
        self.val_metrics.reset()
        tokens = torch.cat(self.val_tokens).float().mean()
        self.val_tokens.clear()
        self.log("val/mIoU", metrics["mIoU"], prog_bar=True)
        self.log("val/aAcc", metrics["aAcc"])
        self.log("val/tokens", tokens, sync_dist=True)
        self.last_val = {k: v.detach().cpu() for k, v in metrics.items()} | {"tokens": float(tokens)}

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(param_groups(self.model, hp.lr, hp.weight_decay, hp.head_lr_mult), betas=hp.betas)
        total = int(self.trainer.estimated_stepping_batches)
        factor = partial(lr_factor, total_steps=total, warmup_steps=min(hp.warmup_steps, total // 2),
                         schedule=hp.schedule, power=hp.poly_power)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
