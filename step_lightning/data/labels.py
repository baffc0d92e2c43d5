"""Raw label values -> train ids (0..C-1, 255 = ignore), each as one 256-entry lookup table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from step_lightning.core import IGNORE_INDEX, ConfigError

INVALID = -1  # LUT entry for raw values a dataset never uses: seeing one means a wrong file or convention
WRONG_FILES_FIX = (
    "Check that data.root points at the right dataset and that the label files are the ones named in that "
    "convention (regenerate or re-download this file)."
)


@dataclass(frozen=True, eq=False)
class LabelMap:
    """A raw label convention: ``lut[raw]`` is the train id, ``INVALID`` for out-of-range values."""

    lut: np.ndarray  # int16 [256]
    allowed: str  # the valid raw values, for error messages
    fix: str = WRONG_FILES_FIX  # what to do about a file with other values

    def invalid_values(self, raw: np.ndarray) -> np.ndarray:
        """Sorted raw values in ``raw`` that the convention does not allow."""
        if raw.dtype != np.uint8:
            wide = np.unique(raw)
            in_range = (wide >= 0) & (wide <= 255)
            return np.concatenate([wide[~in_range], wide[in_range][self.lut[wide[in_range]] == INVALID]])
        present = np.bincount(raw.ravel(), minlength=256) > 0
        return np.flatnonzero(present & (self.lut == INVALID))

    def __call__(self, raw: np.ndarray, path: str | Path) -> np.ndarray:
        """Train ids as uint8; raises ConfigError naming ``path`` on values outside the convention."""
        if raw.dtype == np.uint8:
            mapped = self.lut[raw]
            if raw.size == 0 or mapped.min() >= 0:
                return mapped.astype(np.uint8)
        bad = self.invalid_values(raw)
        if bad.size:
            shown = ", ".join(str(v) for v in bad[:10]) + (" ..." if bad.size > 10 else "")
            raise ConfigError(
                f"{path}: label values {shown} are outside this dataset's convention ({self.allowed}). {self.fix}"
            )
        return self.lut[raw.astype(np.uint8)].astype(np.uint8)


def _lut(pairs: dict[int, int] | None = None) -> np.ndarray:
    lut = np.full(256, INVALID, dtype=np.int16)
    for raw, train in (pairs or {}).items():
        lut[raw] = train
    return lut


def reduce_zero_label(max_raw: int, allowed: str) -> LabelMap:
    """mmseg's reduce_zero_label: 0 -> ignore, k -> k-1 for k in 1..max_raw."""
    lut = _lut({0: IGNORE_INDEX})
    lut[1 : max_raw + 1] = np.arange(max_raw)
    return LabelMap(lut, allowed)


def class_index_labels(num_classes: int, reduce_zero_label: bool, ignore_value: int, fix: str) -> LabelMap:
    """Labels storing class indices 0..C-1, or 1..C with ``reduce_zero_label`` (then 0 is ignored as well);
    ``ignore_value`` marks unlabeled pixels. ``ignore_value`` must not be a class's value."""
    first = int(reduce_zero_label)
    lut = _lut({0: IGNORE_INDEX} if reduce_zero_label else None)
    lut[first : first + num_classes] = np.arange(num_classes)
    lut[ignore_value] = IGNORE_INDEX
    ignored = f"0 and {ignore_value}" if reduce_zero_label and ignore_value != 0 else str(ignore_value)
    classes = f"{first}..{first + num_classes - 1} = classes 0..{num_classes - 1}" if first else f"0..{num_classes - 1}"
    return LabelMap(lut, f"{classes}, {ignored} = ignore", fix)


ADE20K_LABELS = reduce_zero_label(150, "ADEChallengeData2016 annotations: 0..150, 0 = other")

# COCO's 0-indexed category ids 0..181 skip 11 ids that no image uses (1-indexed: 12, 26, 29, 30, 45,
# 66, 68, 69, 71, 83, 91); dropping them gives the 171 train ids.
COCO_UNUSED_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
COCO_USED_IDS = np.setdiff1d(np.arange(182), COCO_UNUSED_IDS)


def _coco164k_stuffthingmaps() -> LabelMap:
    lut = _lut({IGNORE_INDEX: IGNORE_INDEX})
    lut[list(COCO_UNUSED_IDS)] = IGNORE_INDEX  # never annotated; ignore rather than fail
    lut[COCO_USED_IDS] = np.arange(171)
    return LabelMap(lut, "stuffthingmaps_trainval2017: 0..181 (0-indexed COCO ids), 255 = unlabeled")


COCO164K_LABELS = _coco164k_stuffthingmaps()

# mmseg's COCO-Stuff-10k *_labelTrainIds.png: 0 = unlabeled, 1..171 = classes; reduce-zero-label follows.
COCO10K_LABELS = reduce_zero_label(
    171, "COCO-Stuff-10k *_labelTrainIds.png: 0..171, 0 = unlabeled (see scripts/prepare_cocostuff10k.py)"
)


def _coco10k_raw_to_trainids() -> LabelMap:
    """The official 10k .mat maps (0 = unlabeled, 1..182 = 1-indexed COCO ids) -> 0..171, 0 = unlabeled."""
    lut = _lut({0: 0})
    lut[1:183] = 0  # the 11 unused ids never occur; if they did they would carry no class
    lut[COCO_USED_IDS + 1] = np.arange(1, 172)
    return LabelMap(lut, "cocostuff-10k-v1.1 annotations/*.mat key S: 0..182, 0 = unlabeled")


COCO10K_RAW_LABELS = _coco10k_raw_to_trainids()

# Cityscapes labelIds -> trainIds, from cityscapesscripts/helpers/labels.py (id: trainId); every
# other id in 0..33 (void classes, parking, rail track, guard rail, bridge, tunnel, polegroup, caravan,
# trailer) is ignored. The 'license plate' label (id -1) never appears in the label PNGs.
CITYSCAPES_ID_TO_TRAINID = {
    7: 0,  # road
    8: 1,  # sidewalk
    11: 2,  # building
    12: 3,  # wall
    13: 4,  # fence
    17: 5,  # pole
    19: 6,  # traffic light
    20: 7,  # traffic sign
    21: 8,  # vegetation
    22: 9,  # terrain
    23: 10,  # sky
    24: 11,  # person
    25: 12,  # rider
    26: 13,  # car
    27: 14,  # truck
    28: 15,  # bus
    31: 16,  # train
    32: 17,  # motorcycle
    33: 18,  # bicycle
}


def _cityscapes_labelids() -> LabelMap:
    lut = _lut()
    lut[:34] = IGNORE_INDEX
    for raw, train in CITYSCAPES_ID_TO_TRAINID.items():
        lut[raw] = train
    return LabelMap(lut, "Cityscapes *_gtFine_labelIds.png: 0..33")


def _cityscapes_trainids() -> LabelMap:
    lut = _lut({IGNORE_INDEX: IGNORE_INDEX})
    lut[:19] = np.arange(19)
    return LabelMap(lut, "Cityscapes *_gtFine_labelTrainIds.png: 0..18, 255 = ignore")


CITYSCAPES_LABELIDS = _cityscapes_labelids()
CITYSCAPES_TRAINIDS = _cityscapes_trainids()
