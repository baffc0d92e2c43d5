"""Segmenter (SegViT): inference upsamples the final mask logits before the sigmoid and the class combination."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from step_lightning.models.engine import InferenceOptions
from step_lightning.models.factory import ModelSpec, build_model


def test_predict_upsamples_logits_before_combining():
    torch.manual_seed(0)
    model = build_model(ModelSpec("vit_t", num_classes=5, img_size=64, depth=2, taps=(1, 2))).eval()
    with torch.no_grad():  # large mask logits, so that the sigmoid is far from linear between grid cells
        for stage in model.head.stages:
            stage.layers[-1].cross_attn.q.weight.mul_(300)
    images = torch.randn(2, 3, 64, 64)
    scores, out = model.predict(images)
    final = out.outputs[-1]
    logits = F.interpolate(final["mask_logits"], size=(64, 64), mode="bilinear", align_corners=False)
    expected = torch.einsum("bqc,bqhw->bchw", final["class_logits"].softmax(-1)[..., :-1], logits.sigmoid())
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    grid_first = F.interpolate(model.head_scores(final), size=(64, 64), mode="bilinear", align_corners=False)
    assert not torch.allclose(scores, grid_first, atol=1e-4)  # the order matters
    padded, _ = model.predict(images, options=InferenceOptions(engine="padded"))  # export's store: the same order
    torch.testing.assert_close(padded, scores, rtol=0, atol=1e-5)
