"""Discovery, pairing, label conventions and error messages of the folder datamodules (tiny tmp datasets)."""

import numpy as np
import pytest
import torch
from PIL import Image

from step_lightning.core import ConfigError
from step_lightning.data.ade20k import ADE20KDataModule
from step_lightning.data.cityscapes import CityscapesDataModule
from step_lightning.data.cocostuff import CocoStuff10kDataModule, CocoStuff164kDataModule
from step_lightning.data.labels import CITYSCAPES_LABELIDS, COCO164K_LABELS
from tests.data_builders import (
    SIZE,
    make_ade,
    make_cityscapes,
    make_coco10k,
    make_coco164k,
    random_label,
    write_image,
    write_label,
)

CROP = 32


def raw(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_ade20k_discovery_and_items(tmp_path):
    root = make_ade(tmp_path)
    dm = ADE20KDataModule(root, crop_size=CROP, batch_size=2)
    dm.setup()
    assert [s.name for s in dm.val_set.samples] == ["ADE_valid_00000000", "ADE_valid_00000001"]
    assert len(dm.train_set) == 3 and dm.num_classes == 150 and dm.ignore_index == 255
    item = dm.val_set[1]
    assert item["name"] == "ADE_valid_00000001"
    assert item["image"].shape == (3, CROP, round(SIZE[1] * CROP / SIZE[0])) and item["image"].dtype == torch.float32
    label = raw(root / "annotations" / "validation" / "ADE_valid_00000001.png").astype(np.int64)
    np.testing.assert_array_equal(item["label"].numpy(), np.where(label == 0, 255, label - 1))
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, CROP, CROP) and batch["label"].shape == (2, CROP, CROP)
    assert batch["label"].dtype == torch.int64 and int(batch["label"].max()) <= 255
    assert set(batch["label"].unique().tolist()) <= set(range(150)) | {255}


def test_coco10k_reduce_zero_label(tmp_path):
    root = make_coco10k(tmp_path)
    dm = CocoStuff10kDataModule(root, crop_size=CROP)
    dm.setup("validate")
    sample = dm.val_set.samples[0]
    assert sample.name == "COCO_test2014_000000000000"
    label = raw(sample.label).astype(np.int64)
    np.testing.assert_array_equal(dm.val_set[0]["label"].numpy(), np.where(label == 0, 255, label - 1))


def test_coco164k_stuffthingmaps(tmp_path):
    root = make_coco164k(tmp_path)
    dm = CocoStuff164kDataModule(root, crop_size=CROP)
    dm.setup("validate")
    label = raw(dm.val_set.samples[1].label)
    out = dm.val_set[1]["label"].numpy()
    np.testing.assert_array_equal(out, COCO164K_LABELS.lut[label])
    assert ((label == 255) == (out == 255)).sum() > 0 and (out[label == 12] == 11).all()  # stop sign
    assert (out[label == 11] == 255).all()  # an unused id


@pytest.mark.parametrize("source", ["auto", "trainids", "labelids"])
def test_cityscapes_label_sources_agree(tmp_path, source):
    root = make_cityscapes(tmp_path)
    dm = CityscapesDataModule(root, crop_size=CROP, label_source=source)
    dm.setup("validate")
    assert [s.name for s in dm.val_set.samples] == ["aachen_000000_000019", "bremen_000001_000019"]
    suffix = "_gtFine_labelIds.png" if source == "labelids" else "_gtFine_labelTrainIds.png"
    assert all(s.label.endswith(suffix) for s in dm.val_set.samples)
    ids = raw(root / "gtFine" / "val" / "aachen" / "aachen_000000_000019_gtFine_labelIds.png")
    np.testing.assert_array_equal(dm.val_set[0]["label"].numpy(), CITYSCAPES_LABELIDS.lut[ids])
    assert dm.base_scale == (2048, 1024)


def test_cityscapes_auto_falls_back_per_image(tmp_path):
    root = make_cityscapes(tmp_path)
    (root / "gtFine" / "val" / "bremen" / "bremen_000001_000019_gtFine_labelTrainIds.png").unlink()
    dm = CityscapesDataModule(root, crop_size=CROP)
    samples = dm.samples("val")
    assert samples[0].label.endswith("_labelTrainIds.png") and samples[1].label.endswith("_labelIds.png")


def test_cityscapes_labelids_only_with_trainids_forced(tmp_path):
    root = make_cityscapes(tmp_path, kinds=("labelIds",))
    assert len(CityscapesDataModule(root).samples("train")) == 4  # auto maps labelIds
    with pytest.raises(ConfigError, match=r"(?s)4 image\(s\).*have no label.*label_source=auto"):
        CityscapesDataModule(root, label_source="trainids").samples("train")


