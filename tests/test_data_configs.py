"""conf/data/*.yaml compose with the training config and build their datamodules."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from step_lightning.config.resolvers import register_resolvers
from tests.helpers import CONF_DIR

EXPECTED = {
    "ade20k": ("ADE20KDataModule", 150, "ADEChallengeData2016", (2048, 512)),
    "cocostuff10k": ("CocoStuff10kDataModule", 171, "coco_stuff10k", (2048, 512)),
    "cocostuff164k": ("CocoStuff164kDataModule", 171, "coco_stuff164k", (2048, 512)),
    "cityscapes": ("CityscapesDataModule", 19, "cityscapes", (2048, 1024)),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("crop, stride", [(512, 341), (768, 512)])
def test_data_config_builds_its_datamodule(name, crop, stride, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", "/datasets")
    register_resolvers()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"data={name}", f"crop_size={crop}", "backbone=vit_b"])
    cls, num_classes, folder, base_scale = EXPECTED[name]
    assert cfg.data.name == name and cfg.data.num_classes == num_classes
    assert cfg.eval.mode == "slide" and cfg.eval.stride == stride and cfg.eval.crop == crop
    dm = instantiate(cfg.data)
    assert type(dm).__name__ == cls and dm.num_classes == num_classes == len(dm.class_names) == len(dm.palette)
    assert dm.root == Path("/datasets") / folder and dm.crop_size == crop and dm.base_scale == base_scale
    assert dm.mean == tuple(cfg.backbone.mean) and dm.seed == cfg.seed
