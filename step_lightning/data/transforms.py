"""mmsegmentation's standard segmentation pipelines on numpy arrays (RGB uint8 image, uint8 label).

Training: RandomResize (keep ratio, ratio of a base scale) -> RandomCrop (cat_max_ratio) -> flip ->
PhotoMetricDistortion -> Normalize -> Pad. Testing: keep-ratio Resize to the test scale -> Normalize. The dCTS
policy's training data follow CTS's ``policynet`` datasets instead (``WholeImageTransform``,
``EvalScaleCropTransform``). Each step is a callable ``(image, label, rng) -> (image, label)``;
a ``Compose`` hands all of them its one seeded ``numpy.random.Generator``, so a pipeline is reproducible
from its seed and reseedable per rank and worker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np

from step_lightning.core import IGNORE_INDEX

Step = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


TEST_LONG_SIDE = 2048  # mmseg's test scale is (2048, crop) for ADE20K and COCO-Stuff, (2048, 1024) for Cityscapes


def rescale_size(width: int, height: int, scale: Sequence[int]) -> tuple[int, int]:
    """mmcv.imrescale's keep-ratio output (width, height): the largest size fitting (long, short) = scale."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def protocol_scale(crop_size: int, scale: Sequence[int] | None = None) -> tuple[int, int]:
    """mmseg's keep-ratio test scale (long, short): ``scale`` where the dataset sets one (Cityscapes:
    (2048, 1024) whatever the crop), else (2048, crop_size): the short side becomes the crop, the long side
    at most 2048 px."""
    return (int(max(scale)), int(min(scale))) if scale else (TEST_LONG_SIDE, int(crop_size))


class KeepRatioResize:
    """mmseg's test ``Resize(scale, keep_ratio=True)`` as a training step: image bilinear, label nearest."""

    def __init__(self, scale: Sequence[int]):
        self.scale = tuple(scale)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        size = rescale_size(image.shape[1], image.shape[0], self.scale)
        if size == (image.shape[1], image.shape[0]):
            return image, label
        return (cv2.resize(image, size, interpolation=cv2.INTER_LINEAR),
                cv2.resize(label, size, interpolation=cv2.INTER_NEAREST))


class RandomRescale:
    """mmseg ``RandomResize(scale=base_scale, ratio_range, keep_ratio=True)``.

    r ~ U(ratio_range); target scale (int(long*r), int(short*r)); the image is resized bilinearly by
    min(target long / long side, target short / short side), the label with nearest neighbour.
    """

    def __init__(self, base_scale: Sequence[int], ratio_range: Sequence[float]):
        self.base_scale = tuple(base_scale)
        self.ratio_range = tuple(ratio_range)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        ratio = rng.uniform(*self.ratio_range)
        scale = (int(self.base_scale[0] * ratio), int(self.base_scale[1] * ratio))
        size = rescale_size(image.shape[1], image.shape[0], scale)
        return (
            cv2.resize(image, size, interpolation=cv2.INTER_LINEAR),
            cv2.resize(label, size, interpolation=cv2.INTER_NEAREST),
        )


class CatMaxRatioCrop:
    """mmseg ``RandomCrop(crop_size, cat_max_ratio)``.

    A uniformly placed crop (clipped to the image when the image is smaller) is accepted when, ignoring
    ``ignore_index``, it holds more than one class and the largest covers < cat_max_ratio of its pixels;
    otherwise another is drawn, up to ``tries`` times, and the last one drawn is kept.
    """

    def __init__(self, size: int, cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX, tries: int = 10):
        self.size = size
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index
        self.tries = tries

    def _random_box(self, rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int]:
        top = int(rng.integers(0, max(height - self.size, 0) + 1))
        left = int(rng.integers(0, max(width - self.size, 0) + 1))
        return top, left, top + self.size, left + self.size

    def acceptable(self, crop: np.ndarray) -> bool:
        counts = np.bincount(crop.ravel(), minlength=256)
        counts[self.ignore_index] = 0
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        top, left, bottom, right = self._random_box(rng, *label.shape[:2])
        if self.cat_max_ratio < 1.0:
            for _ in range(self.tries):
                if self.acceptable(label[top:bottom, left:right]):
                    break
                top, left, bottom, right = self._random_box(rng, *label.shape[:2])
        return image[top:bottom, left:right], label[top:bottom, left:right]


class HorizontalFlip:
    """Mirror image and label left-right with probability ``p`` (mmseg ``RandomFlip(prob=0.5)``)."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if rng.random() < self.p:
            return cv2.flip(image, 1), cv2.flip(label, 1)
        return image, label


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    # mmseg's convert: float arithmetic, clip to [0, 255], truncate back to uint8.
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(
    img: np.ndarray,
    brightness: float | None,
    contrast: float | None,
    contrast_first: bool,
    saturation: float | None,
    hue: int | None,
) -> np.ndarray:
    """mmseg's PhotoMetricDistortion with its random draws given; None skips a step."""
    if brightness is not None:
        img = _convert(img, beta=brightness)
    if contrast_first and contrast is not None:
        img = _convert(img, alpha=contrast)
    if saturation is not None:
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=saturation)
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if hue is not None:
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + hue) % 180  # OpenCV uint8 hue is 0..179
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if not contrast_first and contrast is not None:
        img = _convert(img, alpha=contrast)
    return img