def test_grayscale_and_rgba_images_become_rgb(tmp_path):
    root = make_ade(tmp_path, {"validation": 2})
    images = root / "images" / "validation"
    write_image(images / "ADE_valid_00000000.jpg", SIZE, mode="L")
    rgba = Image.fromarray(np.full((*SIZE, 4), (10, 200, 30, 0), np.uint8), mode="RGBA")
    rgba.save(images / "ADE_valid_00000001.jpg".replace(".jpg", ".png"))
    (images / "ADE_valid_00000001.jpg").unlink()
    (images / "ADE_valid_00000001.png").rename(images / "ADE_valid_00000001.jpg")  # PNG bytes, .jpg name
    dm = ADE20KDataModule(root, crop_size=CROP, mean=(0, 0, 0), std=(1, 1, 1))
    dm.setup("validate")
    gray = dm.val_set[0]["image"]
    assert gray.shape[0] == 3 and torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    color = dm.val_set[1]["image"]
    assert color.shape[0] == 3 and color[:, 5, 5].tolist() == [10.0, 200.0, 30.0]  # alpha dropped


def test_train_loader_is_reproducible_with_workers(tmp_path):
    root = make_ade(tmp_path, {"training": 4, "validation": 1})

    def first_batch():
        dm = ADE20KDataModule(root, crop_size=16, batch_size=4, num_workers=2, seed=3)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))

    a, b = first_batch(), first_batch()
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_test_split_and_eval_dataloader(tmp_path):
    root = make_ade(tmp_path)
    dm = ADE20KDataModule(root, split="training", crop_size=768)
    dm.setup("test")
    assert len(dm.test_dataloader()) == 3
    assert len(dm.eval_dataloader()) == 3 and len(dm.eval_dataloader("validation")) == 2


# ---- errors: each names the file or setting and the fix -------------------------------------------------


def test_missing_root(tmp_path):
    with pytest.raises(ConfigError, match=r"data.root=.*nowhere does not exist.*DATA_ROOT"):
        ADE20KDataModule(tmp_path / "nowhere").setup()


def test_root_one_level_too_high_suggests_dataset_folder(tmp_path):
    root = make_ade(tmp_path)
    with pytest.raises(ConfigError, match=rf"Found it at {root}: set data.root={root}\."):
        ADE20KDataModule(tmp_path).setup()


def test_root_one_level_too_low_suggests_parent(tmp_path):
    root = make_ade(tmp_path)
    with pytest.raises(ConfigError, match=rf"Found it at {root}: set data.root={root}\."):
        ADE20KDataModule(root / "images").setup()


def test_missing_split_lists_the_present_ones(tmp_path):
    root = make_ade(tmp_path, {"training": 1})
    with pytest.raises(ConfigError, match=r"split 'validation' not found.*\['training'\]; set data.val_split"):
        ADE20KDataModule(root).setup("validate")


def test_image_without_label_and_label_without_image(tmp_path):
    root = make_ade(tmp_path, {"validation": 3})
    (root / "annotations" / "validation" / "ADE_valid_00000001.png").unlink()
    write_label(root / "annotations" / "validation" / "ADE_extra.png", random_label([1], 0))
    with pytest.raises(ConfigError) as err:
        ADE20KDataModule(root).setup("validate")
    message = str(err.value)
    assert "1 image(s) in images/validation have no label" in message and "ADE_valid_00000001.jpg" in message
    assert "1 label(s) in annotations/validation have no image" in message and "ADE_extra.png" in message


def test_cityscapes_labels_without_images(tmp_path):
    root = make_cityscapes(tmp_path)
    for image in (root / "leftImg8bit" / "val").rglob("*.png"):
        image.unlink()
    with pytest.raises(ConfigError, match=r"2 label\(s\) in gtFine/val have no image"):
        CityscapesDataModule(root).setup("validate")


def test_empty_split(tmp_path):
    root = make_ade(tmp_path, {"validation": 0})
    (root / "images" / "validation").mkdir(parents=True)
    (root / "annotations" / "validation").mkdir(parents=True)
    with pytest.raises(ConfigError, match="split 'validation': no files found"):
        ADE20KDataModule(root).setup("validate")


