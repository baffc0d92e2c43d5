"""ADE20K SceneParsing (150 classes) in the ADEChallengeData2016 layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from step_lightning.data.classes import ADE20K_CLASSES, ADE20K_PALETTE
from step_lightning.data.folders import LabelSource, Layout
from step_lightning.data.labels import ADE20K_LABELS
from step_lightning.data.module import FolderSegDataModule


class ADE20KDataModule(FolderSegDataModule):
    """``<root>/images/{training,validation}/ADE_*.jpg`` + ``<root>/annotations/<split>/ADE_*.png``.

    Labels 0..150 with 0 = "other" are reduced: 0 -> 255 (ignore), k -> k-1.
    """

    name = "ade20k"
    num_classes = 150
    class_names = ADE20K_CLASSES
    palette = ADE20K_PALETTE
    layout = Layout(
        dataset="ADE20K",
        image_dir="images",
        image_suffix=".jpg",
        label_dir="annotations",
        label_sources=(LabelSource(".png", ADE20K_LABELS),),
        hint="data.root must be the ADEChallengeData2016 folder of ADEChallengeData2016.zip.",
    )

    def __init__(self, root: str | Path, train_split: str = "training", val_split: str = "validation", **kwargs: Any):
        super().__init__(root, train_split, val_split, **kwargs)
