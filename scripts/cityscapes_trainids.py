"""Write Cityscapes *_gtFine_labelTrainIds.png (0..18, 255 = ignore) next to every *_gtFine_labelIds.png.

    python scripts/cityscapes_trainids.py <cityscapes root> [--overwrite] [--workers 8]

Uses the official id -> trainId table (cityscapesscripts' labels.py). Optional: the datamodule also maps
labelIds on the fly (data.label_source=auto); precomputed files just save that work at load time.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from step_lightning.core import ConfigError
from step_lightning.data.folders import suggest_root
from step_lightning.data.io import read_label
from step_lightning.data.labels import CITYSCAPES_LABELIDS

LABELIDS = "_gtFine_labelIds.png"
TRAINIDS = "_gtFine_labelTrainIds.png"


def find_labelids(root: Path) -> list[Path]:
    """Every gtFine/<split>/<city>/*_gtFine_labelIds.png; ConfigError naming the fix when there is none."""
    if not (root / "gtFine").is_dir():
        found = suggest_root(root, ("gtFine",)) if root.is_dir() else None
        fix = f" Found it at {found}: pass that folder." if found else ""
        raise ConfigError(f"{root} has no gtFine folder; pass the Cityscapes root (holding gtFine/).{fix}")
    files = sorted((root / "gtFine").glob(f"*/*/*{LABELIDS}"))
    if not files:
        raise ConfigError(
            f"no gtFine/<split>/<city>/*{LABELIDS} under {root}; unzip gtFine_trainvaltest.zip into it first."
        )
    return files


def convert_one(path: Path, overwrite: bool) -> bool:
    """True when the trainIds file was written, False when it existed and was kept."""
    target = path.with_name(path.name[: -len(LABELIDS)] + TRAINIDS)
    if target.exists() and not overwrite:
        return False
    Image.fromarray(CITYSCAPES_LABELIDS(read_label(path), path)).save(target)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="Cityscapes root holding gtFine/")
    parser.add_argument("--overwrite", action="store_true", help="rewrite existing *_labelTrainIds.png")
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args(argv)
    try:
        files = find_labelids(args.root)
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            written = sum(pool.map(lambda p: convert_one(p, args.overwrite), files))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    kept = f"; kept {len(files) - written} existing (--overwrite rewrites them)" if written < len(files) else ""
    print(f"wrote {written} *{TRAINIDS} files under {args.root / 'gtFine'}{kept}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
