"""fvcore GFLOPs of the unreduced SegViT against the paper's table (specs/segvit-atm.md), and the CLI."""

from __future__ import annotations

import pytest
import torch

from step_lightning.measure.gflops import count_gflops
from step_lightning.models.backbones import BACKBONES
from step_lightning.models.segmenter import Segmenter
from step_lightning.models.vit import ViTEncoder
from tests.helpers import run_module

# (backbone, input side, classes, paper GFLOPs)
PAPER_GFLOPS = [
    ("vit_b", 512, 150, 113),
    ("vit_b", 512, 19, 110),
    ("vit_b", 768, 19, 301),
    ("vit_b", 1024, 19, 670),
    ("vit_l", 512, 171, 373),
    ("vit_l", 640, 150, 624),
    ("vit_l", 768, 19, 970),
    ("vit_l", 1024, 19, 2086),
]


def segvit_gflops(backbone: str, side: int, classes: int) -> dict:
    encoder = ViTEncoder(backbone, img_size=side, drop_path_rate=0.0)
    model = Segmenter(encoder, classes, BACKBONES[backbone].taps)
    return count_gflops(model, torch.zeros(1, 3, side, side))


@pytest.mark.slow
@pytest.mark.parametrize(("backbone", "side", "classes", "paper"), PAPER_GFLOPS)
def test_gflops_within_5_percent_of_paper(backbone, side, classes, paper):
    result = segvit_gflops(backbone, side, classes)
    assert result["gflops"] == pytest.approx(paper, rel=0.05)
    assert "encoder" in result["by_module"] and "head" in result["by_module"]
    assert not any("matmul" in op or "bmm" in op or "linear" in op for op in result["unsupported"])


def test_gflops_count_attention_matmuls():
    """A 1-layer ViT-B at 512: the attention matmuls (2 x N^2 x C, N = 1024 tokens) are in the count."""
    encoder = ViTEncoder("vit_b", img_size=512, drop_path_rate=0.0, depth=1)
    model = Segmenter(encoder, 19, (1,))
    blocks = count_gflops(model, torch.zeros(1, 3, 512, 512))["by_module"]["encoder"]
    n, c = 1024, 768
    dense = n * (4 * c * c + 8 * c * c) + n * 3 * 16 * 16 * c  # qkv+proj, MLP (4x), patch embedding
    attention = 2 * n * n * c
    assert blocks * 1e9 == pytest.approx(dense + attention, rel=0.01)


@pytest.mark.slow
def test_flops_cli_prints_gflops(tmp_path):
    result = run_module("step_lightning.flops", ["backbone=vit_b", "num_classes=150", "resolution=512"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("gflops=")
    assert float(last.removeprefix("gflops=")) == pytest.approx(113, rel=0.05)
    assert (tmp_path / "flops.json").is_file()
