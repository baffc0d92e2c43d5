"""Constants shared by data, tokens and models."""

PATCH_SIZE = 16  # ViT/16: one token per 16x16 px patch
IGNORE_INDEX = 255  # label value excluded from losses and metrics

# mmseg's ImageNet statistics on the 0..255 scale (the configs pass the backbone's own).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