def test_corrupt_image_is_named(tmp_path):
    root = make_ade(tmp_path, {"validation": 1})
    bad = root / "images" / "validation" / "ADE_valid_00000000.jpg"
    bad.write_bytes(b"not a jpeg")
    dm = ADE20KDataModule(root)
    dm.setup("validate")  # layout is fine; the file fails when read
    with pytest.raises(ConfigError, match=rf"{bad}: cannot read this image.*re-download"):
        dm.val_set[0]


def test_truncated_label_is_named(tmp_path):
    root = make_ade(tmp_path, {"validation": 1})
    bad = root / "annotations" / "validation" / "ADE_valid_00000000.png"
    bad.write_bytes(bad.read_bytes()[:60])
    dm = ADE20KDataModule(root)
    dm.setup("validate")
    with pytest.raises(ConfigError, match=rf"{bad}: cannot read this label"):
        dm.val_set[0]


def test_label_out_of_range_is_named(tmp_path):
    root = make_coco164k(tmp_path, {"val2017": 1})
    bad = root / "stuffthingmaps_trainval2017" / "val2017" / "000000000000.png"
    write_label(bad, random_label([0, 200], 0))
    dm = CocoStuff164kDataModule(root)
    dm.setup("test")
    with pytest.raises(ConfigError, match=rf"{bad}: label values 200 are outside.*0..181"):
        dm.test_set[0]


def test_colour_label_is_rejected(tmp_path):
    root = make_ade(tmp_path, {"validation": 1})
    label = root / "annotations" / "validation" / "ADE_valid_00000000.png"
    write_image(label, SIZE)
    dm = ADE20KDataModule(root)
    dm.setup("validate")
    with pytest.raises(ConfigError, match=rf"{label}: label image has mode RGB.*single-channel"):
        dm.val_set[0]


def test_image_label_size_mismatch(tmp_path):
    root = make_ade(tmp_path, {"validation": 1})
    write_label(root / "annotations" / "validation" / "ADE_valid_00000000.png", random_label([1], 0, (5, 5)))
    dm = ADE20KDataModule(root)
    dm.setup("validate")
    with pytest.raises(ConfigError, match="is 40x24 but its label .* is 5x5"):
        dm.val_set[0]


def test_raw_coco10k_release_points_to_the_script(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    (tmp_path / "imageLists").mkdir()
    with pytest.raises(ConfigError, match="python scripts/prepare_cocostuff10k.py"):
        CocoStuff10kDataModule(tmp_path).setup("validate")


def test_config_mistakes():
    with pytest.raises(ConfigError, match="label_source='ids'"):
        CityscapesDataModule("x", label_source="ids")
    with pytest.raises(ConfigError, match="num_classes: 150"):
        ADE20KDataModule("x", num_classes=151)


def test_images_are_read_as_a_viewer_shows_them(tmp_path):
    """A phone's portrait photo is stored sideways with EXIF orientation 6 (turn 90 degrees clockwise to show):
    the dataset, the prediction API and the prediction command (both read_image / as_rgb) see it upright, so
    a label drawn on the upright photo fits it."""
    from step_lightning.api.images import as_rgb
    from step_lightning.data.dataset import load_sample
    from step_lightning.data.folders import Sample
    from step_lightning.data.io import read_image

    stored = np.zeros((16, 32, 3), np.uint8)  # 32 wide, 16 high, as the sensor wrote it
    stored[:, :16] = (250, 10, 10)  # left half red, right half blue
    stored[:, 16:] = (10, 10, 250)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    Image.fromarray(stored).save(tmp_path / "photo.jpg", exif=exif, quality=100)
    for image in (read_image(tmp_path / "photo.jpg"), as_rgb(tmp_path / "photo.jpg"),
                  as_rgb(Image.open(tmp_path / "photo.jpg"))):
        assert image.shape == (32, 16, 3)  # upright: 16 wide, 32 high, red on top (JPEG blurs the seam)
        top, bottom = image[:12].reshape(-1, 3).mean(0), image[20:].reshape(-1, 3).mean(0)
        assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]
    label = np.zeros((32, 16), np.uint8)  # drawn on the upright photo: class 1 on top
    label[:16] = 1
    Image.fromarray(label).save(tmp_path / "photo.png")
    from step_lightning.data.labels import class_index_labels

    labels = class_index_labels(2, reduce_zero_label=False, ignore_value=255, fix="")
    sample = Sample(str(tmp_path / "photo.jpg"), str(tmp_path / "photo.png"), "photo", labels)
    image, read_label = load_sample(sample)
    assert image.shape[:2] == read_label.shape == (32, 16)
