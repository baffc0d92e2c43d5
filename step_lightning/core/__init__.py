"""The bottom layer: errors, constants and small utilities every other part may import."""

from step_lightning.core.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, PATCH_SIZE
from step_lightning.core.errors import ConfigError

__all__ = ["IGNORE_INDEX", "IMAGENET_MEAN", "IMAGENET_STD", "PATCH_SIZE", "ConfigError"]
