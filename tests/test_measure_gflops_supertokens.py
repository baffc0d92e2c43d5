"""fvcore counts every tokenizer's model (the jit trace must get through CTS's top-K and dCTS layouts)."""

from __future__ import annotations

import numpy as np
import torch

from step_lightning.config.model import build_model_from_config
from step_lightning.data.synthetic import make_scene
from step_lightning.measure.gflops import mean_gflops
from tests.helpers import compose_config


def test_supertoken_methods_cost_less_than_segvit(tmp_path):
    scene, label = make_scene(3, 128, 8, 3)
    image = torch.from_numpy(scene).permute(2, 0, 1)[None].float() / 255
    labels = torch.from_numpy(label.astype(np.int64))[None]
    gflops = {}
    for method in ("segvit", "cts", "dcts"):
        cfg = compose_config([f"method={method}", "policy=oracle", "crop_size=128", "backbone.depth=2",
                              "backbone.taps=[1,2]"], output_dir=tmp_path)
        gflops[method] = mean_gflops(build_model_from_config(cfg, 8), image, labels)
    assert gflops["cts"] < gflops["segvit"]
    assert gflops["dcts"] < gflops["segvit"]
