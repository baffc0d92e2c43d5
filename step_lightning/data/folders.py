"""Finding image/label pairs in the mmseg folder layouts, with errors that say how to fix the root."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from step_lightning.core import ConfigError
from step_lightning.data.labels import LabelMap

_EXAMPLES = 3  # unpaired files quoted per error


@dataclass(frozen=True)
class LabelSource:
    suffix: str  # file name = <name><suffix>
    label_map: LabelMap


@dataclass(frozen=True)
class Layout:
    """``<root>/<image_dir>/<split>/[<city>/]<name><image_suffix>`` with labels alike under ``label_dir``."""

    dataset: str  # for messages, e.g. "ADE20K"
    image_dir: str
    image_suffix: str
    label_dir: str
    label_sources: tuple[LabelSource, ...]  # preference order when one image has several
    nested: bool = False  # one sub-folder per city (Cityscapes)
    hint: str = ""  # dataset-specific advice appended to layout errors

    def describe(self) -> str:
        return (
            f"{self.image_dir}/<split>/{'<city>/' if self.nested else ''}*{self.image_suffix} and "
            f"{self.label_dir}/<split>/{'<city>/' if self.nested else ''}"
            f"*{' or *'.join(s.suffix for s in self.label_sources)}"
        )


@dataclass(frozen=True)
class Sample:
    image: str
    label: str
    name: str
    label_map: LabelMap


@dataclass(frozen=True)
class Pairing:
    samples: list[Sample]
    images_without_label: list[str]
    labels_without_image: list[str]

    def problems(self, layout: Layout, split: str) -> list[str]:
        out = []
        label_names = " or ".join(f"<name>{s.suffix}" for s in layout.label_sources)
        if self.images_without_label:
            out.append(
                f"{len(self.images_without_label)} image(s) in {layout.image_dir}/{split} have no label "
                f"({label_names} in {layout.label_dir}/{split}), e.g. "
                + ", ".join(self.images_without_label[:_EXAMPLES])
            )
        if self.labels_without_image:
            out.append(
                f"{len(self.labels_without_image)} label(s) in {layout.label_dir}/{split} have no image "
                f"(<name>{layout.image_suffix} in {layout.image_dir}/{split}), e.g. "
                + ", ".join(self.labels_without_image[:_EXAMPLES])
            )
        return out


def _has_dirs(path: Path, names: tuple[str, ...]) -> bool:
    return all((path / n).is_dir() for n in names)


def _subdirs(path: Path, limit: int = 200) -> list[Path]:
    try:
        with os.scandir(path) as it:
            return sorted(Path(e.path) for e in it if e.is_dir())[:limit]
    except OSError:
        return []


def suggest_root(root: Path, markers: tuple[str, ...]) -> Path | None:
    """The folder holding ``markers`` when root points up to two levels too high or too low."""
    for child in _subdirs(root):
        if _has_dirs(child, markers):
            return child
    for child in _subdirs(root):
        for grandchild in _subdirs(child):
            if _has_dirs(grandchild, markers):
                return grandchild
    return next((p for p in list(root.resolve().parents)[:2] if _has_dirs(p, markers)), None)


def check_root(root: Path, layout: Layout) -> None:
    """Fail fast, naming the fix, unless ``root`` holds the layout's image and label folders."""
    markers = (layout.image_dir, layout.label_dir)
    expected = f"expected {layout.describe()} under it"
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise ConfigError(
            f"data.root={root} {what} ({layout.dataset}: {expected}). Set data.root (or the DATA_ROOT "
            f"environment variable the configs default to) to the dataset folder. {layout.hint}".rstrip()
        )
    if _has_dirs(root, markers):
        return
    found = suggest_root(root, markers)
    fix = f"Found it at {found}: set data.root={found}." if found else "Point data.root at that folder."
    missing = ", ".join(m for m in markers if not (root / m).is_dir())
    raise ConfigError(
        f"data.root={root} does not hold the {layout.dataset} layout: {expected} (missing: {missing}). "
        f"{fix} {layout.hint}".rstrip()
    )


def _scan(split_dir: Path, suffixes: tuple[str, ...], nested: bool) -> dict[str, dict[str, str]]:
    """{suffix: {key: path}} for files ending in each suffix; key = [city/]name."""
    found: dict[str, dict[str, str]] = {s: {} for s in suffixes}
    folders = _subdirs(split_dir, limit=1 << 30) if nested else [split_dir]
    for folder in folders:
        prefix = f"{folder.name}/" if nested else ""
        with os.scandir(folder) as it:
            for entry in it:
                for suffix in suffixes:
                    if entry.name.endswith(suffix) and entry.is_file():
                        found[suffix][prefix + entry.name[: -len(suffix)]] = entry.path
                        break
    return found


def _split_dir(root: Path, folder: str, split: str, split_key: str, layout: Layout) -> Path:
    path = root / folder / split
    if not path.is_dir():
        available = [p.name for p in _subdirs(root / folder)]
        raise ConfigError(
            f"{path} does not exist: {layout.dataset} split '{split}' not found under data.root={root}. "
            f"Splits present in {root / folder}: {available or 'none'}; set {split_key} to one of them "
            f"or complete the dataset. {layout.hint}".rstrip()
        )
    return path


def find_pairs(root: Path, layout: Layout, split: str, split_key: str = "data.split") -> Pairing:
    """Pair images with labels by name; pick the first label source present for each image."""
    check_root(root, layout)
    image_dir = _split_dir(root, layout.image_dir, split, split_key, layout)
    label_dir = _split_dir(root, layout.label_dir, split, split_key, layout)
    images = _scan(image_dir, (layout.image_suffix,), layout.nested)[layout.image_suffix]
    by_suffix = _scan(label_dir, tuple(s.suffix for s in layout.label_sources), layout.nested)
    labels: dict[str, tuple[str, LabelMap]] = {}
    for source in reversed(layout.label_sources):  # preferred sources overwrite the others
        labels.update({key: (path, source.label_map) for key, path in by_suffix[source.suffix].items()})
    samples = [
        Sample(images[key], labels[key][0], key.rsplit("/", 1)[-1], labels[key][1])
        for key in sorted(images.keys() & labels.keys())
    ]
    return Pairing(
        samples,
        images_without_label=[images[k] for k in sorted(images.keys() - labels.keys())],
        labels_without_image=[labels[k][0] for k in sorted(labels.keys() - images.keys())],
    )


def discover(root: Path, layout: Layout, split: str, split_key: str = "data.split") -> list[Sample]:
    """The split's pairs; ConfigError on an empty split or on any unpaired image or label."""
    pairing = find_pairs(root, layout, split, split_key)
    problems = pairing.problems(layout, split)
    if problems:
        raise ConfigError(
            f"{layout.dataset} at data.root={root}, split '{split}': images and labels do not pair up.\n  "
            + "\n  ".join(problems)
            + "\nRestore the missing files or remove the unpaired ones. "
            + layout.hint
        )
    if not pairing.samples:
        raise ConfigError(
            f"{layout.dataset} at data.root={root}, split '{split}': no files found; expected "
            f"{layout.describe()}. {layout.hint}".rstrip()
        )
    return pairing.samples
