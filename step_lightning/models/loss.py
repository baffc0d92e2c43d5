"""SegViT's ATM loss with the fixed query-to-class assignment (query c is class c, no matching)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss


def present_classes(labels: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """[B, K] bool: class c occurs among the non-ignored pixels of image b."""
    b = labels.shape[0]
    flat = labels.flatten(1)
    flat = torch.where(flat == ignore_index, num_classes, flat)
    offsets = torch.arange(b, device=labels.device)[:, None] * (num_classes + 1)
    counts = torch.bincount((flat + offsets).flatten(), minlength=b * (num_classes + 1))
    return counts.reshape(b, num_classes + 1)[:, :num_classes] > 0


def global_mean_count(count: torch.Tensor) -> torch.Tensor:
    """Number of masks per rank averaged over ranks (DDP averages gradients), at least 1."""
    if dist.is_available() and dist.is_initialized():
        count = count.clone()
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count.clamp(min=1)


class ATMLoss(nn.Module):
    """CE on query presence + (focal x20 + dice x1) on the masks of present classes, per output, summed.

    Ignore pixels (255) are excluded from the mask losses (the SegViT code counted them as negatives;
    excluding them keeps the loss from punishing predictions on unlabelled pixels).
    Each output is ``{"class_logits": [B,K,K+1] or [B,K,2], "mask_logits": [B,K,Hp,Wp]}``.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        no_object_weight: float = 0.1,
        class_weight: float = 1.0,
        focal_weight: float = 20.0,
        dice_weight: float = 1.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.no_object_weight = no_object_weight
        self.class_weight = class_weight
        self.focal_weight = focal_weight
        self.dice_weight = dice_weight
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def class_loss(self, class_logits: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        k = self.num_classes
        ways = class_logits.shape[-1]
        weight = class_logits.new_ones(ways)
        weight[-1] = self.no_object_weight
        if ways == 2:  # DToP exit heads: present vs no object
            target = (~present).long()
        else:
            own = torch.arange(k, device=present.device).expand_as(present)
            target = torch.where(present, own, k)
        return F.cross_entropy(class_logits.flatten(0, 1), target.flatten(), weight=weight)

    def mask_losses(
        self, mask_logits: torch.Tensor, labels: torch.Tensor, pairs: torch.Tensor, num_masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        img, cls = pairs.unbind(1)
        pred = F.interpolate(mask_logits[img, cls][:, None], size=labels.shape[-2:], mode="bilinear",
                             align_corners=False)[:, 0]
        pair_labels = labels[img]
        valid = (pair_labels != self.ignore_index).float()
        target = (pair_labels == cls[:, None, None]).float()
        focal = sigmoid_focal_loss(pred, target, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none")
        focal = ((focal * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp(min=1)).sum() / num_masks
        prob = pred.sigmoid() * valid
        dice = 1 - (2 * (prob * target).flatten(1).sum(1) + 1) / (prob.flatten(1).sum(1) + target.flatten(1).sum(1) + 1)
        return focal, dice.sum() / num_masks

    def forward(self, outputs: list[dict[str, torch.Tensor]], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        # fp32 under mixed precision: focal and dice on upsampled bf16 logits lose the small terms.
        with torch.autocast(labels.device.type, enabled=False):
            return self._losses(outputs, labels)

    def _losses(self, outputs: list[dict[str, torch.Tensor]], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = [{k: v.float() for k, v in out.items()} for out in outputs]
        present = present_classes(labels, self.num_classes, self.ignore_index)
        pairs = present.nonzero()  # the loss is off the inference path, so this sync is acceptable
        num_masks = global_mean_count(present.sum().float())
        totals = {"loss_ce": 0.0, "loss_focal": 0.0, "loss_dice": 0.0}
        for out in outputs:
            focal, dice = self.mask_losses(out["mask_logits"], labels, pairs, num_masks)
            totals["loss_ce"] = totals["loss_ce"] + self.class_weight * self.class_loss(out["class_logits"], present)
            totals["loss_focal"] = totals["loss_focal"] + self.focal_weight * focal
            totals["loss_dice"] = totals["loss_dice"] + self.dice_weight * dice
        totals["loss"] = totals["loss_ce"] + totals["loss_focal"] + totals["loss_dice"]
        return totals
