"""Label conventions: hand-checked raw value -> train id pairs for every dataset."""

import numpy as np
import pytest

from step_lightning.core import ConfigError
from step_lightning.data.classes import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    COCO_STUFF_CLASSES,
    COCO_STUFF_PALETTE,
)
from step_lightning.data.labels import (
    ADE20K_LABELS,
    CITYSCAPES_LABELIDS,
    CITYSCAPES_TRAINIDS,
    COCO10K_LABELS,
    COCO10K_RAW_LABELS,
    COCO164K_LABELS,
)


def mapped(label_map, values):
    return label_map(np.array([values], dtype=np.uint8), "test.png")[0].tolist()


def test_class_tables_have_matching_lengths():
    assert len(ADE20K_CLASSES) == len(ADE20K_PALETTE) == 150
    assert len(COCO_STUFF_CLASSES) == len(COCO_STUFF_PALETTE) == 171
    assert len(CITYSCAPES_CLASSES) == len(CITYSCAPES_PALETTE) == 19
    assert ADE20K_CLASSES[:3] == ("wall", "building", "sky") and ADE20K_CLASSES[-1] == "flag"
    assert CITYSCAPES_CLASSES[13] == "car"


def test_ade20k_reduce_zero_label():
    assert mapped(ADE20K_LABELS, [0, 1, 2, 75, 150]) == [255, 0, 1, 74, 149]
    assert ADE20K_CLASSES[mapped(ADE20K_LABELS, [3])[0]] == "sky"  # raw 3 = sky in objectInfo150


@pytest.mark.parametrize("bad", [151, 200, 255])
def test_ade20k_rejects_values_above_150(bad):
    with pytest.raises(ConfigError, match=rf"test.png: label values {bad} are outside.*0..150"):
        mapped(ADE20K_LABELS, [0, bad])


# 0-indexed COCO ids (stuffthingmaps) and their class names, checked against COCO's category list.
COCO_0INDEXED = {
    0: "person",
    10: "fire hydrant",
    12: "stop sign",
    24: "giraffe",
    26: "backpack",
    66: "dining table",
    69: "toilet",
    71: "tv",
    83: "book",
    89: "toothbrush",
    91: "banner",
    181: "wood",
}


def test_coco164k_stuffthingmaps_to_171_classes():
    for raw, name in COCO_0INDEXED.items():
        assert COCO_STUFF_CLASSES[mapped(COCO164K_LABELS, [raw])[0]] == name
    assert mapped(COCO164K_LABELS, [0, 10, 12, 26, 91, 181, 255]) == [0, 10, 11, 24, 80, 170, 255]
    # the 11 ids COCO never uses become ignore
    assert mapped(COCO164K_LABELS, [11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90]) == [255] * 11
    used = np.setdiff1d(np.arange(182), [11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90])
    assert mapped(COCO164K_LABELS, used.tolist()) == list(range(171))
    with pytest.raises(ConfigError, match="182"):
        mapped(COCO164K_LABELS, [182])


def test_coco10k_raw_mat_ids_match_mmseg_converter():
    # mmseg's clsID_to_trID (tools/dataset_converters/coco_stuff10k.py), spot checks: 0->0, 11->11, 13->12,
    # 27->25, 31->27, 67->61, 70->62, 92->81, 182->171.
    assert mapped(COCO10K_RAW_LABELS, [0, 11, 13, 27, 31, 67, 70, 92, 182]) == [0, 11, 12, 25, 27, 61, 62, 81, 171]
    for raw, name in COCO_0INDEXED.items():  # 1-indexed in the .mat files
        assert COCO_STUFF_CLASSES[mapped(COCO10K_RAW_LABELS, [raw + 1])[0] - 1] == name
    with pytest.raises(ConfigError, match="183"):
        mapped(COCO10K_RAW_LABELS, [183])


def test_coco10k_trainids_reduce_zero_label():
    assert mapped(COCO10K_LABELS, [0, 1, 12, 81, 171]) == [255, 0, 11, 80, 170]
    assert COCO_STUFF_CLASSES[mapped(COCO10K_LABELS, [12])[0]] == "stop sign"
    with pytest.raises(ConfigError, match="172"):
        mapped(COCO10K_LABELS, [172])


def test_cityscapes_labelids_table():
    # cityscapesscripts: road 7->0, sidewalk 8->1, parking 9->ignore, building 11->2, pole 17->5,
    # polegroup 18->ignore, car 26->13, caravan 29->ignore, train 31->16, bicycle 33->18, void 0..6->ignore
    raw = [7, 8, 9, 11, 17, 18, 26, 29, 31, 33, 0, 1, 2, 3, 4, 5, 6]
    assert mapped(CITYSCAPES_LABELIDS, raw) == [0, 1, 255, 2, 5, 255, 13, 255, 16, 18] + [255] * 7
    assert sorted(set(CITYSCAPES_LABELIDS.lut[:34].tolist()) - {255}) == list(range(19))
    with pytest.raises(ConfigError, match="34"):
        mapped(CITYSCAPES_LABELIDS, [34])


def test_cityscapes_trainids_passthrough():
    assert mapped(CITYSCAPES_TRAINIDS, [0, 5, 18, 255]) == [0, 5, 18, 255]
    with pytest.raises(ConfigError, match="19, 33"):
        mapped(CITYSCAPES_TRAINIDS, [19, 33])


def test_wide_labels_are_checked_before_narrowing():
    wide = np.array([[1, 2], [300, 70000]], dtype=np.int32)
    with pytest.raises(ConfigError, match="300, 70000"):
        ADE20K_LABELS(wide, "x.png")
    assert ADE20K_LABELS(np.array([[1, 150]], dtype=np.uint16), "x.png").tolist() == [[0, 149]]
