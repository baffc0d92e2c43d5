"""The mmseg training/eval pipelines against their definitions."""

import cv2
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from step_lightning.data.transforms import (
    CatMaxRatioCrop,
    Compose,
    EvalScaleCropTransform,
    EvalTransform,
    HorizontalFlip,
    KeepRatioResize,
    Normalize,
    PhotoMetricDistortion,
    RandomRescale,
    TrainTransform,
    photometric_distortion,
    protocol_scale,
    rescale_size,
)

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def block_label(height: int, width: int, block: int = 12, classes: int = 6, seed: int = 0) -> np.ndarray:
    """Blocks of random classes, so that crops mix classes and alignment errors show."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, classes, (-(-height // block), -(-width // block)), dtype=np.uint8)
    return np.kron(small, np.ones((block, block), np.uint8))[:height, :width]


def assert_aligned(image_channel: np.ndarray, label: np.ndarray, scale: int) -> int:
    """Where the label is constant over a 5x5 window, the image (label*scale before any resize) agrees.

    Pixels within 2 of the border are skipped: a class edge just outside a crop can blend into them.
    """
    windows = sliding_window_view(np.pad(label, 2, constant_values=254), (5, 5))
    interior = windows.min(axis=(-1, -2)) == windows.max(axis=(-1, -2))
    interior &= label != 255
    np.testing.assert_array_equal(image_channel[interior], label[interior].astype(int) * scale)
    return int(interior.sum())  # pixels checked


def test_rescale_size_matches_mmcv_imrescale():
    assert rescale_size(683, 512, (2048, 512)) == (683, 512)
    assert rescale_size(683, 512, (1024, 256)) == (342, 256)  # int(341.5 + 0.5)
    assert rescale_size(4000, 500, (2048, 512)) == (2048, 256)  # long side binds
    assert rescale_size(2048, 1024, (4096, 2048)) == (4096, 2048)
    assert rescale_size(500, 364, (2048, 512)) == (703, 512)


@pytest.mark.parametrize("ratio", [0.5, 1.0, 1.75])
def test_random_rescale_size_and_label_nearest(ratio):
    label = block_label(60, 90)
    image = np.repeat(label[..., None] * 40, 3, axis=-1)
    out_image, out_label = Compose([RandomRescale((200, 80), (ratio, ratio))], seed=0)(image, label)
    width, height = rescale_size(90, 60, (int(200 * ratio), int(80 * ratio)))
    assert out_image.shape == (height, width, 3) and out_label.shape == (height, width)
    assert set(np.unique(out_label)) <= set(np.unique(label))  # nearest: no new values
    assert assert_aligned(out_image[..., 0], out_label, 40) > 0.1 * out_label.size


def test_random_rescale_ratio_is_drawn_in_range():
    t = Compose([RandomRescale((2048, 512), (0.5, 2.0))], seed=3)
    label = np.zeros((512, 512), np.uint8)
    sides = {t(np.zeros((512, 512, 3), np.uint8), label)[1].shape[0] for _ in range(40)}
    assert min(sides) >= 256 and max(sides) <= 1024 and len(sides) > 20


def crop_with_count(label: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, int]:
    crop = CatMaxRatioCrop(size)
    calls = []
    draw = crop._random_box
    crop._random_box = lambda rng, h, w: calls.append(1) or draw(rng, h, w)
    _, out = Compose([crop], seed=seed)(np.zeros((*label.shape, 3), np.uint8), label)
    return out, len(calls)


def test_cat_max_ratio_acceptance_rule():
    crop = CatMaxRatioCrop(4)
    assert not crop.acceptable(np.array([0, 0, 0, 1], np.uint8))  # 0.75 is not < 0.75
    assert crop.acceptable(np.array([0, 0, 1, 1], np.uint8))
    assert crop.acceptable(np.array([0, 0, 1, 255, 255, 255], np.uint8))  # ignore pixels do not count
    assert not crop.acceptable(np.array([3, 255, 255], np.uint8))  # a single class is never accepted
    assert not crop.acceptable(np.full(4, 255, np.uint8))


def test_cat_max_ratio_retries_ten_times_then_keeps_last():
    _, calls = crop_with_count(np.zeros((40, 40), np.uint8), 16, seed=0)
    assert calls == 11  # first draw + 10 retries (mmseg)
    _, calls = crop_with_count(block_label(40, 40, block=2), 16, seed=0)
    assert calls == 1


def test_cat_max_ratio_retries_raise_the_share_of_balanced_crops():
    # Columns 0..49 class 0, 50..99 class 1: a 32-wide crop at x is balanced enough (max share < 0.75)
    # for x in 27..41, i.e. 15 of the 69 positions (22 %); 11 draws make it 1 - 0.78**11 = 93 %.
    label = np.zeros((32, 100), np.uint8)
    label[:, 50:] = 1
    crop = CatMaxRatioCrop(32)
    accepted = [crop.acceptable(crop_with_count(label, 32, seed)[0]) for seed in range(200)]
    assert 0.86 < np.mean(accepted) < 0.98


def test_crop_of_small_image_keeps_it_whole():
    label = block_label(10, 20)
    out, _ = crop_with_count(label, 32, seed=0)
    np.testing.assert_array_equal(out, label)


def test_photometric_brightness_and_contrast_follow_mmseg_convert():
    img = np.array([[[3, 100, 250]]], np.uint8)
    np.testing.assert_array_equal(photometric_distortion(img, -5.5, None, True, None, None), [[[0, 94, 244]]])
    np.testing.assert_array_equal(photometric_distortion(img, 10.7, None, True, None, None), [[[13, 110, 255]]])
    np.testing.assert_array_equal(photometric_distortion(img, None, 1.5, True, None, None), [[[4, 150, 255]]])


def test_photometric_hue_in_opencv_units():
    red = np.array([[[255, 0, 0]]], np.uint8)
    np.testing.assert_array_equal(photometric_distortion(red, None, None, True, None, 60), [[[0, 255, 0]]])
    shifted = photometric_distortion(red, None, None, True, None, -18)
    assert cv2.cvtColor(shifted, cv2.COLOR_RGB2HSV)[0, 0, 0] == 162  # wraps modulo 180


def test_photometric_saturation_scales_hsv_s():
    img = np.array([[[200, 100, 100]]], np.uint8)
    s_before = int(cv2.cvtColor(img, cv2.COLOR_RGB2HSV)[0, 0, 1])
    out = photometric_distortion(img, None, None, True, 0.5, None)
    assert abs(int(cv2.cvtColor(out, cv2.COLOR_RGB2HSV)[0, 0, 1]) - s_before // 2) <= 1


def test_photometric_contrast_position():
    img = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    first = photometric_distortion(img, None, 1.4, True, 0.6, None)
    last = photometric_distortion(img, None, 1.4, False, 0.6, None)
    np.testing.assert_array_equal(
        first,
        photometric_distortion(photometric_distortion(img, None, 1.4, True, None, None), None, None, True, 0.6, None),
    )
    np.testing.assert_array_equal(
        last,
        photometric_distortion(photometric_distortion(img, None, None, True, 0.6, None), None, 1.4, True, None, None),
    )
    assert not np.array_equal(first, last)


def test_photometric_draws_each_step_half_the_time_within_ranges():
    t, rng = PhotoMetricDistortion(), np.random.default_rng(0)
    draws = [t.draw(rng) for _ in range(4000)]
    for key in ("brightness", "contrast", "saturation", "hue"):
        assert 0.46 < np.mean([d[key] is not None for d in draws]) < 0.54
    assert 0.46 < np.mean([d["contrast_first"] for d in draws]) < 0.54
    values = {k: np.array([d[k] for d in draws if d[k] is not None]) for k in ("brightness", "contrast", "hue")}
    assert values["brightness"].min() >= -32 and values["brightness"].max() <= 32
    assert values["contrast"].min() >= 0.5 and values["contrast"].max() <= 1.5
    assert set(values["hue"].tolist()) == set(range(-18, 18))  # numpy randint(-18, 18), as mmseg


def test_train_transform_output_and_padding():
    label = block_label(30, 50)
    image = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    # base scale (50, 30) with ratio 1 keeps the 50x30 image, smaller than the 64 crop: it gets padded.
    t = TrainTransform(64, MEAN, STD, scale_range=(1.0, 1.0), base_scale=(50, 30), seed=1)
    for _ in range(4):
        out_image, out_label = t(image, label)
        assert out_image.shape == (64, 64, 3) and out_image.dtype == np.float32
        assert out_label.shape == (64, 64) and out_label.dtype == np.uint8
        assert (out_image[30:] == 0).all() and (out_image[:, 50:] == 0).all()
        assert (out_label[30:] == 255).all() and (out_label[:, 50:] == 255).all()
        top_left = out_label[:30, :50]
        assert np.array_equal(top_left, label) or np.array_equal(top_left, label[:, ::-1])


def test_train_geometry_keeps_image_and_label_aligned():
    label = block_label(120, 160, block=16, seed=2)
    image = np.repeat(label[..., None] * 40, 3, axis=-1)
    t = TrainTransform(64, (0, 0, 0), (1, 1, 1), base_scale=(160, 64), seed=5)
    t.steps = [step for step in t.steps if not isinstance(step, PhotoMetricDistortion)]
    flip = t.steps[2]
    assert isinstance(flip, HorizontalFlip)
    flips = []

    def recording_flip(image, label, rng):
        out = flip(image, label, rng)
        flips.append(out[1] is not label)  # an unflipped pair passes through as it is
        return out

    t.steps[2] = recording_flip
    checked = 0
    for _ in range(20):
        out_image, out_label = t(image, label)
        assert out_image.shape == (64, 64, 3) and out_label.shape == (64, 64)
        checked += assert_aligned(np.rint(out_image[..., 0]).astype(int), out_label, 40)
    assert 0 < sum(flips) < 20  # both flipped and unflipped samples were checked
    assert checked > 0.2 * 20 * 64 * 64


def test_train_transform_is_reproducible_and_reseedable():
    label = block_label(80, 100)
    image = np.random.default_rng(0).integers(0, 256, (80, 100, 3), dtype=np.uint8)
    a, b = TrainTransform(32, MEAN, STD, seed=4), TrainTransform(32, MEAN, STD, seed=4)
    np.testing.assert_array_equal(a(image, label)[0], b(image, label)[0])
    a.reseed(0), b.reseed(1)
    assert not np.array_equal(a(image, label)[0], b(image, label)[0])


def test_reseed_streams_depend_only_on_seed_and_entropy():
    label = block_label(80, 100)
    image = np.random.default_rng(0).integers(0, 256, (80, 100, 3), dtype=np.uint8)
    a, b = TrainTransform(32, MEAN, STD, seed=4), TrainTransform(32, MEAN, STD, seed=4)
    a(image, label)  # a has used its stream, b has not: reseeding restarts both alike
    a.reseed(1, 7), b.reseed(1, 7)
    np.testing.assert_array_equal(a(image, label)[0], b(image, label)[0])
    c = TrainTransform(32, MEAN, STD, seed=5)
    c.reseed(1, 7)
    b.reseed(1, 7)
    assert not np.array_equal(b(image, label)[0], c(image, label)[0])  # the base seed still counts


def test_normalize_every_value_per_channel_on_a_view():
    values = np.arange(256, dtype=np.uint8)
    image = np.stack([values, values[::-1], np.roll(values, 7)], axis=-1).reshape(16, 16, 3)
    view = image[2:14, ::-1]  # crops and flips hand over non-contiguous views
    expected = (view.astype(np.float64) - MEAN) / STD
    np.testing.assert_allclose(Normalize(MEAN, STD).apply(view), expected, rtol=1e-6, atol=1e-6)


def test_eval_transform_resizes_short_side_and_keeps_label():
    label = block_label(364, 500)
    image = np.full((364, 500, 3), 150, np.uint8)
    out_image, out_label = EvalTransform(512, MEAN, STD)(image, label)
    assert out_image.shape == (512, 703, 3) and out_image.dtype == np.float32
    np.testing.assert_allclose(out_image[0, 0], (150 - np.array(MEAN)) / np.array(STD), rtol=1e-5)
    assert out_label is label
    tall, _ = EvalTransform(512, MEAN, STD)(np.zeros((1000, 300, 3), np.uint8), label)
    assert tall.shape == (1707, 512, 3)  # aspect ratio 3.3: the short side binds


@pytest.mark.parametrize(("crop", "height", "width", "expected"), [
    (512, 100, 1000, (205, 2048)),  # aspect ratio 10 > 4: mmseg caps the long side at 2048 (short side 204.8)
    (640, 150, 600, (512, 2048)),  # ratio 4 > 3.2 at crop 640: 2048 px long, not 2560
    (512, 100, 500, (410, 2048)),  # ratio 5: 2560 px long by the short side alone
])
def test_eval_transform_caps_the_long_side_at_2048(crop, height, width, expected):
    """mmseg's ``Resize(scale=(2048, crop), keep_ratio=True)`` scales by min(2048 / long side, crop / short side)."""
    assert protocol_scale(crop) == (2048, crop)
    out, _ = EvalTransform(crop, MEAN, STD)(np.zeros((height, width, 3), np.uint8), np.zeros((height, width)))
    assert out.shape[:2] == expected
    short_only = round(crop / height * width)
    assert expected[1] < short_only  # the rule the long-side cap replaced would give a wider image


