"""A map-style dataset over discovered image/label pairs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from step_lightning.core import ConfigError
from step_lightning.data.folders import Sample
from step_lightning.data.io import read_image, read_label
from step_lightning.data.transforms import EvalTransform, TrainTransform


def load_sample(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 RGB image, uint8 train-id label) at the original resolution, checked to match in size."""
    image = read_image(sample.image)
    label = sample.label_map(read_label(sample.label), sample.label)
    if image.shape[:2] != label.shape:
        raise ConfigError(
            f"{sample.image} is {image.shape[1]}x{image.shape[0]} but its label {sample.label} is "
            f"{label.shape[1]}x{label.shape[0]}; an image and its label must match pixel for pixel. "
            "Replace the pair with the original files."
        )
    return image, label


class SegDataset(Dataset):
    """Items: ``image`` float32 [3, H, W] normalised, ``label`` int64 [H, W] (255 = ignore), ``name`` str."""

    def __init__(self, samples: Sequence[Sample], transform: TrainTransform | EvalTransform, rank: int = 0):
        self.samples = list(samples)
        self.transform = transform
        self.rank = rank
        self.transform.reseed(rank)
        self._worker_seeded = False

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        worker = get_worker_info()
        if worker is not None and not self._worker_seeded:
            # Each worker holds a copy of the transform: give it its own stream, reproducible from the
            # loader's seeded generator (worker.seed) and distinct across ranks.
            self.transform.reseed(self.rank, worker.seed)
            self._worker_seeded = True
        sample = self.samples[index]
        image, label = self.transform(*load_sample(sample))
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "label": torch.from_numpy(label.astype(np.int64)),
            "name": sample.name,
        }
