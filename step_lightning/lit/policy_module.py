"""Training the dCTS policy network on a segmentation datamodule's batches.

``PolicyModule`` learns one homogeneity logit per window and size from ``homogeneity_targets``:
BCE per window size, windows marked 255 excluded (``exclude_border``: CTS's border rule), sizes summed.
Random horizontal flip is the datamodule's job. Validation logs per-size precision / recall (at p > 0.5) and
AUROC, plus the loss (``val/loss``, a good checkpoint monitor). ``step_lightning.models.checkpoint.load_policy``
returns the frozen PolicyNet of a checkpoint of this module, ready for the segmenter.

Defaults follow CTS's policy training (AdamW, lr 5e-5, weight decay 1e-3); ``schedule`` cosine or constant (CTS).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAUROC, BinaryPrecision, BinaryRecall

from step_lightning.core import IGNORE_INDEX
from step_lightning.core.resize import resize_labels
from step_lightning.lit.schedules import lr_factor
from step_lightning.tokens.policy import PolicyNet, homogeneity_targets
from step_lightning.tokens.tau import WINDOW_SIZES

EXCLUDED = 255  # target value of windows left out of loss and metrics


def policy_losses(logits: dict[int, Tensor], targets: dict[int, Tensor]) -> dict[str, Tensor]:
    """{"loss_s": mean BCE over the non-excluded windows of size s} and their sum as "loss".

    A size with no usable window in the batch contributes 0 (the mean's denominator is clamped,
    which avoids a host sync to test for emptiness).
    """
    out = {}
    for s, logit in logits.items():
        target = targets[s]
        keep = (target != EXCLUDED).float()
        bce = F.binary_cross_entropy_with_logits(logit, target.clamp(max=1), reduction="none")
        out[f"loss_{s}"] = (bce * keep).sum() / keep.sum().clamp(min=1)
    out["loss"] = torch.stack(list(out.values())).sum()
    return out


def align_to_patches(images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Validation batches carry labels at the original resolution and images whose sides need not be
    multiples of 16: resize labels to the image (nearest), then crop both to whole 16-px patches."""
    h, w = images.shape[-2:]
    labels = resize_labels(labels, (h, w))
    h16, w16 = h - h % 16, w - w % 16
    return images[..., :h16, :w16], labels[..., :h16, :w16]


class PolicyModule(L.LightningModule):
    def __init__(
        self,
        pretrained: bool = True,
        sizes: Sequence[int] = WINDOW_SIZES,
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
        ignore_index: int = IGNORE_INDEX,
        lr: float = 5e-5,
        weight_decay: float = 1e-3,
        warmup_steps: int = 0,
        neck_dim: int = 128,
        hidden_dim: int = 64,
        head: str = "mlp",
        schedule: str = "cosine",
        exclude_border: bool = True,
    ):
        """``mean``/``std``: the datamodule's image normalisation (0-255 scale), so the policy can
        undo it; the segmenter must feed images normalised the same way. ``exclude_border``: windows of one
        class plus ignore on the border are left out (``homogeneity_targets``)."""
        super().__init__()
        self.save_hyperparameters()
        self.sizes = tuple(sizes)
        self.policy = PolicyNet(pretrained, self.sizes, mean, std, neck_dim, hidden_dim, head)
        self.val_metrics = nn.ModuleDict(
            {
                str(s): MetricCollection(
                    {
                        "precision": BinaryPrecision(ignore_index=EXCLUDED),
                        "recall": BinaryRecall(ignore_index=EXCLUDED),
                        # Binned AUROC keeps memory constant over the validation set.
                        "auroc": BinaryAUROC(thresholds=200, ignore_index=EXCLUDED),
                    },
                    prefix="val/",
                    postfix=f"_{s}",
                )
                for s in self.sizes
            }
        )

    def forward(self, images: Tensor) -> dict[int, Tensor]:
        return self.policy(images)

    def _step(self, images: Tensor, labels: Tensor) -> tuple[dict[int, Tensor], dict[int, Tensor], dict[str, Tensor]]:
        grid = (images.shape[-2] // 16, images.shape[-1] // 16)
        targets = homogeneity_targets(labels, grid, self.sizes, self.hparams.ignore_index, self.hparams.exclude_border)
        logits = self.policy.forward_logits(images)
        return logits, targets, policy_losses(logits, targets)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        _, _, losses = self._step(batch["image"], batch["label"])
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=batch["image"].shape[0])
        return losses["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images, labels = align_to_patches(batch["image"], batch["label"])
        logits, targets, losses = self._step(images, labels)
        bs = images.shape[0]
        self.log("val/loss", losses["loss"], batch_size=bs, sync_dist=True)
        for s in self.sizes:
            if targets[s].numel() == 0:  # no whole window of this size fits the image (a shape, no sync)
                continue
            metrics = self.val_metrics[str(s)]
            metrics.update(logits[s].sigmoid().flatten(), targets[s].flatten().long())
            self.log_dict(metrics, batch_size=bs)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.policy.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        factor = partial(lr_factor, total_steps=total, warmup_steps=min(hp.warmup_steps, total // 2),
                         schedule=hp.schedule)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
