"""Reading image and label files, with errors that name the file and say what to do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from step_lightning.core import ConfigError

# PIL raises SyntaxError for some broken PNG chunks and EOFError for cut-off files.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)
LABEL_MODES = ("L", "P", "I", "I;16")


def _open_failed(path: str | Path, err: Exception, what: str) -> ConfigError:
    return ConfigError(
        f"{path}: cannot read this {what} ({type(err).__name__}: {err}). The file is missing, corrupt or "
        "truncated: re-download or re-extract it, or delete it together with its image/label partner."
    )


def read_image(path: str | Path) -> np.ndarray:
    """uint8 RGB [H, W, 3]. Grayscale, palette, RGBA and CMYK files are converted to RGB (alpha is dropped).

    Pixels are used as stored (no EXIF rotation), matching how the label maps were drawn.
    """
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except _DECODE_ERRORS as err:
        raise _open_failed(path, err, "image") from err


def read_label(path: str | Path) -> np.ndarray:
    """Raw class indices [H, W] (uint8, or wider for 16/32-bit PNGs); palette PNGs give their indices."""
    try:
        with Image.open(path) as im:
            if im.mode not in LABEL_MODES:
                raise ConfigError(
                    f"{path}: label image has mode {im.mode}; labels must be single-channel class-index "
                    f"PNGs (mode {'/'.join(LABEL_MODES)}). Colour renderings (e.g. *_color.png, full "
                    "ADE20K *_seg.png) cannot be used: point data.root at the dataset's label-index files."
                )
            return np.asarray(im)
    except _DECODE_ERRORS as err:
        raise _open_failed(path, err, "label") from err
