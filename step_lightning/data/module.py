"""Datamodule over an mmseg-style dataset folder; subclasses only describe the layout and classes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import DataLoader

from step_lightning.core import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, ConfigError
from step_lightning.data.base import SegDataModule
from step_lightning.data.dataset import SegDataset
from step_lightning.data.folders import Layout, Sample, discover
from step_lightning.data.transforms import (
    EvalScaleCropTransform,
    EvalTransform,
    TrainTransform,
    WholeImageTransform,
    protocol_scale,
)


class FolderSegDataModule(SegDataModule):
    """Train on ``train_split`` with mmseg's augmentation, validate on ``val_split``, test on ``split``.

    ``split`` (default: ``val_split``) is the split tools such as evaluation and the dataset checker use.
    ``setup()`` lists and pairs the files of the splits it needs, so layout mistakes surface before
    training starts.
    """

    name: str
    layout: Layout

    def __init__(
        self,
        root: str | Path,
        train_split: str,
        val_split: str,
        split: str | None = None,
        crop_size: int = 512,
        batch_size: int = 8,
        val_batch_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        scale_range: Sequence[float] = (0.5, 2.0),
        base_scale: Sequence[int] = (2048, 512),
        eval_scale: Sequence[int] | None = None,
        cat_max_ratio: float = 0.75,
        name: str | None = None,
        num_classes: int | None = None,
    ):
        super().__init__(batch_size=batch_size, val_batch_size=val_batch_size, num_workers=num_workers, seed=seed)
        # name / num_classes are in the configs for the model and loggers; a mismatch is a config mistake.
        if name is not None and name != self.name:
            raise ConfigError(f"data.name={name} but {type(self).__name__} reads {self.name}; use name: {self.name}.")
        if num_classes is not None and num_classes != self.num_classes:
            raise ConfigError(
                f"data.num_classes={num_classes} but {self.name} has {self.num_classes} classes; "
                f"set num_classes: {self.num_classes}."
            )
        self.root = Path(root)
        self.train_split = train_split
        self.val_split = val_split
        self.split = split or val_split
        self.crop_size = int(crop_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.scale_range = tuple(float(r) for r in scale_range)
        self.base_scale = tuple(int(s) for s in base_scale)
        self.eval_scale = tuple(int(s) for s in eval_scale) if eval_scale else None
        self.cat_max_ratio = float(cat_max_ratio)
        self.test_set: SegDataset | None = None

    def samples(self, split: str, split_key: str = "data.split") -> list[Sample]:
        """The split's image/label pairs (raises ConfigError naming the fix on layout problems)."""
        return discover(self.root, self.layout, split, split_key)

    def _rank(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.global_rank if trainer is not None else 0

    def train_dataset(self) -> SegDataset:
        transform = TrainTransform(
            self.crop_size,
            self.mean,
            self.std,
            scale_range=self.scale_range,
            base_scale=self.base_scale,
            cat_max_ratio=self.cat_max_ratio,
            ignore_index=IGNORE_INDEX,
            seed=self.seed,
        )
        return SegDataset(self.samples(self.train_split, "data.train_split"), transform, self._rank())

    def whole_image_dataset(self, size: int) -> SegDataset:
        transform = WholeImageTransform(size, self.mean, self.std, seed=self.seed)
        return SegDataset(self.samples(self.train_split, "data.train_split"), transform, self._rank())

    def crop_dataset(self, size: int) -> SegDataset:
        transform = EvalScaleCropTransform(size, protocol_scale(self.crop_size, self.eval_scale), self.mean, self.std,
                                           IGNORE_INDEX, seed=self.seed)
        return SegDataset(self.samples(self.train_split, "data.train_split"), transform, self._rank())

    def eval_dataset(self, split: str | None = None, split_key: str = "data.split") -> SegDataset:
        split = split or self.split
        transform = EvalTransform(self.crop_size, self.mean, self.std, self.eval_scale)
        return SegDataset(self.samples(split, split_key), transform)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.train_set = self.train_dataset()
        if stage in (None, "fit", "validate"):
            self.val_set = self.eval_dataset(self.val_split, "data.val_split")
        if stage in (None, "test", "predict"):
            self.test_set = self.eval_dataset(self.split)

    def test_dataloader(self) -> DataLoader:
        assert self.test_set is not None, "setup('test') must run first"
        return self._loader(self.test_set, self.val_batch_size, False)
