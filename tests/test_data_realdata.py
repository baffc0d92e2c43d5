"""Real ADE20K / Cityscapes / COCO-Stuff-164k samples from ../shared/realdata, read in place (skipped if absent)."""

import numpy as np
import pytest
from PIL import Image

from step_lightning.core import ConfigError
from step_lightning.data.ade20k import ADE20KDataModule
from step_lightning.data.cityscapes import CityscapesDataModule
from step_lightning.data.cocostuff import CocoStuff164kDataModule
from step_lightning.data.dataset import load_sample
from step_lightning.data.transforms import CatMaxRatioCrop, Compose, HorizontalFlip, RandomRescale
from tests.data_builders import REALDATA

if not REALDATA.is_dir():
    pytest.skip(f"no real samples at {REALDATA}", allow_module_level=True)


def raw(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def assert_geometry_aligned(label: np.ndarray, base_scale, crop: int, seed: int) -> None:
    """Resize/crop/flip the label both as an image (bilinear) and as a label (nearest): where the label
    is locally constant the two agree, so the image and label paths stay in register."""
    geometry = Compose([RandomRescale(base_scale, (0.5, 2.0)), CatMaxRatioCrop(crop), HorizontalFlip(0.5)], seed=seed)
    as_image = np.repeat(label[..., None], 3, axis=-1)
    image, mask = geometry(as_image, label)
    image = image[..., 0]
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(mask, 2, constant_values=254), (5, 5))
    interior = windows.min(axis=(-1, -2)) == windows.max(axis=(-1, -2))
    assert interior.mean() > 0.5
    np.testing.assert_array_equal(image[interior], mask[interior])


def test_ade20k_validation_samples():
    dm = ADE20KDataModule(REALDATA / "ade20k" / "ADEChallengeData2016", crop_size=512)
    dm.setup("validate")
    assert [s.name for s in dm.val_set.samples] == [f"ADE_val_0000000{i}" for i in (1, 2, 3)]
    for i, sample in enumerate(dm.val_set.samples):
        item = dm.val_set[i]
        labels = raw(sample.label).astype(np.int64)
        np.testing.assert_array_equal(item["label"].numpy(), np.where(labels == 0, 255, labels - 1))
        assert set(np.unique(item["label"]).tolist()) <= set(range(150)) | {255}
        height, width = labels.shape
        assert item["image"].shape == (3, 512, int(width * 512 / height + 0.5))
        assert_geometry_aligned(load_sample(sample)[1], (2048, 512), 512, seed=i)
    assert raw(dm.val_set.samples[0].image).shape[:2] == (512, 683)


def test_ade20k_train_items_from_real_pairs():
    # The validation folder doubles as a train split here: the pipeline must produce crop x crop pairs.
    dm = ADE20KDataModule(REALDATA / "ade20k" / "ADEChallengeData2016", train_split="validation", crop_size=512)
    dm.setup("fit")
    for i in range(len(dm.train_set)):
        item = dm.train_set[i]
        assert item["image"].shape == (3, 512, 512) and item["label"].shape == (512, 512)
        assert set(item["label"].unique().tolist()) <= set(range(150)) | {255}


def test_cityscapes_trainids_and_labelids_agree():
    root = REALDATA / "cityscapes"
    by_source = {}
    for source in ("trainids", "labelids"):
        dm = CityscapesDataModule(root, val_split="train", label_source=source, crop_size=512)
        dm.setup("validate")
        assert len(dm.val_set) == 8
        by_source[source] = [load_sample(s)[1] for s in dm.val_set.samples]
    for trainids, labelids in zip(by_source["trainids"], by_source["labelids"], strict=True):
        assert trainids.shape == (1024, 2048)
        np.testing.assert_array_equal(trainids, labelids)
        assert set(np.unique(trainids).tolist()) <= set(range(19)) | {255}
    item = dm.val_set[0]  # mmseg's Cityscapes protocol: the full image, whatever the crop
    assert item["image"].shape == (3, 1024, 2048) and item["label"].shape == (1024, 2048)
    short_side = CityscapesDataModule(root, val_split="train", crop_size=512, eval_scale=None).eval_dataset("train")
    assert short_side[0]["image"].shape == (3, 512, 1024)
    assert_geometry_aligned(by_source["labelids"][0], (2048, 1024), 768, seed=0)


def test_cityscapes_mmseg_lowres_labelids_match_shipped_trainids():
    root = REALDATA / "cityscapes_lowres_mmseg"
    mapped, shipped = (
        load_sample(CityscapesDataModule(root, label_source=source).samples("val")[0])[1]
        for source in ("labelids", "trainids")
    )
    assert (mapped == shipped).mean() > 0.99  # the two files were downsampled separately (PROVENANCE.md)


def test_cityscapes_val_labels_without_images_are_reported():
    with pytest.raises(ConfigError, match=r"does not hold the Cityscapes layout.*\(missing: leftImg8bit\)"):
        CityscapesDataModule(REALDATA / "cityscapes_val_labels_only").samples("val")


def test_cocostuff164k_samples():
    dm = CocoStuff164kDataModule(REALDATA / "cocostuff", crop_size=512)
    dm.setup()
    assert len(dm.train_set) == 13 and len(dm.val_set) == 8
    for sample in dm.val_set.samples:
        ids = raw(sample.label)
        label = load_sample(sample)[1]
        assert set(np.unique(label).tolist()) <= set(range(171)) | {255}
        np.testing.assert_array_equal(label == 0, ids == 0)  # person keeps id 0
        np.testing.assert_array_equal(label == 255, ids == 255)
        np.testing.assert_array_equal(label[ids == 181], 170)  # wood
    item = dm.train_set[0]
    assert item["image"].shape == (3, 512, 512) and item["label"].shape == (512, 512)
    assert_geometry_aligned(load_sample(dm.val_set.samples[0])[1], (2048, 512), 512, seed=1)
