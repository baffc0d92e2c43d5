"""Model inputs for the measurement commands: crops of a dataset split with aligned labels."""

from __future__ import annotations

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from step_lightning.config.model import tokenizer_kind
from step_lightning.core import ConfigError
from step_lightning.core.resize import resize_labels
from step_lightning.data.io import read_image, read_label
from step_lightning.data.synthetic import make_scene
from step_lightning.models.inference import window_starts


def crop_boxes(height: int, width: int, size: int, mode: str) -> list[tuple[int, int]]:
    if mode == "center":
        return [((height - size) // 2, (width - size) // 2)]
    if mode == "tiles":
        return [(y, x) for y in window_starts(height, size, size) for x in window_starts(width, size, size)]
    raise ConfigError(f"crop={mode} must be 'center' or 'tiles'.")


def short_side(image: torch.Tensor, size: int) -> torch.Tensor:
    """[3, H, W] resized bilinearly (keep ratio) so its short side is ``size`` (whatever the dataset's protocol)."""
    height, width = image.shape[1:]
    factor = size / min(height, width)
    target = (int(height * factor + 0.5), int(width * factor + 0.5))
    if target == (height, width):
        return image
    return F.interpolate(image[None], size=target, mode="bilinear", align_corners=False)[0]


def sample_crops(cfg: DictConfig) -> tuple[torch.Tensor, torch.Tensor, list[str], object]:
    """Images [N, 3, R, R], aligned labels [N, R, R], crop names and the datamodule (palette, classes)."""
    datamodule = hydra.utils.instantiate(cfg.data)
    dataset = datamodule.eval_dataset(cfg.data.get("split"))
    size, limit = cfg.resolution, cfg.get("num_images")
    images, labels, names = [], [], []
    for index in range(len(dataset)):
        sample = dataset[index]
        image = short_side(sample["image"], size)
        label = resize_labels(sample["label"], image.shape[1:])
        height, width = image.shape[1:]
        for y, x in crop_boxes(height, width, size, cfg.crop):
            images.append(image[:, y : y + size, x : x + size])
            labels.append(label[y : y + size, x : x + size])
            names.append(f"{sample.get('name', index)}@{y},{x}")
            if limit is not None and len(images) == limit:
                return torch.stack(images), torch.stack(labels), names, datamodule
    if not images:
        raise ConfigError(f"data.split of {cfg.data.name} holds no images; check data.root and data.split.")
    return torch.stack(images), torch.stack(labels), names, datamodule


def flops_input(cfg: DictConfig, tokenizer: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The image (and, for an oracle policy, its label map) to count on, at resolution x resolution.

    Plain patches cost the same on any image, so a random one does; with supertokens the count depends on
    the content: ``image=<file>`` (and ``label=<file>`` for the oracle) or, by default, a synthetic scene.
    ``tokenizer``: the model's (default: the one ``cfg`` describes).
    """
    size = (cfg.resolution, cfg.resolution)
    if (tokenizer or tokenizer_kind(cfg)) == "patch":
        return torch.randn(1, 3, *size), None
    if cfg.get("image"):
        pixels = torch.from_numpy(read_image(cfg.image)).permute(2, 0, 1)[None].float()
        label = None
        if cfg.get("label"):
            label = resize_labels(torch.from_numpy(read_label(cfg.label).astype(np.int64))[None], size)
        pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)
    else:
        scene, scene_label = make_scene(cfg.seed, cfg.resolution, 8, 5)
        pixels = torch.from_numpy(scene).permute(2, 0, 1)[None].float()
        label = torch.from_numpy(scene_label.astype(np.int64))[None]
    mean = torch.tensor(list(cfg.backbone.mean)).view(1, 3, 1, 1)
    std = torch.tensor(list(cfg.backbone.std)).view(1, 3, 1, 1)
    return (pixels - mean) / std, label
