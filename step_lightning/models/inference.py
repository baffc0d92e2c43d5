"""Whole-image and sliding-window inference returning class scores at a requested output size."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from step_lightning.core import PATCH_SIZE
from step_lightning.core.resize import resize_labels
from step_lightning.models.engine import InferenceOptions


def pad_to_patch_multiple(images: torch.Tensor) -> torch.Tensor:
    h, w = images.shape[-2:]
    return F.pad(images, (0, -w % PATCH_SIZE, 0, -h % PATCH_SIZE))


def predict_padded(model, images: torch.Tensor, labels: torch.Tensor | None = None,
                   options: InferenceOptions | None = None):
    """Scores [B, K, H, W] for any H, W (zero-pad to a multiple of 16, 0 = the normalised mean, crop back)
    and the model's forward output. ``labels`` (aligned with ``images``) are for the oracle policy only;
    they are padded with ignore."""
    h, w = images.shape[-2:]
    if labels is not None:
        labels = F.pad(labels, (0, -w % PATCH_SIZE, 0, -h % PATCH_SIZE), value=255)
    scores, out = model.predict(pad_to_patch_multiple(images), labels, options)
    return scores[..., :h, :w], out


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """mmseg's window grid along one axis; the last window is clamped to the image."""
    count = max(size - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride, size - crop), 0) for i in range(count)})


@torch.no_grad()
def slide_inference(
    model, images: torch.Tensor, crop: int, stride: int, labels: torch.Tensor | None = None, batch_windows: int = 8,
    options: InferenceOptions | None = None,
):
    """Average the scores of square crop x crop windows (mmseg 'slide'); windows run in batches.
    Returns the scores and the model outputs of every window batch."""
    if stride <= 0 or stride > crop:
        raise ValueError(f"slide stride {stride} must be in 1..crop ({crop})")
    b, _, h, w = images.shape
    boxes = [(y, x) for y in window_starts(h, crop, stride) for x in window_starts(w, crop, stride)]
    scores = counts = None
    outs = []
    for i in range(0, len(boxes), batch_windows):
        chunk = boxes[i : i + batch_windows]
        crops = torch.cat([images[..., y : y + crop, x : x + crop] for y, x in chunk])
        label_crops = None if labels is None else torch.cat([labels[..., y : y + crop, x : x + crop] for y, x in chunk])
        out, model_out = predict_padded(model, crops, label_crops, options)
        outs.append(model_out)
        out = out.unflatten(0, (len(chunk), b))
        if scores is None:
            scores = images.new_zeros(b, out.shape[2], h, w)
            counts = images.new_zeros(1, 1, h, w)
        for (y, x), window_scores in zip(chunk, out, strict=True):
            wh, ww = window_scores.shape[-2:]
            scores[..., y : y + wh, x : x + ww] += window_scores
            counts[..., y : y + wh, x : x + ww] += 1
    return scores / counts, outs


@torch.no_grad()
def infer(
    model,
    images: torch.Tensor,
    out_size: tuple[int, int],
    mode: str = "whole",
    crop: int = 512,
    stride: int = 341,
    labels: torch.Tensor | None = None,
    options: InferenceOptions | None = None,
):
    """Class scores [B, K, *out_size], resized bilinearly to the label's resolution, and the list of model
    outputs of the forwards that produced them (one per window batch in 'slide' mode).
    ``labels`` feed the oracle policy only; they are resized (nearest) to the image if needed; ``options``:
    how the forwards run."""
    if labels is not None:
        labels = resize_labels(labels, images.shape[-2:])
    if mode == "whole":
        scores, out = predict_padded(model, images, labels, options)
        outs = [out]
    elif mode == "slide":
        scores, outs = slide_inference(model, images, crop, stride, labels, options=options)
    else:
        raise ValueError(f"unknown inference mode '{mode}': use 'whole' or 'slide'")
    if tuple(scores.shape[-2:]) != tuple(out_size):
        scores = F.interpolate(scores, size=out_size, mode="bilinear", align_corners=False)
    return scores, outs