def test_cityscapes_scale_keeps_the_full_frame_whatever_the_crop():
    assert protocol_scale(512, (2048, 1024)) == (2048, 1024) == protocol_scale(1024, (1024, 2048))
    image = np.zeros((1024, 2048, 3), np.uint8)
    for crop in (512, 768, 1024):
        out, _ = EvalTransform(crop, MEAN, STD, scale=(2048, 1024))(image, np.zeros((1024, 2048)))
        assert out.shape[:2] == (1024, 2048)


def test_keep_ratio_resize_moves_image_and_label_together():
    label = block_label(100, 150, block=25)
    image = np.repeat(label[..., None] * 40, 3, axis=-1)
    out_image, out_label = KeepRatioResize((2048, 200))(image, label, np.random.default_rng(0))
    assert out_label.shape == (200, 300) and out_image.shape == (200, 300, 3)
    assert assert_aligned(out_image[..., 0].astype(int), out_label, 40) > 0.5 * out_label.size
    same_image, same_label = KeepRatioResize((150, 100))(image, label, np.random.default_rng(0))
    assert same_image is image and same_label is label


def test_eval_scale_crops_are_unresized_and_aligned():
    """CTS's Cityscapes policy data: crops of the frame at its own resolution (scale = its size), placed
    anywhere, flipped half the time, image and label in register; images smaller than the crop are padded."""
    label = block_label(96, 160, block=8, seed=3)
    image = np.repeat(label[..., None] * 40, 3, axis=-1)
    t = EvalScaleCropTransform(64, (160, 96), (0, 0, 0), (1, 1, 1), seed=2)
    offsets, flipped = set(), 0
    full = np.lib.stride_tricks.sliding_window_view(label, (64, 64))
    for _ in range(30):
        out_image, out_label = t(image, label)
        assert out_image.shape == (64, 64, 3) and out_label.shape == (64, 64)
        np.testing.assert_array_equal(np.rint(out_image[..., 0]).astype(int), out_label.astype(int) * 40)
        for candidate, was_flipped in ((out_label, False), (out_label[:, ::-1], True)):
            found = np.argwhere((full == candidate).all(axis=(-1, -2)))
            if len(found):
                offsets.add(tuple(found[0]))
                flipped += was_flipped
                break
        else:
            raise AssertionError("the crop is not a window of the unresized label")
    assert len(offsets) > 10 and 0 < flipped < 30
    small_image, small_label = EvalScaleCropTransform(64, (40, 30), MEAN, STD)(image[:30, :40], label[:30, :40])
    assert small_image.shape == (64, 64, 3) and (small_label[30:] == 255).all() and (small_label[:, 40:] == 255).all()
