"""fvcore counts every tokenizer's model (the jit trace must get through CTS's top-K and dCTS layouts)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from step_lightning.config.model import build_model_from_config
from step_lightning.data.synthetic import make_scene
from step_lightning.measure.gflops import count_gflops
from step_lightning.models.halting import ForcedHalting
from tests.helpers import compose_config


def test_supertoken_methods_cost_less_than_segvit(tmp_path):
    scene, label = make_scene(3, 128, 8, 3)
    image = torch.from_numpy(scene).permute(2, 0, 1)[None].float() / 255
    labels = torch.from_numpy(label.astype(np.int64))[None]
    gflops = {}
    for method in ("segvit", "cts", "dcts"):
        cfg = compose_config([f"method={method}", "policy=oracle", "crop_size=128", "backbone.depth=2",
                              "backbone.taps=[1,2]"], output_dir=tmp_path)
        gflops[method] = count_gflops(build_model_from_config(cfg, 8), image, labels)["gflops"]
    assert gflops["cts"] < gflops["segvit"]
    assert gflops["dcts"] < gflops["segvit"]


@pytest.mark.parametrize("method", ["segvit", "dcts", "step"])
def test_forward_cost_from_token_counts_equals_fvcore_per_image(tmp_path, method):
    """The summary's GFLOPs cover every validation image from its token counts: exact against fvcore."""
    from step_lightning.measure.gflops import ForwardCost, count_gflops

    cfg = compose_config([f"method={method}", "policy=oracle", "debug=tiny", "backbone.depth=3",
                          "backbone.dtop_heads=[1,2]", "crop_size=128"], output_dir=tmp_path)
    model = build_model_from_config(cfg, num_classes=8).eval()
    if method == "step":
        model.halting = ForcedHalting(0.3)  # the rule the cost model and the forward share
    scenes = [make_scene(seed, 128, 8, 5) for seed in range(3)]
    images = torch.stack([torch.from_numpy(img).permute(2, 0, 1).float() for img, _ in scenes])
    labels = torch.stack([torch.from_numpy(lab.astype(np.int64)) for _, lab in scenes])
    cost = ForwardCost(model, images[:1], labels[:1])
    for i in range(1, 3):
        out = model(images[i : i + 1], labels[i : i + 1])
        active = out.extras["active_after"][0].tolist() if "active_after" in out.extras else []
        expected = count_gflops(model, images[i : i + 1], labels[i : i + 1])["gflops"]
        assert cost(int(out.tokens[0]), active) == pytest.approx(expected, rel=1e-6)
