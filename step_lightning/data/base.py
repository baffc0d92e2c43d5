"""Shared LightningDataModule behaviour: global batch size, loaders, dataset metadata."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from step_lightning.core import IGNORE_INDEX, ConfigError
from step_lightning.data.transforms import protocol_scale


def per_device_batch_size(global_batch_size: int, world_size: int) -> int:
    if global_batch_size % world_size:
        raise ConfigError(
            f"data.batch_size={global_batch_size} is the global batch and must be divisible by the "
            f"{world_size} devices in use; pick a multiple of {world_size}."
        )
    return global_batch_size // world_size


class SegDataModule(L.LightningDataModule):
    """Base for every segmentation datamodule.

    Batches are dicts: ``image`` float [B, 3, H, W] (normalised), ``label`` int64 [B, H, W] with
    255 = ignore. Validation/test labels may be at the original image resolution while the image is
    resized for the model; the evaluation code resizes logits back to the label size.
    ``batch_size`` is the global batch: each device loads ``batch_size / world_size``.
    """

    name: str
    num_classes: int
    crop_size: int
    mean: Sequence[float]  # image normalisation on the 0..255 scale
    std: Sequence[float]
    class_names: Sequence[str]
    palette: Sequence[Sequence[int]]
    ignore_index: int = IGNORE_INDEX
    eval_scale: tuple[int, int] | None = None  # the test resize's (long, short) scale; None: (2048, crop_size)

    def __init__(self, batch_size: int = 8, val_batch_size: int = 1, num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def metadata(self) -> dict:
        """What a model trained on this dataset needs to segment new images, kept in its checkpoint: class
        names, palette, normalisation, ignore index and ``eval_scale``, the (long, short) scale of the evaluation
        protocol's keep-ratio resize (``EvalTransform``)."""
        return {
            "name": self.name,
            "class_names": [str(n) for n in self.class_names],
            "palette": [[int(c) for c in colour] for colour in self.palette],
            "mean": [float(m) for m in self.mean],
            "std": [float(s) for s in self.std],
            "ignore_index": int(self.ignore_index),
            "eval_scale": list(protocol_scale(self.crop_size, self.eval_scale)),
        }

    def _world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.world_size if trainer is not None else 1

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        # A seeded generator makes the shuffle order reproducible; Lightning's distributed sampler
        # replaces the sampler under DDP and seeds it from the global seed.
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "setup('fit') must run first"
        return self._loader(self.train_set, per_device_batch_size(self.batch_size, self._world_size()), True)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "setup() must run first"
        return self._loader(self.val_set, self.val_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def policy_dataloader(self, data: str, size: int, batch_size: int, world_size: int = 1) -> DataLoader:
        """Training batches for the dCTS policy (``batch_size`` is global): ``data`` ``augmented`` (the
        segmenter's training crops), ``whole`` (``whole_image_dataset``) or ``crops`` (``crop_dataset``)."""
        self.setup("fit")
        if data == "whole":
            dataset = self.whole_image_dataset(size)
        elif data == "crops":
            dataset = self.crop_dataset(size)
        else:
            dataset = self.train_set
        return self._loader(dataset, per_device_batch_size(batch_size, world_size), True)

    def whole_image_dataset(self, size: int) -> Dataset:
        """The training images whole, resized to ``size`` x ``size``, flipped (CTS's ADE20K policy data)."""
        return self.scene_dataset(size)

    def crop_dataset(self, size: int) -> Dataset:
        """Random ``size`` x ``size`` crops of the training images at the evaluation scale, flipped (CTS's
        Cityscapes policy data)."""
        return self.scene_dataset(size)

    def scene_dataset(self, size: int) -> Dataset:
        """Datamodules of generated whole scenes at the crop size: their train set, whole and cropped alike."""
        if size != self.crop_size:
            raise ConfigError(f"policy_train.size={size}: {self.name} scenes are made at crop_size={self.crop_size}; "
                              f"set policy_train.size={self.crop_size}.")
        self.setup("fit")
        return self.train_set

    def eval_dataloader(self, split: str | None = None) -> DataLoader:
        """Every image of ``split`` (default: the validation split), in order, at ``val_batch_size``."""
        return self._loader(self.eval_dataset(split), self.val_batch_size, False)

    def eval_dataset(self, split: str | None = None) -> Dataset:
        """The evaluation dataset of ``split``; datamodules with one evaluation set return their validation set."""
        self.setup("validate")
        return self.val_set
