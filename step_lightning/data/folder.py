"""``data=folder``: a user's own dataset in mmseg's folder layout, described by config alone.

``<root>/<image_dir>/<split>/<name><image_suffix>`` pairs with ``<root>/<label_dir>/<split>/<name><label_suffix>``;
labels are single-channel PNGs of class indices. Class names come inline or from a classes file, the palette
inline, from that file, or generated like mmseg's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from step_lightning.core import IGNORE_INDEX, ConfigError
from step_lightning.data.folders import LabelSource, Layout
from step_lightning.data.labels import class_index_labels
from step_lightning.data.module import FolderSegDataModule

CLASSES_FILE_SUFFIXES = (".txt", ".json", ".yaml", ".yml")
CLASSES_FILE_KEYS = ("classes", "palette")
MAX_CLASSES = IGNORE_INDEX  # train ids 0..254: 255 is the ignore id

Colour = tuple[int, int, int]


def default_palette(num_classes: int) -> tuple[Colour, ...]:
    """mmseg's colours for a dataset without a palette: numpy's legacy generator seeded with 42, so a
    dataset keeps its colours from run to run and matches mmseg's renderings."""
    colours = np.random.RandomState(42).randint(0, 255, size=(num_classes, 3))
    return tuple((int(r), int(g), int(b)) for r, g, b in colours)


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str)  # OmegaConf's ListConfig is a Sequence


def check_class_names(names: Any, num_classes: int | None, source: str) -> tuple[str, ...]:
    """``names`` as unique non-empty strings, one per class (``num_classes`` None: any count)."""
    if not _is_list(names):
        raise ConfigError(f"{source} must be a list of class names, e.g. [background, road, car]; got {names!r}.")
    bad = [n for n in names if isinstance(n, bool) or not isinstance(n, str | int)]
    if bad:
        raise ConfigError(f"{source}: {bad[0]!r} is not a class name; give names as strings, e.g. [road, car].")
    names = tuple(str(n).strip() for n in names)
    if num_classes is not None and len(names) != num_classes:
        raise ConfigError(
            f"{source} has {len(names)} class names but data.num_classes={num_classes}; give one name per class "
            f"in label-value order, or set data.num_classes={len(names)}."
        )
    if "" in names:
        raise ConfigError(f"{source}: class {names.index('')} has an empty name; give every class a name.")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(
            f"{source} names {', '.join(repeated)} more than once; class names must be unique (they label the "
            "per-class IoU)."
        )
    return names


def check_palette(palette: Any, num_classes: int, source: str) -> tuple[Colour, ...]:
    """One [r, g, b] with values 0..255 per class."""
    if not _is_list(palette):
        raise ConfigError(f"{source} must be a list of [r, g, b] colours, one per class; got {palette!r}.")
    if len(palette) != num_classes:
        raise ConfigError(
            f"{source} has {len(palette)} colours but there are {num_classes} classes; give one [r, g, b] per "
            "class, or leave the palette out for a generated one."
        )
    for i, colour in enumerate(palette):
        if not (
            _is_list(colour)
            and len(colour) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in colour)
        ):
            shown = list(colour) if _is_list(colour) else colour
            raise ConfigError(f"{source}[{i}]={shown} is not a colour [r, g, b] with values 0..255; fix that entry.")
    return tuple((int(r), int(g), int(b)) for r, g, b in palette)


def find_classes_file(value: str | Path, root: Path) -> Path:
    """A relative path is looked up in the working directory, then in ``root``."""
    path = Path(value).expanduser()
    candidates = [path] if path.is_absolute() else [path, root / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"data.classes_file={value} not found (looked for {' and '.join(str(c) for c in candidates)}); give the "
        "path of your class-names file (a relative one is looked up in the working directory, then in data.root)."
    )


def read_classes_file(path: Path) -> tuple[Any, Any]:
    """(names, palette or None) as stored: ``.txt`` one name per line (blank lines skipped), ``.json`` /
    ``.yaml`` a mapping with ``classes`` and optionally ``palette``."""
    kind = path.suffix.lower()
    if kind not in CLASSES_FILE_SUFFIXES:
        raise ConfigError(
            f"data.classes_file={path} must end in {', '.join(CLASSES_FILE_SUFFIXES)}: a .txt with one class name "
            "per line, or a .json/.yaml mapping with 'classes' (and optionally 'palette')."
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"data.classes_file={path} cannot be read ({type(err).__name__}: {err}); make it a readable UTF-8 file."
        ) from err
    if kind == ".txt":
        return [line.strip() for line in text.splitlines() if line.strip()], None
    try:
        content = json.loads(text) if kind == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        reason = " ".join(str(err).split())  # YAML errors span lines; commands print one
        raise ConfigError(
            f"data.classes_file={path} is not valid {kind[1:].upper()} ({reason}); fix its syntax."
        ) from err
    if not isinstance(content, dict) or "classes" not in content:
        raise ConfigError(
            f"data.classes_file={path} must hold a mapping with a 'classes' list and optionally a 'palette' list, "
            'e.g. {"classes": ["road", "car"], "palette": [[128, 64, 128], [0, 0, 142]]}.'
        )
    unknown = sorted(set(content) - set(CLASSES_FILE_KEYS))
    if unknown:
        raise ConfigError(
            f"data.classes_file={path} has unknown keys {unknown}; only {list(CLASSES_FILE_KEYS)} are read."
        )
    return content["classes"], content.get("palette")


