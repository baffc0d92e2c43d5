"""The Cityscapes recipe's policy data on the real Cityscapes samples (../shared/realdata, skipped if absent): the
policy's training targets have the window statistics of the windows the segmenter scores at test time, at every
Cityscapes crop, unlike CTS's 768 crops or whole frames squashed to 512x512 (the former recipe)."""

from __future__ import annotations

import numpy as np
import pytest
from hydra.utils import instantiate

from step_lightning.core.resize import resize_labels
from step_lightning.models.inference import window_starts
from step_lightning.tokens.policy import homogeneity_targets
from tests.data_builders import REALDATA
from tests.helpers import compose_config

ROOT = REALDATA / "cityscapes"
if not ROOT.is_dir():
    pytest.skip(f"no real Cityscapes samples at {ROOT}", allow_module_level=True)

SIZES = (2, 4, 8, 16)
PASSES = 4  # random crops per sample image


def homogeneous_share(labels, exclude_border: bool) -> np.ndarray:
    """Per window size, the share of homogeneous windows (target 1) among those in the loss."""
    positives, counted = np.zeros(len(SIZES)), np.zeros(len(SIZES))
    for label in labels:
        height, width = label.shape
        targets = homogeneity_targets(label[None], (height // 16, width // 16), SIZES, exclude_border=exclude_border)
        for i, size in enumerate(SIZES):
            kept = targets[size] != 255
            positives[i] += int((targets[size][kept] == 1).sum())
            counted[i] += int(kept.sum())
    return positives / counted


def cityscapes_recipe(tmp_path, crop: int):
    """The Cityscapes ViT-B recipe at ``crop`` on the 8 real training frames."""
    cfg = compose_config(["data=cityscapes", "backbone=vit_b", f"crop_size={crop}", f"data.root={ROOT}",
                          "data.train_split=train", "data.val_split=train", "data.num_workers=0"], output_dir=tmp_path)
    return cfg, instantiate(cfg.data)


def policy_labels(datamodule, data: str, size: int) -> list:
    dataset = datamodule.policy_dataloader(data, size, batch_size=1).dataset
    return [dataset[i]["label"] for _ in range(PASSES) for i in range(len(dataset))]


def scored_windows(cfg, datamodule) -> list:
    """The labels of every sliding window the segmenter, and so its policy, scores at test time."""
    dataset = datamodule.eval_dataset("train")
    crop, stride = cfg.eval.crop, cfg.eval.stride
    windows = []
    for i in range(len(dataset)):
        item = dataset[i]
        label = resize_labels(item["label"], item["image"].shape[1:])
        height, width = label.shape
        windows += [label[y : y + crop, x : x + crop]
                    for y in window_starts(height, crop, stride) for x in window_starts(width, crop, stride)]
    return windows


@pytest.fixture(scope="module")
def trained_share(tmp_path_factory) -> np.ndarray:
    """The recipe's policy data, the same at every crop (checked below): 1024 crops of the full frame."""
    cfg, datamodule = cityscapes_recipe(tmp_path_factory.mktemp("policy"), 1024)
    return homogeneous_share(policy_labels(datamodule, cfg.policy_train.data, cfg.policy_train.size),
                             cfg.policy_train.exclude_border)


@pytest.mark.parametrize("crop", [1024, 768, 512])
def test_cityscapes_policy_trains_on_the_window_statistics_it_scores(tmp_path, trained_share, crop):
    cfg, datamodule = cityscapes_recipe(tmp_path, crop)
    policy = cfg.policy_train
    assert (policy.data, policy.size, policy.exclude_border) == ("crops", 1024, False)
    scored = homogeneous_share(scored_windows(cfg, datamodule), exclude_border=False)
    np.testing.assert_allclose(trained_share, scored, atol=0.06)  # within a few points at every window size
    assert scored[2] > 0.25  # 8x8 windows (128 px) are often homogeneous at full resolution


def test_crops_of_cts_size_or_squashed_frames_miss_those_statistics(tmp_path):
    """CTS's 768 crops rarely reach the frame's ignore border and overrate large windows; whole frames squashed
    to 512x512 (the former recipe) see almost no homogeneous 8x8 or 16x16 window."""
    cfg, datamodule = cityscapes_recipe(tmp_path, 1024)
    scored = homogeneous_share(scored_windows(cfg, datamodule), exclude_border=False)
    cts = homogeneous_share(policy_labels(datamodule, "crops", 768), exclude_border=False)
    assert cts[2] - scored[2] > 0.1
    squashed = homogeneous_share(policy_labels(datamodule, "whole", 512), exclude_border=True)
    assert squashed[2] < 0.02 and squashed[3] == 0 and scored[2] - squashed[2] > 0.2
