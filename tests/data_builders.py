"""Tiny datasets in the official folder layouts, written into a test's tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from step_lightning.data.labels import CITYSCAPES_LABELIDS

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
SIZE = (24, 40)  # (height, width) of the generated pairs


def write_image(path: Path, shape: tuple[int, int], seed: int = 0, mode: str = "RGB") -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert(mode).save(path)
    return rgb


def write_label(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label.astype(np.uint8), mode="L").save(path)


def random_label(values: list[int] | np.ndarray, seed: int, shape: tuple[int, int] = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).choice(np.asarray(values), size=shape).astype(np.uint8)


def make_ade(base: Path, splits: dict[str, int] | None = None) -> Path:
    root = base / "ADEChallengeData2016"
    for split, n in (splits or {"training": 3, "validation": 2}).items():
        for i in range(n):
            name = f"ADE_{split[:5]}_{i:08d}"
            write_image(root / "images" / split / f"{name}.jpg", SIZE, seed=i)
            write_label(root / "annotations" / split / f"{name}.png", random_label(np.arange(151), i))
    return root


def make_coco10k(base: Path, splits: dict[str, int] | None = None) -> Path:
    root = base / "coco_stuff10k"
    for split, n in (splits or {"train2014": 3, "test2014": 2}).items():
        for i in range(n):
            name = f"COCO_{split}_{i:012d}"
            write_image(root / "images" / split / f"{name}.jpg", SIZE, seed=i)
            write_label(root / "annotations" / split / f"{name}_labelTrainIds.png", random_label(np.arange(172), i))
    return root


def make_coco164k(base: Path, splits: dict[str, int] | None = None) -> Path:
    root = base / "coco_stuff164k"
    values = [*range(182), 255]
    for split, n in (splits or {"train2017": 3, "val2017": 2}).items():
        for i in range(n):
            name = f"{i:012d}"
            write_image(root / "images" / split / f"{name}.jpg", SIZE, seed=i)
            write_label(root / "stuffthingmaps_trainval2017" / split / f"{name}.png", random_label(values, i))
    return root


def make_cityscapes(
    base: Path, splits: dict[str, int] | None = None, kinds: tuple[str, ...] = ("labelIds", "labelTrainIds")
) -> Path:
    """Pairs in two cities per split; labelTrainIds (when written) derive from the labelIds."""
    root = base / "cityscapes"
    for split, n in (splits or {"train": 4, "val": 2}).items():
        for i in range(n):
            city = ("aachen", "bremen")[i % 2]
            name = f"{city}_{i:06d}_000019"
            write_image(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", SIZE, seed=i)
            ids = random_label(np.arange(34), i)
            gt = root / "gtFine" / split / city
            if "labelIds" in kinds:
                write_label(gt / f"{name}_gtFine_labelIds.png", ids)
            if "labelTrainIds" in kinds:
                write_label(gt / f"{name}_gtFine_labelTrainIds.png", CITYSCAPES_LABELIDS(ids, "test"))
            write_label(gt / f"{name}_gtFine_instanceIds.png", ids)  # present in real releases; must be ignored
    return root


def make_folder(
    base: Path,
    splits: dict[str, int] | None = None,
    values: tuple[int, ...] = (0, 1, 2),
    image_dir: str = "images",
    label_dir: str = "annotations",
) -> Path:
    """A user's dataset for data=folder: <root>/<image_dir>/<split>/img_<i>.jpg + <label_dir>/<split>/img_<i>.png."""
    root = base / "mydata"
    for split, n in (splits or {"training": 4, "validation": 2}).items():
        for i in range(n):
            write_image(root / image_dir / split / f"img_{i}.jpg", SIZE, seed=i)
            write_label(root / label_dir / split / f"img_{i}.png", random_label(values, i))
    return root