class FolderDataModule(FolderSegDataModule):
    """A dataset of the user's in mmseg's layout (``conf/data/folder.yaml`` documents every key).

    Label values 0..num_classes-1 are the classes, or 1..num_classes with ``reduce_zero_label`` (mmseg's:
    0 is ignored, k becomes class k-1). ``ignore_index`` is the value the label files use for unlabeled
    pixels; inside the model every ignored pixel is 255 (``self.ignore_index``), whatever the files use.
    Class names default to class_0, class_1, ...; ``num_classes`` defaults to the number of names.
    """

    def __init__(
        self,
        root: str | Path | None,
        num_classes: int | None = None,
        name: str = "folder",
        image_dir: str = "images",
        label_dir: str = "annotations",
        train_split: str = "training",
        val_split: str = "validation",
        image_suffix: str = ".jpg",
        label_suffix: str = ".png",
        class_names: Sequence[str] | None = None,
        classes_file: str | Path | None = None,
        palette: Sequence[Sequence[int]] | None = None,
        reduce_zero_label: bool = False,
        ignore_index: int = IGNORE_INDEX,
        **kwargs: Any,
    ):
        if root is None or str(root) == "":
            raise ConfigError(
                f"data=folder needs data.root: the folder holding {image_dir}/<split> and {label_dir}/<split>; "
                "set data.root=/path/to/your/dataset."
            )
        super().__init__(root, train_split, val_split, **kwargs)
        self.name = name
        names, file_palette = self._names_and_file_palette(class_names, classes_file, num_classes)
        self.num_classes = self._check_num_classes(len(names) if num_classes is None and names else num_classes)
        self.class_names = names or tuple(f"class_{i}" for i in range(self.num_classes))
        self.reduce_zero_label = bool(reduce_zero_label)
        self.label_ignore_value = self._check_ignore_value(ignore_index)
        if palette is not None and file_palette is not None:
            raise ConfigError(
                "data.palette and data.classes_file both give a palette; keep one (drop data.palette or the "
                "file's 'palette')."
            )
        if palette is not None:
            self.palette = check_palette(palette, self.num_classes, "data.palette")
        elif file_palette is not None:
            self.palette = check_palette(file_palette, self.num_classes, f"data.classes_file={classes_file} palette")
        else:
            self.palette = default_palette(self.num_classes)
        labels = class_index_labels(
            self.num_classes,
            self.reduce_zero_label,
            self.label_ignore_value,
            fix=(
                "Set data.num_classes, data.reduce_zero_label (true when 0 means unlabeled and classes start at 1) "
                "or data.ignore_index (the value of unlabeled pixels) to match your labels, or fix this file."
            ),
        )
        self.layout = Layout(
            dataset="data=folder",
            image_dir=image_dir,
            image_suffix=image_suffix,
            label_dir=label_dir,
            label_sources=(LabelSource(label_suffix, labels),),
            hint=(
                "Set data.image_dir, data.label_dir, data.train_split, data.val_split, data.image_suffix and "
                "data.label_suffix to your folder and file names (mmseg's img_dir/ann_dir layout: "
                "data.image_dir=img_dir data.label_dir=ann_dir data.train_split=train data.val_split=val)."
            ),
        )

    def _names_and_file_palette(
        self, class_names: Any, classes_file: str | Path | None, num_classes: int | None
    ) -> tuple[tuple[str, ...], Any]:
        if class_names is not None and classes_file is not None:
            raise ConfigError("data.class_names and data.classes_file are both set; keep one of them.")
        if class_names is not None:
            return check_class_names(class_names, num_classes, "data.class_names"), None
        if classes_file is not None:
            path = find_classes_file(classes_file, self.root)
            names, palette = read_classes_file(path)
            return check_class_names(names, num_classes, f"data.classes_file={path}"), palette
        return (), None

    def _check_num_classes(self, num_classes: Any) -> int:
        if num_classes is None:
            raise ConfigError(
                "data=folder needs data.num_classes=<number of classes> (or class names in data.class_names or "
                "data.classes_file, which then set it)."
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes <= MAX_CLASSES:
            raise ConfigError(f"data.num_classes={num_classes!r} must be a whole number in 1..{MAX_CLASSES}.")
        return num_classes

    def _check_ignore_value(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
            raise ConfigError(
                f"data.ignore_index={value!r} must be a label value in 0..255 (label files are 8-bit); "
                "255 is the usual one."
            )
        first = int(self.reduce_zero_label)
        if first <= value < first + self.num_classes:
            raise ConfigError(
                f"data.ignore_index={value} is the label value of class {self.class_names[value - first]} (class "
                f"values are {first}..{first + self.num_classes - 1}); set data.ignore_index to the value your labels "
                "use for unlabeled pixels (usually 255)."
            )
        return value
