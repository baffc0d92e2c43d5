"""SegViT's ATM loss with the fixed query-to-class assignment (query c is class c, no matching).

The mask losses are taken on logits upsampled to the label resolution (SegViT's recipe): at 1024 x 1024 that is
a million pixels per (image, present class) pair and output, the largest cost of a training step that does not
shrink with the tokens. ``UpsampledMaskTerms`` computes them without keeping any full-resolution tensor for the
backward and upsamples with two matrix products instead of ``F.interpolate``, whose CUDA backward scatters
with atomics (slow at a 16x factor, and nondeterministic)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


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


def bilinear_matrix(out_size: int, in_size: int, device: torch.device) -> torch.Tensor:
    """[out_size, in_size] fp32: ``F.interpolate(mode="bilinear", align_corners=False)`` along one axis, its
    source positions and weights computed in fp32 as its kernels do."""
    src = ((torch.arange(out_size, dtype=torch.float32, device=device) + 0.5) * (in_size / out_size) - 0.5)
    src = src.clamp(min=0)
    low = src.floor().long()
    high = (low + 1).clamp(max=in_size - 1)
    frac = src - low
    rows = torch.arange(out_size, device=device)
    matrix = torch.zeros(out_size, in_size, device=device)
    matrix.index_put_((rows, low), 1 - frac, accumulate=True)
    matrix.index_put_((rows, high), frac, accumulate=True)
    return matrix


def _upsample(logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return rows @ logits @ cols.T  # [P, h, w] -> [P, H, W]


class UpsampledMaskTerms(torch.autograd.Function):
    """Per output and pair: the focal loss summed over valid pixels, and dice's sum(p * t) and sum(p), of mask
    logits [O, P, h, w] upsampled bilinearly to the labels' [H, W] (``target`` / ``valid`` [P, H, W] bool).

    Hand-written because autograd would keep about ten [P, H, W] fp32 tensors per output (focal, sigmoid, dice
    terms, the upsampled logits) and run an unfused kernel for each: the backward recomputes the upsampled
    logits from the small ones and applies the closed-form gradient (focal with z = x for negatives, -x for
    positives: alpha_t * softplus(z) * sigmoid(z)^gamma, as torchvision's ``sigmoid_focal_loss``). Outputs run
    one after another, so the transient memory is that of one output."""

    @staticmethod
    def forward(ctx, logits, target, valid, alpha: float, gamma: float):
        rows = bilinear_matrix(target.shape[1], logits.shape[2], logits.device)
        cols = bilinear_matrix(target.shape[2], logits.shape[3], logits.device)
        weight = _focal_weight(target, valid, alpha)
        focal, intersection, prob_sum = [], [], []
        for pair_logits in logits:
            x = _upsample(pair_logits, rows, cols)
            z = torch.where(target, -x, x)
            focal.append(F.softplus(z).mul_(torch.sigmoid(z).pow_(gamma)).mul_(weight).sum((1, 2)))
            prob = x.sigmoid_().mul_(valid)
            prob_sum.append(prob.sum((1, 2)))
            intersection.append(prob.mul_(target).sum((1, 2)))
        ctx.save_for_backward(logits, target, valid, rows, cols)
        ctx.alpha, ctx.gamma = alpha, gamma
        return torch.stack(focal), torch.stack(intersection), torch.stack(prob_sum)

    @staticmethod
    def backward(ctx, grad_focal, grad_intersection, grad_prob_sum):
        logits, target, valid, rows, cols = ctx.saved_tensors
        # fp32 like the forward, also when backward() is called inside an autocast block
        with torch.autocast(logits.device.type, enabled=False):
            grads = _mask_term_grads(logits, target, valid, rows, cols, ctx.alpha, ctx.gamma, grad_focal,
                                     grad_intersection, grad_prob_sum)
        return grads, None, None, None, None


def _mask_term_grads(logits, target, valid, rows, cols, alpha, gamma, grad_focal, grad_intersection, grad_prob_sum):
    """``UpsampledMaskTerms``' gradient for ``logits`` [O, P, h, w], the upsampled logits recomputed per output."""
    weight = _focal_weight(target, valid, alpha)
    grads = []
    for o, pair_logits in enumerate(logits):
        x = _upsample(pair_logits, rows, cols)
        z = torch.where(target, -x, x)
        del x
        sig_z = torch.sigmoid(z)
        # d/dz [softplus(z) sigmoid(z)^gamma] = sigmoid(z)^gamma (sigmoid(z) + gamma softplus(z) (1 - sigmoid(z)))
        focal_dz = F.softplus(z).mul_(gamma).mul_(1 - sig_z).add_(sig_z).mul_(sig_z.pow(gamma)).mul_(weight)
        focal_dz.mul_(grad_focal[o][:, None, None])
        # p = sigmoid(x) on valid pixels: dp/dx = p (1 - p) = sigmoid(z) (1 - sigmoid(z))
        per_pixel = grad_prob_sum[o][:, None, None] + grad_intersection[o][:, None, None] * target
        dice_dx = (1 - sig_z).mul_(sig_z).mul_(per_pixel).mul_(valid)
        grads.append(rows.T @ torch.where(target, -focal_dz, focal_dz).add_(dice_dx) @ cols)
    return torch.stack(grads)


def _focal_weight(target: torch.Tensor, valid: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha for positives, 1 - alpha for negatives (1 when alpha < 0, as torchvision), 0 on ignored pixels."""
    if alpha < 0:
        return valid.float()
    return torch.where(valid, torch.where(target, alpha, 1 - alpha), 0.0)


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
        self, mask_logits: list[torch.Tensor], labels: torch.Tensor, pairs: torch.Tensor, num_masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Focal and dice terms [O] of each output's mask logits [B, K, h, w], over the (image, class) ``pairs``."""
        img, cls = pairs.unbind(1)
        small = labels.to(torch.int16 if max(self.num_classes, self.ignore_index) < 2**15 else torch.int32)
        pair_labels = small.index_select(0, img)
        target = pair_labels == cls[:, None, None].to(small.dtype)
        valid = pair_labels != self.ignore_index
        logits = torch.stack([m[img, cls] for m in mask_logits])  # [O, P, h, w]
        focal_sum, intersection, prob_sum = UpsampledMaskTerms.apply(logits, target, valid, self.focal_alpha,
                                                                     self.focal_gamma)
        pixels = valid.flatten(1).sum(1).clamp(min=1)
        focal = (focal_sum / pixels).sum(1) / num_masks
        dice = 1 - (2 * intersection + 1) / (prob_sum + target.flatten(1).sum(1) + 1)
        return focal, dice.sum(1) / num_masks

    def forward(self, outputs: list[dict[str, torch.Tensor]], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        # fp32 under mixed precision: focal and dice on upsampled bf16 logits lose the small terms.
        with torch.autocast(labels.device.type, enabled=False):
            return self._losses(outputs, labels)

    def _losses(self, outputs: list[dict[str, torch.Tensor]], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = [{k: v.float() for k, v in out.items()} for out in outputs]
        present = present_classes(labels, self.num_classes, self.ignore_index)
        pairs = present.nonzero()  # the loss is off the inference path, so this sync is acceptable
        num_masks = global_mean_count(present.sum().float())
        focal, dice = self.mask_losses([out["mask_logits"] for out in outputs], labels, pairs, num_masks)
        ce = torch.stack([self.class_loss(out["class_logits"], present) for out in outputs])
        totals = {"loss_ce": self.class_weight * ce.sum(), "loss_focal": self.focal_weight * focal.sum(),
                  "loss_dice": self.dice_weight * dice.sum()}
        totals["loss"] = totals["loss_ce"] + totals["loss_focal"] + totals["loss_dice"]
        return totals
