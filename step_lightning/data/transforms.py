"""mmsegmentation's standard segmentation pipelines on numpy arrays (RGB uint8 image, uint8 label).

Training: RandomResize (keep ratio, ratio of a base scale) -> RandomCrop (cat_max_ratio) -> flip ->
PhotoMetricDistortion -> Normalize -> Pad. albumentations supplies the steps whose semantics equal
mmseg's (flip, normalise, pad); the others are small albumentations transforms written here, so the whole
pipeline shares one seeded random state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.core.type_definitions import Targets

from step_lightning.core import IGNORE_INDEX


def rescale_size(width: int, height: int, scale: Sequence[int]) -> tuple[int, int]:
    """mmcv.imrescale's keep-ratio output (width, height): the largest size fitting (long, short) = scale."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(width * factor + 0.5), int(height * factor + 0.5)


class RandomRescale(A.DualTransform):
    """mmseg ``RandomResize(scale=base_scale, ratio_range, keep_ratio=True)``.

    r ~ U(ratio_range); target scale (int(long*r), int(short*r)); the image is resized bilinearly by
    min(target long / long side, target short / short side), the label with nearest neighbour.
    """

    _targets = (Targets.IMAGE, Targets.MASK)

    def __init__(self, base_scale: Sequence[int], ratio_range: Sequence[float], p: float = 1.0):
        super().__init__(p=p)
        self.base_scale = tuple(base_scale)
        self.ratio_range = tuple(ratio_range)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        ratio = self.random_generator.uniform(*self.ratio_range)
        scale = (int(self.base_scale[0] * ratio), int(self.base_scale[1] * ratio))
        return {"size": rescale_size(width, height, scale)}

    def apply(self, img: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        return cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        return cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)


class CatMaxRatioCrop(A.DualTransform):
    """mmseg ``RandomCrop(crop_size, cat_max_ratio)``.

    A uniformly placed crop (clipped to the image when the image is smaller) is accepted when, ignoring
    ``ignore_index``, it holds more than one class and the largest covers < cat_max_ratio of its pixels;
    otherwise another is drawn, up to ``tries`` times, and the last one drawn is kept.
    """

    _targets = (Targets.IMAGE, Targets.MASK)

    def __init__(self, size: int, cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX, tries: int = 10):
        super().__init__(p=1.0)
        self.size = size
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index
        self.tries = tries

    def _random_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        top = int(self.random_generator.integers(0, max(height - self.size, 0) + 1))
        left = int(self.random_generator.integers(0, max(width - self.size, 0) + 1))
        return top, left, top + self.size, left + self.size

    def acceptable(self, crop: np.ndarray) -> bool:
        counts = np.bincount(crop.ravel(), minlength=256)
        counts[self.ignore_index] = 0
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        mask = data["mask"]
        box = self._random_box(*mask.shape[:2])
        if self.cat_max_ratio < 1.0:
            for _ in range(self.tries):
                if self.acceptable(mask[box[0] : box[2], box[1] : box[3]]):
                    break
                box = self._random_box(*mask.shape[:2])
        return {"box": box}

    def apply(self, img: np.ndarray, box: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        return img[box[0] : box[2], box[1] : box[3]]

    def apply_to_mask(self, mask: np.ndarray, box: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        return mask[box[0] : box[2], box[1] : box[3]]


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


class PhotoMetricDistortion(A.ImageOnlyTransform):
    """mmseg ``PhotoMetricDistortion``: each step with p = 0.5; contrast before or after the HSV steps.

    RGB->HSV here equals mmseg's BGR->HSV on its BGR images. The hue shift is drawn like mmseg's
    ``numpy.random.randint(-hue_delta, hue_delta)``, i.e. in [-hue_delta, hue_delta - 1].
    """

    def __init__(
        self,
        brightness_delta: float = 32,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_delta: int = 18,
    ):
        super().__init__(p=1.0)
        self.brightness_delta = brightness_delta
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_delta = hue_delta

    def get_params(self) -> dict[str, Any]:
        rng = self.random_generator

        def coin() -> bool:
            return bool(rng.integers(2))

        return {
            "brightness": rng.uniform(-self.brightness_delta, self.brightness_delta) if coin() else None,
            "contrast_first": coin(),
            "contrast": rng.uniform(*self.contrast_range) if coin() else None,
            "saturation": rng.uniform(*self.saturation_range) if coin() else None,
            "hue": int(rng.integers(-self.hue_delta, self.hue_delta)) if coin() else None,
        }

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        keys = ("brightness", "contrast", "contrast_first", "saturation", "hue")
        return photometric_distortion(img, **{k: params[k] for k in keys})


class TrainTransform:
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
        self.seed = seed
        self.compose = A.Compose(
            [
                RandomRescale(base_scale, scale_range),
                CatMaxRatioCrop(crop_size, cat_max_ratio, ignore_index),
                A.HorizontalFlip(p=0.5),
                PhotoMetricDistortion(),
                A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=1.0),
                # mmseg pads after normalising: padded pixels are 0 in normalised space, labels ignore.
                A.PadIfNeeded(
                    min_height=crop_size,
                    min_width=crop_size,
                    position="top_left",
                    border_mode=cv2.BORDER_CONSTANT,
                    fill=0,
                    fill_mask=ignore_index,
                ),
            ],
            seed=seed,
        )

    def reseed(self, *entropy: int) -> None:
        """Derive a fresh random stream from the base seed and e.g. (rank, worker seed)."""
        state = np.random.SeedSequence([self.seed, *entropy]).generate_state(1)[0]
        self.compose.set_random_seed(int(state))

    def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.compose(image=image, mask=label)
        return out["image"], out["mask"]


class EvalTransform:
    """Resize the image so its short side is ``crop_size`` (keep ratio, bilinear) and normalise it;
    the label stays at the original resolution (evaluation is done there)."""

    def __init__(self, crop_size: int, mean: Sequence[float], std: Sequence[float]):
        self.crop_size = crop_size
        self.normalize = A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=1.0, p=1.0)

    def reseed(self, *entropy: int) -> None:
        """Deterministic: nothing to seed."""

    def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        height, width = image.shape[:2]
        factor = self.crop_size / min(height, width)
        size = (int(width * factor + 0.5), int(height * factor + 0.5))
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        return self.normalize(image=image)["image"], label
