"""Images in and out of prediction: what an image input may be, finding image files, batches of equal size,
label maps as palette PNGs and colour overlays."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

from step_lightning.core import ConfigError
from step_lightning.data.io import read_image, rgb_array
from step_lightning.measure.render import colourise

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
T = TypeVar("T")


def as_rgb(image) -> np.ndarray:
    """uint8 RGB [H, W, 3] of an image path, a PIL image (both upright, as a viewer shows them: EXIF
    orientation applied) or an HxWx3 uint8 array."""
    if isinstance(image, str | Path):
        return read_image(image)
    if isinstance(image, Image.Image):
        return rgb_array(image)
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
        return image
    what = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
    raise ConfigError(
        f"cannot segment a {what}: give an image path, a PIL image, an HxWx3 uint8 array, a list of those or a "
        "normalised float tensor [B, 3, H, W]."
    )


def find_images(source: str | Path, exclude: Path | None = None) -> tuple[list[Path], Path]:
    """The files ``source`` names, sorted: one file, or the images of a folder (recursively) or of a glob;
    and the folder their output names are made relative to. Images found under ``exclude`` (the output
    folder) are left out, so a second run does not segment the first one's results."""
    path = Path(str(source)).expanduser()
    if path.is_file():
        return [path], path.parent
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    else:
        files = [p for p in map(Path, glob.glob(str(path), recursive=True))
                 if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if exclude is not None:
        files = [p for p in files if not p.resolve().is_relative_to(exclude.resolve())]
    if not files:
        raise ConfigError(
            f"input={source} names no image files ({', '.join(IMAGE_SUFFIXES)}) outside the output folder; give "
            "an image, a folder of images or a quoted glob such as 'photos/*.jpg', and another output folder."
        )
    root = path if path.is_dir() else Path(os.path.commonpath([p.parent for p in files]))
    return sorted(files), root


def output_stems(files: Sequence[Path], root: Path) -> list[Path]:
    """Each file's path relative to ``root`` without its suffix, the stem of its outputs; files that would
    share a stem (a.jpg and a.png) keep their suffix in it (a_jpg, a_png)."""
    stems = [f.relative_to(root).with_suffix("") for f in files]
    shared = {s for s in stems if stems.count(s) > 1}
    return [s.with_name(f"{s.name}_{f.suffix.lstrip('.')}") if s in shared else s
            for s, f in zip(stems, files, strict=True)]


def same_size_batches(items: Iterable[tuple[T, np.ndarray]], batch_size: int) -> Iterator[list[tuple[T, np.ndarray]]]:
    """Consecutive (key, image) pairs grouped into batches of equal image size, at most ``batch_size`` each."""
    batch: list[tuple[T, np.ndarray]] = []
    for key, image in items:
        if batch and (len(batch) == batch_size or batch[0][1].shape != image.shape):
            yield batch
            batch = []
        batch.append((key, image))
    if batch:
        yield batch


def label_image(labels: torch.Tensor, palette: Sequence[Sequence[int]]) -> Image.Image:
    """A label map [H, W] as a PNG-ready image of class ids: palette mode (each id shown in its class colour)
    up to 256 classes, 16-bit grey beyond."""
    ids = labels.cpu().numpy()
    if len(palette) > 256:
        return Image.fromarray(ids.astype(np.uint16))
    image = Image.fromarray(ids.astype(np.uint8))
    image.putpalette([int(c) for colour in palette for c in colour])
    return image


def overlay(image: np.ndarray, labels: torch.Tensor, palette: Sequence[Sequence[int]], alpha: float) -> np.ndarray:
    """The image [H, W, 3] with the label map's class colours blended in at ``alpha``."""
    colours = colourise(labels.cpu(), palette).numpy().astype(np.float32)
    return (image.astype(np.float32) * (1 - alpha) + colours * alpha).round().astype(np.uint8)
