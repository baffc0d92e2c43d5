"""Pictures of what a model did (paper Figs 3, 7, 8): superpatch boundaries over the image, the tokens each exit
head halted blacked out, prediction and ground truth in the dataset's palette, side by side."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from step_lightning.core import PATCH_SIZE
from step_lightning.models.base import SegmenterBase
from step_lightning.models.engine import InferenceOptions, SegmenterOutput
from step_lightning.models.inference import predict_padded
from step_lightning.tokens.layout import unshare

BOUNDARY_RGB = (255, 230, 0)


def to_uint8_image(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Normalised [3, H, W] -> uint8 [H, W, 3]."""
    mean_t = torch.tensor(mean, dtype=image.dtype, device=image.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image * std_t + mean_t).clamp(0, 255).round().byte().permute(1, 2, 0)


def per_cell(values: Tensor, layout, grid: tuple[int, int]) -> Tensor:
    """Per-token values [B, N] -> per patch cell [B, Hp, Wp] (supertokens copied to the cells they cover)."""
    if layout is not None:
        values = unshare(values, layout, dim=1)
    return values.unflatten(1, grid)


def to_pixels(cells: Tensor) -> Tensor:
    """[..., Hp, Wp] -> [..., 16 Hp, 16 Wp] (nearest)."""
    return cells.repeat_interleave(PATCH_SIZE, -2).repeat_interleave(PATCH_SIZE, -1)


def token_edges(token_id: Tensor, width: int = 1) -> Tensor:
    """bool [H, W]: pixels whose right or lower neighbour belongs to another token (shifted comparisons),
    thickened to ``width`` px so they survive the figure's downscaling of large images."""
    edges = torch.zeros_like(token_id, dtype=torch.bool)
    edges[:, :-1] |= token_id[:, :-1] != token_id[:, 1:]
    edges[:-1, :] |= token_id[:-1, :] != token_id[1:, :]
    if width > 1:
        edges = (
            F.max_pool2d(edges[None, None].float(), width, stride=1, padding=width // 2)[
                0, 0, : edges.shape[0], : edges.shape[1]
            ]
            > 0
        )
    return edges


def colourise(label: Tensor, palette: Sequence[Sequence[int]]) -> Tensor:
    """int [H, W] class ids (255 = ignore, drawn black) -> uint8 [H, W, 3]."""
    table = torch.cat((torch.tensor(palette, dtype=torch.uint8), torch.zeros(1, 3, dtype=torch.uint8)))
    return table[torch.where(label < len(palette), label, len(palette)).cpu()]


def token_maps(out: SegmenterOutput, height: int, width: int) -> tuple[Tensor, Tensor | None]:
    """Per pixel of a ``height`` x ``width`` model input: the index of the token that covered it [B, H, W]
    and the exit head that halted that token [B, H, W] (0-based, -1 = it reached the final head; None for
    a model without exits)."""
    grid = out.outputs[-1]["mask_logits"].shape[-2:]
    layout = out.extras.get("layout")
    count = out.tokens.shape[0]
    device = out.tokens.device
    slots = grid[0] * grid[1] if layout is None else layout.valid.shape[1]
    ids = per_cell(torch.arange(slots, device=device).expand(count, -1), layout, grid)
    pixel_ids = to_pixels(ids)[..., :height, :width]
    halt_head = out.extras.get("halt_head")
    halted_at = None if halt_head is None else to_pixels(per_cell(halt_head, layout, grid))[..., :height, :width]
    return pixel_ids, halted_at


def panels_for(
    model: SegmenterBase, images: Tensor, labels: Tensor | None, palette, mean, std,
    options: InferenceOptions | None = None,
) -> list[list[tuple[str, np.ndarray]]]:
    """Per image, the (title, uint8 [H, W, 3]) panels: input, superpatches, halted tokens per exit,
    prediction and, with ``labels`` (aligned with ``images``; they also feed an oracle policy), ground truth."""
    height, width = images.shape[-2:]
    scores, out = predict_padded(model, images, labels, options)
    pixel_ids, halted_at = token_maps(out, height, width)
    count = out.tokens.shape[0]
    prediction = scores.argmax(1)
    result = []
    for b in range(count):
        rgb = to_uint8_image(images[b], mean, std).cpu()
        edges = token_edges(pixel_ids[b], width=max(1, height // 256)).cpu()
        boundaries = torch.where(edges[..., None], torch.tensor(BOUNDARY_RGB, dtype=torch.uint8), rgb)
        panels = [("input", rgb), (f"superpatches: {int(out.tokens[b])} tokens", boundaries)]
        for k, layer in enumerate(model.exit_layers if halted_at is not None else ()):
            gone = ((halted_at[b] >= 0) & (halted_at[b] <= k)).cpu()
            halted = int(out.extras["halted"][b, : k + 1].sum())
            panels.append((f"exit {k + 1} (L{layer}): {halted} halted", torch.where(gone[..., None], 0, boundaries)))
        panels.append(("prediction", colourise(prediction[b], palette)))
        if labels is not None:
            panels.append(("ground truth", colourise(labels[b], palette)))
        result.append([(title, panel.numpy()) for title, panel in panels])
    return result


def render(panels: list[tuple[str, np.ndarray]], title: str = "") -> np.ndarray:
    """One row of titled panels -> uint8 RGB [H, W, 3] figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height, width = panels[0][1].shape[:2]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2 * height / width + 0.6), squeeze=False)
    for ax, (name, panel) in zip(axes[0], panels, strict=True):
        ax.imshow(panel, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


@torch.no_grad()
def render_panels(
    model, images: Tensor, labels: Tensor | None, palette, mean, std, names: Sequence[str],
    options: InferenceOptions | None = None,
) -> list[np.ndarray]:
    """Rendered figure per image (model in eval mode is the caller's business); ``labels`` None: no ground
    truth panel."""
    return [
        render(p, name)
        for p, name in zip(panels_for(model, images, labels, palette, mean, std, options), names, strict=True)
    ]


def save_png(image: np.ndarray, path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path
