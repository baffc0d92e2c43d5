"""COCO-Stuff (171 classes): the 10k release as prepared by mmseg, and the 164k stuffthingmaps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from step_lightning.data.classes import COCO_STUFF_CLASSES, COCO_STUFF_PALETTE
from step_lightning.data.folders import LabelSource, Layout
from step_lightning.data.labels import COCO10K_LABELS, COCO164K_LABELS
from step_lightning.data.module import FolderSegDataModule


class CocoStuff10kDataModule(FolderSegDataModule):
    """``<root>/images/{train2014,test2014}/*.jpg`` + ``<root>/annotations/<split>/*_labelTrainIds.png``.

    Labels 0..171 (0 = unlabeled), as written by ``scripts/prepare_cocostuff10k.py`` or mmseg's
    converter, are reduced: 0 -> 255, k -> k-1.
    """

    name = "cocostuff10k"
    num_classes = 171
    class_names = COCO_STUFF_CLASSES
    palette = COCO_STUFF_PALETTE
    layout = Layout(
        dataset="COCO-Stuff-10k",
        image_dir="images",
        image_suffix=".jpg",
        label_dir="annotations",
        label_sources=(LabelSource("_labelTrainIds.png", COCO10K_LABELS),),
        hint=(
            "The official cocostuff-10k-v1.1 release (images/*.jpg, annotations/*.mat, imageLists/) must "
            "be converted first: python scripts/prepare_cocostuff10k.py <release folder> <data.root>."
        ),
    )

    def __init__(self, root: str | Path, train_split: str = "train2014", val_split: str = "test2014", **kwargs: Any):
        super().__init__(root, train_split, val_split, **kwargs)


class CocoStuff164kDataModule(FolderSegDataModule):
    """``<root>/images/{train2017,val2017}/*.jpg`` + ``<root>/stuffthingmaps_trainval2017/<split>/*.png``.

    Labels are 0-indexed COCO ids 0..181 (255 = unlabeled); the 11 ids COCO never uses are dropped to
    give train ids 0..170.
    """

    name = "cocostuff164k"
    num_classes = 171
    class_names = COCO_STUFF_CLASSES
    palette = COCO_STUFF_PALETTE
    layout = Layout(
        dataset="COCO-Stuff-164k",
        image_dir="images",
        image_suffix=".jpg",
        label_dir="stuffthingmaps_trainval2017",
        label_sources=(LabelSource(".png", COCO164K_LABELS),),
        hint=(
            "data.root must hold images/{train2017,val2017} (COCO 2017 images) and "
            "stuffthingmaps_trainval2017/{train2017,val2017} (unzipped stuffthingmaps_trainval2017.zip)."
        ),
    )

    def __init__(self, root: str | Path, train_split: str = "train2017", val_split: str = "val2017", **kwargs: Any):
        super().__init__(root, train_split, val_split, **kwargs)