class PhotoMetricDistortion:
    """mmseg ``PhotoMetricDistortion``: each step with p = 0.5; contrast before or after the HSV steps.

    RGB->HSV here equals mmseg's BGR->HSV on its BGR images. The hue shift is drawn like mmseg's
    ``numpy.random.randint(-hue_delta, hue_delta)``, i.e. in [-hue_delta, hue_delta - 1]. The label is
    left as it is.
    """

    def __init__(
        self,
        brightness_delta: float = 32,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_delta: int = 18,
    ):
        self.brightness_delta = brightness_delta
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_delta = hue_delta

    def draw(self, rng: np.random.Generator) -> dict:
        """The random arguments of ``photometric_distortion`` for one image."""

        def coin() -> bool:
            return bool(rng.integers(2))

        return {
            "brightness": rng.uniform(-self.brightness_delta, self.brightness_delta) if coin() else None,
            "contrast_first": coin(),
            "contrast": rng.uniform(*self.contrast_range) if coin() else None,
            "saturation": rng.uniform(*self.saturation_range) if coin() else None,
            "hue": int(rng.integers(-self.hue_delta, self.hue_delta)) if coin() else None,
        }

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return photometric_distortion(image, **self.draw(rng)), label


class Normalize:
    """(image - mean) / std per channel as float32, looked up in a 256-entry table (images are uint8 RGB;
    the lookup is an order of magnitude faster than the arithmetic)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        values = np.arange(256, dtype=np.float32)[:, None]
        table = (values - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
        self.table = table.reshape(256, 1, 3)  # one 3-channel entry per value, the layout cv2.LUT takes

    def apply(self, image: np.ndarray) -> np.ndarray:
        return cv2.LUT(image, self.table)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return self.apply(image), label


class PadToSize:
    """Pad bottom and right up to ``size`` x ``size``: the image with 0, the label with ``ignore_index``.

    mmseg pads after normalising, so padded pixels are 0 in normalised space.
    """

    def __init__(self, size: int, ignore_index: int = IGNORE_INDEX):
        self.size = size
        self.ignore_index = ignore_index

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        bottom, right = max(self.size - label.shape[0], 0), max(self.size - label.shape[1], 0)
        if bottom or right:
            image = np.pad(image, ((0, bottom), (0, right), (0, 0)))
            label = np.pad(label, ((0, bottom), (0, right)), constant_values=self.ignore_index)
        return image, label


class Compose:
    """Steps applied in order, all drawing from one generator seeded with ``seed``."""

    def __init__(self, steps: Sequence[Step], seed: int = 0):
        self.steps = list(steps)
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def reseed(self, *entropy: int) -> None:
        """Derive a fresh random stream from the base seed and e.g. (rank, worker seed)."""
        state = np.random.SeedSequence([self.seed, *entropy]).generate_state(1)[0]
        self.rng = np.random.default_rng(int(state))

    def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        for step in self.steps:
            image, label = step(image, label, self.rng)
        return image, label


class TrainTransform(Compose):
    """(image uint8 RGB, label uint8) -> (normalised float32 [crop, crop, 3], uint8 [crop, crop])."""

    def __init__(
        self,
        crop_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        scale_range: Sequence[float] = (0.5, 2.0),
        base_scale: Sequence[int] = (2048, 512),
        cat_max_ratio: float = 0.75,
        ignore_index: int = IGNORE_INDEX,
        seed: int = 0,
    ):
        steps = [
            RandomRescale(base_scale, scale_range),
            CatMaxRatioCrop(crop_size, cat_max_ratio, ignore_index),
            HorizontalFlip(0.5),
            PhotoMetricDistortion(),
            Normalize(mean, std),
            PadToSize(crop_size, ignore_index),
        ]
        super().__init__(steps, seed)


class ResizeTo:
    """Image bilinear and label nearest to ``size`` x ``size``, aspect ratio not kept (CTS's policy data)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        shape = (self.size, self.size)
        return (cv2.resize(image, shape, interpolation=cv2.INTER_LINEAR),
                cv2.resize(label, shape, interpolation=cv2.INTER_NEAREST))


class WholeImageTransform(Compose):
    """CTS's ADE20K policy data (``policynet/policynet/data_ade20k.py``): the whole image resized to
    ``size`` x ``size`` (ratio not kept), flipped, normalised."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], seed: int = 0):
        super().__init__([ResizeTo(size), HorizontalFlip(0.5), Normalize(mean, std)], seed)


class EvalScaleCropTransform(Compose):
    """CTS's Cityscapes policy data (``policynet/policynet/data_cityscapes.py``): a uniformly placed
    ``size`` x ``size`` crop of the image at the test scale (Cityscapes: its own 2048x1024, no resize), so
    the policy learns windows of the size in pixels it scores; flipped, normalised, padded (label: ignore)
    where the image is smaller."""

    def __init__(self, size: int, scale: Sequence[int], mean: Sequence[float], std: Sequence[float],
                 ignore_index: int = IGNORE_INDEX, seed: int = 0):
        steps = [KeepRatioResize(scale), CatMaxRatioCrop(size, cat_max_ratio=1.0), HorizontalFlip(0.5),
                 Normalize(mean, std), PadToSize(size, ignore_index)]
        super().__init__(steps, seed)


class EvalTransform:
    """mmseg's test ``Resize(scale, keep_ratio=True)`` (``protocol_scale``), bilinear, then normalise; the label
    stays at the original resolution (evaluation is done there)."""

    def __init__(
        self, crop_size: int, mean: Sequence[float], std: Sequence[float], scale: Sequence[int] | None = None
    ):
        self.crop_size = crop_size
        self.scale = protocol_scale(crop_size, scale)
        self.normalize = Normalize(mean, std)

    def reseed(self, *entropy: int) -> None:
        """Deterministic: nothing to seed."""

    def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        height, width = image.shape[:2]
        size = rescale_size(width, height, self.scale)
        if size != (width, height):
            image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        return self.normalize.apply(image), label
