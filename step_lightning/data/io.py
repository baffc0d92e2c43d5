"""Reading image and label files as an image viewer shows them (EXIF orientation applied), with errors that
name the file and say what to do. Every image the project reads comes through here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from step_lightning.core import ConfigError

# PIL raises SyntaxError for some broken PNG chunks and EOFError for cut-off files.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)
LABEL_MODES = ("L", "P", "I", "I;16")


def _open_failed(path: str | Path, err: Exception, what: str) -> ConfigError:
    return ConfigError(
        f"{path}: cannot read this {what} ({type(err).__name__}: {err}). The file is missing, corrupt or "
        "truncated: re-download or re-extract it, or delete it together with its image/label partner."
    )


def upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says (a phone's portrait photo is stored sideways), as image
    viewers and annotation tools show it; unchanged without the tag."""
    return ImageOps.exif_transpose(image)


def rgb_array(image: Image.Image) -> np.ndarray:
    """uint8 RGB [H, W, 3] of an opened image, upright. Grayscale, palette, RGBA and CMYK are converted to RGB
    (alpha is dropped)."""
    return np.asarray(upright(image).convert("RGB"))


def read_image(path: str | Path) -> np.ndarray:
    """uint8 RGB [H, W, 3] of an image file, upright (``rgb_array``)."""
    try:
        with Image.open(path) as im:
            return rgb_array(im)
    except _DECODE_ERRORS as err:
        raise _open_failed(path, err, "image") from err


def read_label(path: str | Path) -> np.ndarray:
    """Raw class indices [H, W] (uint8, or wider for 16/32-bit PNGs), upright like the images; palette PNGs give
    their indices."""
    try:
        with Image.open(path) as im:
            if im.mode not in LABEL_MODES:
                raise ConfigError(
                    f"{path}: label image has mode {im.mode}; labels must be single-channel class-index "
                    f"PNGs (mode {'/'.join(LABEL_MODES)}). Colour renderings (e.g. *_color.png, full "
                    "ADE20K *_seg.png) cannot be used: point data.root at the dataset's label-index files."
                )
            return np.asarray(upright(im))
    except _DECODE_ERRORS as err:
        raise _open_failed(path, err, "label") from err
