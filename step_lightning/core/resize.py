"""Label maps resized like labels: nearest neighbour, never interpolated between class ids."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_labels(labels: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """int [..., H, W] -> int64 [..., *size] by nearest neighbour (a no-op when the size already matches)."""
    size = tuple(int(s) for s in size)
    if tuple(labels.shape[-2:]) == size:
        return labels
    lead = labels.shape[:-2]
    flat = labels.reshape(-1, 1, *labels.shape[-2:]).float()
    return F.interpolate(flat, size=size, mode="nearest").long().reshape(*lead, *size)
