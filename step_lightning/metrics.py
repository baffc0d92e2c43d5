"""Dataset-level segmentation metrics (mmseg definition) on top of torchmetrics' confusion matrix."""

from __future__ import annotations

import torch
from torchmetrics.classification import MulticlassConfusionMatrix


class SegMetrics(MulticlassConfusionMatrix):
    """Accumulates the confusion matrix over a dataset (synced under DDP by torchmetrics).

    mIoU = mean over classes with a non-empty union of I_c / U_c (nanmean, as mmseg), ignore pixels
    excluded; aAcc = correct / labelled pixels. torchmetrics' MulticlassJaccardIndex (1.9) skips such classes in
    its macro average too but reports them as IoU 0 per class; this wrapper gives NaN there, and aAcc.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        super().__init__(num_classes=num_classes, ignore_index=ignore_index, normalize="none", validate_args=False)

    def compute(self) -> dict[str, torch.Tensor]:
        cm = self.confmat.double()  # rows: target, cols: prediction
        intersection = cm.diagonal()
        union = cm.sum(0) + cm.sum(1) - intersection
        iou = torch.where(union > 0, intersection / union.clamp(min=1), torch.full_like(union, float("nan")))
        return {
            "mIoU": 100 * iou.nanmean(),
            "aAcc": 100 * intersection.sum() / cm.sum().clamp(min=1),
            "IoU": 100 * iou,
        }
