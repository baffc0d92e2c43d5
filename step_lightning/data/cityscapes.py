"""Cityscapes (19 classes), fine annotations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from step_lightning.core import ConfigError
from step_lightning.data.classes import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE
from step_lightning.data.folders import LabelSource, Layout
from step_lightning.data.labels import CITYSCAPES_LABELIDS, CITYSCAPES_TRAINIDS
from step_lightning.data.module import FolderSegDataModule

TRAINIDS = LabelSource("_gtFine_labelTrainIds.png", CITYSCAPES_TRAINIDS)
LABELIDS = LabelSource("_gtFine_labelIds.png", CITYSCAPES_LABELIDS)
LABEL_SOURCES = {"auto": (TRAINIDS, LABELIDS), "trainids": (TRAINIDS,), "labelids": (LABELIDS,)}


class CityscapesDataModule(FolderSegDataModule):
    """``<root>/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` + ``<root>/gtFine/<split>/<city>/...``.

    ``label_source``: ``trainids`` reads ``*_gtFine_labelTrainIds.png`` (0..18, 255); ``labelids`` maps
    ``*_gtFine_labelIds.png`` (0..33) with the official id -> trainId table; ``auto`` takes the
    trainIds file of each image when present, else its labelIds file.
    """

    name = "cityscapes"
    num_classes = 19
    class_names = CITYSCAPES_CLASSES
    palette = CITYSCAPES_PALETTE

    def __init__(
        self,
        root: str | Path,
        train_split: str = "train",
        val_split: str = "val",
        label_source: str = "auto",
        base_scale: tuple[int, int] = (2048, 1024),
        eval_scale: tuple[int, int] | None = (2048, 1024),
        **kwargs: Any,
    ):
        if label_source not in LABEL_SOURCES:
            raise ConfigError(
                f"data.label_source={label_source!r} is not one of {sorted(LABEL_SOURCES)}; use auto unless "
                "you need to force one label file type."
            )
        super().__init__(root, train_split, val_split, base_scale=base_scale, eval_scale=eval_scale, **kwargs)
        self.label_source = label_source
        self.layout = Layout(
            dataset="Cityscapes",
            image_dir="leftImg8bit",
            image_suffix="_leftImg8bit.png",
            label_dir="gtFine",
            label_sources=LABEL_SOURCES[label_source],
            nested=True,
            hint=(
                "Cityscapes needs leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip unzipped into "
                "data.root. With only *_gtFine_labelIds.png, keep data.label_source=auto (maps ids on the "
                "fly) or write trainIds once with python scripts/cityscapes_trainids.py <data.root>."
            ),
        )
