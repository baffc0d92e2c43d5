"""Embedded synthetic dataset: deterministic procedural scenes with homogeneous and detailed regions.

Each scene has a sky-like gradient over a ground-like low-frequency texture (large homogeneous regions
that supertokens can merge) and several objects whose class fixes their shape, colour and texture
(regions that need fine tokens). Scene i of a split is generated from (seed, split, i) alone.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from step_lightning.core import IMAGENET_MEAN, IMAGENET_STD, ConfigError
from step_lightning.data.base import SegDataModule

SHAPES = ("disk", "box", "triangle", "ring", "diamond", "cross")
TEXTURES = ("flat", "stripes", "checker", "dots")


def class_colour(k: int, num_classes: int) -> np.ndarray:
    """Well separated hues for object classes, saturated and mid-bright."""
    hue = (k - 2) / max(num_classes - 2, 1)
    rgb = np.clip(np.abs(((hue * 6 + np.array([0.0, 4.0, 2.0])) % 6) - 3) - 1, 0, 1)
    return 60 + 170 * rgb


def smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled bilinearly."""
    coarse = torch.from_numpy(rng.uniform(-1, 1, (1, 1, cells + 1, cells + 1)).astype(np.float32))
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)[0, 0].numpy()


def shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = (yy - cy) / r, (xx - cx) / r
    if shape == "disk":
        return dy**2 + dx**2 <= 1
    if shape == "box":
        return (np.abs(dy) <= 0.8) & (np.abs(dx) <= 1)
    if shape == "triangle":
        return (dy <= 0.8) & (dy >= -1) & (np.abs(dx) <= (dy + 1) / 1.8)
    if shape == "ring":
        d = dy**2 + dx**2
        return (d <= 1) & (d >= 0.35)
    if shape == "diamond":
        return np.abs(dy) + np.abs(dx) <= 1
    return ((np.abs(dy) <= 0.3) & (np.abs(dx) <= 1)) | ((np.abs(dx) <= 0.3) & (np.abs(dy) <= 1))  # cross


def texture(name: str, yy: np.ndarray, xx: np.ndarray, period: int) -> np.ndarray:
    if name == "stripes":
        return ((xx + yy) // period) % 2
    if name == "checker":
        return ((xx // period) + (yy // period)) % 2
    if name == "dots":
        return (((yy % (2 * period)) - period) ** 2 + ((xx % (2 * period)) - period) ** 2 <= (period * 0.6) ** 2)
    return np.zeros_like(yy)


def make_scene(seed: int, size: int, num_classes: int, max_objects: int) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8 [H,W,3], label uint8 [H,W]) scene. Classes: 0 sky, 1 ground, 2.. objects."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    horizon = size * rng.uniform(0.3, 0.6) + size * 0.08 * smooth_noise(rng, 1, size, 3)[0]
    label = np.where(yy < horizon[None, :], 0, 1).astype(np.uint8)
    sky = np.stack([90 + 60 * yy / size, 140 + 50 * yy / size, 235 - 20 * yy / size], -1)
    ground = np.array([110, 85, 50]) + 35 * smooth_noise(rng, size, size, 4)[..., None]
    image = np.where(label[..., None] == 0, sky, ground)
    for _ in range(rng.integers(1, max_objects + 1)):
        k = int(rng.integers(2, num_classes))
        r = size * rng.uniform(0.08, 0.2)
        cy, cx = rng.uniform(r, size - r, 2)
        mask = shape_mask(SHAPES[(k - 2) % len(SHAPES)], yy, xx, cy, cx, r)
        pattern = texture(TEXTURES[(k - 2) // len(SHAPES) % len(TEXTURES)], yy, xx, period=4)
        colour = class_colour(k, num_classes) * (1 - 0.35 * pattern[..., None])
        image = np.where(mask[..., None], colour, image)
        label[mask] = k
    image = image + rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


class SyntheticScenes(Dataset):
    def __init__(self, seed: int, size: int, length: int, num_classes: int, max_objects: int, mean, std,
                 flip: bool):
        scenes = [make_scene(seed * 1_000_003 + i, size, num_classes, max_objects) for i in range(length)]
        images = torch.from_numpy(np.stack([s[0] for s in scenes])).permute(0, 3, 1, 2).float()
        mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        self.images = (images - mean_t) / std_t
        self.labels = torch.from_numpy(np.stack([s[1] for s in scenes])).long()
        self.flip = flip
        self.seed = seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        image, label = self.images[i], self.labels[i]
        if self.flip and torch.rand(1).item() < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        return {"image": image, "label": label, "name": f"synthetic_{self.seed}_{i:05d}"}


class SyntheticDataModule(SegDataModule):
    """Procedural scenes held in memory; train and val use disjoint seeds. ``split`` (``val`` or ``train``,
    default ``val``) is the split tools such as evaluation score."""

    SPLITS = ("train", "val")

    def __init__(
        self,
        crop_size: int = 256,
        num_classes: int = 8,
        num_train: int = 512,
        num_val: int = 64,
        max_objects: int = 5,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        batch_size: int = 8,
        val_batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        name: str = "synthetic",
        split: str | None = None,
    ):
        super().__init__(batch_size, val_batch_size, num_workers, seed)
        if split not in (None, *self.SPLITS):
            raise ConfigError(f"data.split={split} is not a split of the synthetic data; use data.split=val or train.")
        self.split = split or "val"
        if num_classes < 3:
            raise ConfigError(f"data.num_classes={num_classes}: the synthetic scenes need >= 3 (sky, ground, objects)")
        if crop_size % 16:
            raise ConfigError(f"crop_size={crop_size} must be a multiple of 16 (the ViT patch size)")
        self.name, self.crop_size, self.num_classes = name, crop_size, num_classes
        self.num_train, self.num_val, self.max_objects = num_train, num_val, max_objects
        self.mean, self.std = tuple(mean), tuple(std)
        self.class_names = ["sky", "ground"] + [
            f"{TEXTURES[(k - 2) // len(SHAPES) % len(TEXTURES)]}_{SHAPES[(k - 2) % len(SHAPES)]}_{k}"
            for k in range(2, num_classes)
        ]
        self.palette = [[128, 180, 235], [110, 85, 50]] + [
            [int(c) for c in class_colour(k, num_classes)] for k in range(2, num_classes)
        ]

    def _make(self, split_seed: int, length: int, flip: bool) -> SyntheticScenes:
        return SyntheticScenes(split_seed, self.crop_size, length, self.num_classes, self.max_objects,
                               self.mean, self.std, flip)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = self._make(2 * self.seed, self.num_train, flip=True)
        if self.val_set is None:
            self.val_set = self._make(2 * self.seed + 1, self.num_val, flip=False)

    def eval_dataset(self, split: str | None = None) -> SyntheticScenes:
        """The scenes of ``split`` (default: ``data.split``), without augmentation."""
        split = split or self.split
        if split not in self.SPLITS:
            raise ConfigError(f"data.split={split} is not a split of the synthetic data; use data.split=val or train.")
        if split == "train":
            return self._make(2 * self.seed, self.num_train, flip=False)
        self.setup("validate")
        return self.val_set
