"""LightningModule training and evaluating a segmenter with the ATM loss."""

from __future__ import annotations

from functools import partial

import lightning as L
import torch
from torch import nn

from step_lightning.inference import infer
from step_lightning.lit.schedules import lr_factor
from step_lightning.metrics import SegMetrics
from step_lightning.models.early_exit import ExitStats
from step_lightning.models.loss import ATMLoss
from step_lightning.tokens.layout import identity_layout
from step_lightning.tokens.stats import TokenStats


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


def load_weights(model: nn.Module, path: str) -> None:
    """Start from another run's weights, e.g. a no-exit model fine-tuned with halting (DToP's phase 2).
    Tensors whose name and shape match are copied; the rest (new exit heads) keep their initialisation."""
    from pathlib import Path

    from step_lightning.core import ConfigError

    if not Path(path).is_file():
        raise ConfigError(f"init_from={path} does not exist; give a checkpoint of a previous run (e.g. last.ckpt).")
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = {k.removeprefix("model."): v for k, v in state.get("state_dict", state).items()}
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise ConfigError(f"init_from={path} shares no weights with this model; is it a step-lightning checkpoint?")
    model.load_state_dict(matched, strict=False)
    print(f"init_from: loaded {len(matched)}/{len(own)} tensors from {path}")


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
        init_from: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        if init_from:
            load_weights(model, init_from)
        self.criterion = ATMLoss(num_classes, ignore_index, **(loss or {}))
        self.val_metrics = SegMetrics(num_classes, ignore_index)
        self.token_stats = TokenStats()
        self.exit_stats = ExitStats()
        self.last_val: dict = {}

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
        for out in outs:
            self.update_token_stats(out)

    def update_token_stats(self, out) -> None:
        layout = out.extras.get("layout")
        if layout is None:  # plain patches: every cell is a token
            grid = out.outputs[-1]["mask_logits"].shape[-2:]
            layout = identity_layout(out.tokens.shape[0], *grid, device=out.tokens.device)
        self.token_stats.update(layout)
        if "halted" in out.extras:
            self.exit_stats.update(out.extras["halted"], out.tokens)

    def on_validation_epoch_end(self) -> None:
        metrics = self.val_metrics.compute()
        token_stats = self.token_stats.compute()
        exit_stats = self.exit_stats.compute() if self.exit_stats.update_called else None
        for metric in (self.val_metrics, self.token_stats, self.exit_stats):
            metric.reset()
        self.log("val/mIoU", metrics["mIoU"], prog_bar=True)
        self.log("val/aAcc", metrics["aAcc"])
        self.log("val/tokens", token_stats["total"]["mean"], prog_bar=True)
        self.log("val/token_reduction", token_stats["reduction"])
        if exit_stats is not None:
            self.log("val/halted_fraction", exit_stats["halted_fraction"], prog_bar=True)
            for i, head in enumerate(exit_stats["per_head"]):
                self.log(f"val/halted_head{i + 1}", head["halted_mean"])
        self.last_val = {k: v.detach().cpu() for k, v in metrics.items()}
        self.last_val |= {"token_stats": token_stats, "exit_stats": exit_stats}

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(param_groups(self.model, hp.lr, hp.weight_decay, hp.head_lr_mult), betas=hp.betas)
        total = int(self.trainer.estimated_stepping_batches)
        factor = partial(lr_factor, total_steps=total, warmup_steps=min(hp.warmup_steps, total // 2),
                         schedule=hp.schedule, power=hp.poly_power)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
