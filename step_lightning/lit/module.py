"""LightningModule training and evaluating a segmenter with the ATM loss.

The module builds its segmenter from a ``ModelSpec`` dict kept in its hyper-parameters, so a checkpoint
rebuilds the model by itself (``SegmentationModule.load_from_checkpoint(path)``): the spec saved there no
longer names the pretrained backbone or the ``init_from`` run, whose weights are already in the checkpoint
(the policy network's too). The ``dataset`` hyper-parameter keeps what predicting on new images needs: class
names, palette, normalisation and the evaluation protocol's resize (``SegDataModule.metadata``).
"""

from __future__ import annotations

from functools import partial

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from step_lightning.config.model import model_spec, policy_network
from step_lightning.core import ConfigError
from step_lightning.lit.schedules import lr_factor
from step_lightning.metrics import ExitStats, SegMetrics, TokenStats
from step_lightning.models.checkpoint import load_weights
from step_lightning.models.engine import InferenceOptions
from step_lightning.models.factory import ModelSpec, build_model
from step_lightning.models.inference import infer
from step_lightning.models.loss import ATMLoss
from step_lightning.tokens.layout import identity_layout
from step_lightning.tokens.policy import PolicyNet


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, head_lr_mult: float, rule: str = "timm"
) -> list[dict]:
    """AdamW groups: the encoder at ``lr``, everything else (the heads) at ``lr x head_lr_mult``.

    rule ``timm``: no decay on 1-d tensors (norms, biases), the position embedding and the class queries.
    rule ``segvit``: mmcv's ``custom_keys`` of SegViT's configs, first match wins in the order head, norm: every
    head tensor (norms, biases and queries included) at x head_lr_mult **with** decay; backbone norms without
    decay; backbone biases and the position embedding with decay.
    """
    if rule not in ("timm", "segvit"):
        raise ConfigError(f"optim.param_groups={rule} must be 'timm' or 'segvit'.")
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = not name.startswith("encoder.")
        if rule == "segvit":
            no_decay = not is_head and ".norm" in name
        else:
            no_decay = p.ndim <= 1 or name.endswith(("pos_embed", "queries.weight"))
        groups.setdefault((is_head, no_decay), []).append(p)
    return [
        {"params": ps, "lr": lr * (head_lr_mult if is_head else 1.0), "weight_decay": 0.0 if no_decay else weight_decay}
        for (is_head, no_decay), ps in groups.items()
    ]


class SegmentationModule(L.LightningModule):
    def __init__(
        self,
        model: dict,
        lr: float = 6e-5,
        weight_decay: float = 0.01,
        head_lr_mult: float = 10.0,
        param_groups: str = "timm",
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 1500,
        schedule: str = "poly",
        poly_power: float = 1.0,
        eval_mode: str = "whole",
        eval_crop: int = 512,
        eval_stride: int = 341,
        loss: dict | None = None,
        init_from: str | None = None,
        init_from_min_fraction: float = 0.5,
        dataset: dict | None = None,
        policy: PolicyNet | None = None,
    ):
        """``model``: a ``ModelSpec`` as a dict; ``dataset``: the datamodule's ``metadata()``; ``policy``: the
        trained network of a dCTS/CTS tokenizer (built untrained when absent: a checkpoint's state dict then
        fills it); ``init_from``: a checkpoint whose matching tensors (at least ``init_from_min_fraction`` of
        the model's, the policy network's left out) start the model."""
        super().__init__()
        self.save_hyperparameters(ignore=["policy"])
        spec = ModelSpec(**model)
        self.model = build_model(spec, policy)
        if init_from:
            loaded = load_weights(self.model, init_from, strict=False, min_fraction=init_from_min_fraction,
                                  key="init_from")
            print(f"init_from: loaded {loaded.tensors}/{loaded.total} tensors from {init_from}")
        self.criterion = ATMLoss(spec.num_classes, spec.ignore_index, **(loss or {}))
        self.val_metrics = SegMetrics(spec.num_classes, spec.ignore_index)
        self.token_stats = TokenStats()
        self.exit_stats = ExitStats()
        self.last_val: dict = {}
        self.inference = InferenceOptions()  # how validation forwards run (eval sets the command's options)

    @classmethod
    def from_config(
        cls, cfg: DictConfig, num_classes: int, ignore_index: int, resuming: bool = False, dataset: dict | None = None
    ):
        """The module a training config describes. ``resuming``: a ``policy=train`` run continues from a
        checkpoint that holds the trained policy's weights, so the policy network starts untrained.
        ``dataset``: the datamodule's ``metadata()``, saved with the checkpoint."""
        spec = model_spec(cfg, num_classes, ignore_index)
        policy = None if resuming and cfg.get("policy") == "train" else policy_network(cfg, spec)
        return cls(
            spec.to_dict(),
            lr=cfg.optim.lr,
            weight_decay=cfg.optim.weight_decay,
            head_lr_mult=cfg.optim.head_lr_mult,
            param_groups=cfg.optim.param_groups,
            betas=tuple(cfg.optim.betas),
            warmup_steps=cfg.optim.warmup_steps,
            schedule=cfg.optim.schedule,
            poly_power=cfg.optim.poly_power,
            eval_mode=cfg.eval.mode,
            eval_crop=cfg.eval.crop,
            eval_stride=cfg.eval.stride,
            loss=OmegaConf.to_container(cfg.loss),
            init_from=cfg.get("init_from"),
            init_from_min_fraction=cfg.get("init_from_min_fraction", 0.5),
            dataset=dataset,
            policy=policy,
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The weights of the pretrained backbone and of init_from are in the state dict: rebuilding must not
        # read those files again.
        hparams = checkpoint["hyper_parameters"]
        hparams["model"] = {**hparams["model"], "pretrained": None, "pretrained_file": None}
        hparams["init_from"] = None

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
                             labels=labels, options=self.inference)
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
        per_image = {  # token counts of every forward, for the GFLOPs of the whole validation set
            "tokens": self.token_stats.per_image_tokens(),
            "active_after": self.exit_stats.per_image_active() if exit_stats is not None else None,
        }
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
        self.last_val |= {"token_stats": token_stats, "exit_stats": exit_stats, "per_image": per_image}

    def configure_optimizers(self):
        hp = self.hparams
        groups = param_groups(self.model, hp.lr, hp.weight_decay, hp.head_lr_mult, hp.param_groups)
        optimizer = torch.optim.AdamW(groups, betas=hp.betas)
        total = int(self.trainer.estimated_stepping_batches)
        factor = partial(lr_factor, total_steps=total, warmup_steps=min(hp.warmup_steps, total // 2),
                         schedule=hp.schedule, power=hp.poly_power)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
