"""Convert the official COCO-Stuff-10k release into the mmseg layout the datamodule reads.

    python scripts/prepare_cocostuff10k.py <cocostuff-10k-v1.1 folder> <output folder> [--workers 8]

Input (cocostuff-10k-v1.1.zip unzipped): images/*.jpg, annotations/*.mat (key S: 0 = unlabeled,
1..182 = 1-indexed COCO ids) and imageLists/{train,test}.txt.
Output: images/{train2014,test2014}/<name>.jpg and annotations/<split>/<name>_labelTrainIds.png with
values 0..171 (0 = unlabeled; the 11 ids COCO never uses are dropped), as mmseg's converter writes them.
Then train with data=cocostuff10k data.root=<output folder>.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from step_lightning.core import ConfigError
from step_lightning.data.labels import COCO10K_RAW_LABELS

SPLITS = {"train": "train2014", "test": "test2014"}  # imageLists/<key>.txt -> output split folder


def check_release(release: Path) -> dict[str, list[str]]:
    """{list name: image names}; raises ConfigError unless ``release`` is the unzipped official release."""
    if (release / "images" / "train2014").is_dir():
        raise ConfigError(
            f"{release} is already in the converted layout (images/train2014 exists): use it directly as "
            "data.root with data=cocostuff10k."
        )
    lists = {key: release / "imageLists" / f"{key}.txt" for key in SPLITS}
    needed = [release / "images", release / "annotations", *lists.values()]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        inner = [p for p in sorted(release.glob("*/imageLists")) if p.is_dir()]
        found = f" The release seems to be in {inner[0].parent}: pass that folder." if inner else ""
        raise ConfigError(
            f"{release} is not the cocostuff-10k-v1.1 release: missing {', '.join(missing)}. Expected "
            f"images/*.jpg, annotations/*.mat and imageLists/{{train,test}}.txt.{found}"
        )
    names = {key: [n.strip() for n in path.read_text().splitlines() if n.strip()] for key, path in lists.items()}
    absent = [
        str(path)
        for key in SPLITS
        for name in names[key]
        for path in (release / "images" / f"{name}.jpg", release / "annotations" / f"{name}.mat")
        if not path.is_file()
    ]
    if absent:
        raise ConfigError(
            f"{len(absent)} file(s) listed in {release / 'imageLists'} are missing, e.g. "
            f"{', '.join(absent[:3])}. Re-extract cocostuff-10k-v1.1.zip."
        )
    return names


def read_mat_labels(path: Path) -> np.ndarray:
    from scipy.io import loadmat  # the cocostuff extra: only this script needs scipy

    try:
        mat = loadmat(path)
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"{path}: cannot read this .mat file ({err}); re-extract it from the release.") from err
    if "S" not in mat:
        raise ConfigError(f"{path}: no label map under key 'S' (keys: {sorted(mat)}); not a COCO-Stuff-10k file.")
    return np.asarray(mat["S"])


def convert_one(release: Path, out: Path, split: str, name: str) -> None:
    image = release / "images" / f"{name}.jpg"
    mat = release / "annotations" / f"{name}.mat"
    label = COCO10K_RAW_LABELS(read_mat_labels(mat), mat)
    with Image.open(image) as im:
        if im.size != (label.shape[1], label.shape[0]):
            raise ConfigError(f"{image} is {im.size[0]}x{im.size[1]} but {mat} is {label.shape[1]}x{label.shape[0]}.")
    shutil.copyfile(image, out / "images" / split / image.name)
    Image.fromarray(label).save(out / "annotations" / split / f"{name}_labelTrainIds.png")


def convert(release: Path, out: Path, workers: int = 8) -> dict[str, int]:
    """Write the mmseg layout under ``out``; returns the number of pairs per output split."""
    names = check_release(release)
    counts = {}
    for key, split in SPLITS.items():
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "annotations" / split).mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(lambda n, s=split: convert_one(release, out, s, n), names[key]))
        counts[split] = len(names[key])
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("release", type=Path, help="unzipped cocostuff-10k-v1.1 folder")
    parser.add_argument("out", type=Path, help="output folder (becomes data.root)")
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args(argv)
    try:
        if importlib.util.find_spec("scipy") is None:
            raise ConfigError("reading the release's .mat files needs scipy: pip install 'step-lightning[cocostuff]'.")
        counts = convert(args.release, args.out, args.workers)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split, n in counts.items():
        print(f"wrote {n} pairs to {args.out / 'images' / split} and {args.out / 'annotations' / split}")
    print(f"next: python -m step_lightning.check_data data=cocostuff10k data.root={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
