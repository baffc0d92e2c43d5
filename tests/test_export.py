"""``python -m step_lightning.export``: torch.export and ONNX graphs that match the eager model, and one-line
refusals for the models that cannot be exported."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from step_lightning.api.export import ONNX_PACKAGES, random_batch, run_exported
from step_lightning.core import ConfigError
from step_lightning.export import export
from step_lightning.lit.checkpoint import load_module
from tests.helpers import compose_config, run_module

needs_onnx = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ONNX_PACKAGES),
    reason="the export extra (onnx, onnxscript, onnxruntime) is not installed",
)


def export_cfg(checkpoint, *overrides):
    return compose_config([f"ckpt_path={checkpoint}", *overrides], "export")


def check_export(path, checkpoint, fmt, capsys) -> float:
    """The printed difference, after checking the written files and rerunning the graph on a batch of 1."""
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"export: {path}"
    difference = float(lines[-2].split("eager ")[1].split(" ")[0])
    meta = json.loads(path.with_name(f"{path.name}.json").read_text())
    assert meta["input"]["shape"] == ["batch", 3, 64, 64] and meta["dataset"]["class_names"][0] == "sky"
    assert meta["max_abs_difference"] == pytest.approx(difference, rel=1e-2, abs=1e-12)
    model = load_module(checkpoint).model
    image = random_batch(1, 64, seed=5)
    scores = run_exported(fmt, path, image)
    assert scores.shape == (1, 8, 64, 64)
    assert torch.allclose(scores, model.predict(image)[0], atol=1e-4)
    return difference


def test_segvit_to_torch_export(tiny_checkpoint, tmp_path, capsys):
    path = export(export_cfg(tiny_checkpoint("segvit"), f"output={tmp_path / 'segvit.pt2'}"))
    assert check_export(path, tiny_checkpoint("segvit"), "torch_export", capsys) <= 1e-4


@pytest.mark.slow
def test_dcts_exports_with_a_data_dependent_token_count(tiny_checkpoint, tmp_path, capsys):
    checkpoint = tiny_checkpoint("dcts")
    path = export(export_cfg(checkpoint))
    assert path == checkpoint.with_suffix(".pt2")  # next to the checkpoint by default
    assert check_export(path, checkpoint, "torch_export", capsys) <= 1e-4
    model = load_module(checkpoint).model
    images = torch.cat([random_batch(3, 64, seed=s) * (1 + s) for s in range(3)])
    counts = model(images).tokens
    assert len(counts.unique()) > 1, counts  # the graph saw images with different token counts
    expected = model.predict(images)[0]
    assert torch.allclose(run_exported("torch_export", path, images), expected, atol=1e-4)


@needs_onnx
def test_segvit_to_onnx(tiny_checkpoint, tmp_path, capsys):
    path = export(export_cfg(tiny_checkpoint("segvit"), "format=onnx", f"output={tmp_path / 'segvit.onnx'}"))
    assert check_export(path, tiny_checkpoint("segvit"), "onnx", capsys) <= 1e-4


@needs_onnx
@pytest.mark.slow
def test_cts_to_onnx(tiny_checkpoint, tmp_path, capsys):
    path = export(export_cfg(tiny_checkpoint("cts"), "format=onnx", f"output={tmp_path / 'cts.onnx'}"))
    assert check_export(path, tiny_checkpoint("cts"), "onnx", capsys) <= 1e-4


def test_models_that_do_not_export_say_why(tiny_checkpoint, monkeypatch):
    with pytest.raises(ConfigError, match="exit heads .* budgets only.* halt_budget=<fraction> and budget=<fraction>"):
        export(export_cfg(tiny_checkpoint("step")))
    with pytest.raises(ConfigError, match="budget=<fraction>"):
        export(export_cfg(tiny_checkpoint("step"), "halt_budget=0.3"))  # its dCTS tokenizer needs one too
    with pytest.raises(ConfigError, match="format=onnx does not cover dCTS.* use format=torch_export"):
        export(export_cfg(tiny_checkpoint("dcts"), "format=onnx", "budget=0.5"))
    with pytest.raises(ConfigError, match="policy=oracle"):
        export(export_cfg(tiny_checkpoint("dcts_oracle")))
    with pytest.raises(ConfigError, match="format=tflite must be one of torch_export, onnx"):
        export(export_cfg(tiny_checkpoint("segvit"), "format=tflite"))
    with pytest.raises(ConfigError, match="size=40 must be a positive multiple of 16"):
        export(export_cfg(tiny_checkpoint("segvit"), "size=40"))
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if the export extra were not installed
    with pytest.raises(ConfigError, match=r"onnxscript missing\): pip install 'step-lightning\[export\]'"):
        export(export_cfg(tiny_checkpoint("segvit"), "format=onnx"))


def test_a_graph_off_by_more_than_the_tolerance_is_removed(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr("step_lightning.export.max_difference", lambda *args: 0.5)
    path = tmp_path / "off.pt2"
    with pytest.raises(SystemExit, match=r"^error: the exported model differs from eager by 0.5 > tolerance=0.0001"):
        export(export_cfg(tiny_checkpoint("segvit"), f"output={path}"))
    assert not path.exists()


@pytest.mark.slow
def test_command_line_refusal_is_one_line(tiny_checkpoint, tmp_path):
    result = run_module("step_lightning.export", [f"ckpt_path={tiny_checkpoint('step')}"], tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: a model with exit heads (prune_heads=[1]) exports with compute budgets only")


def test_the_exported_graph_is_predict_even_where_the_upsampling_order_matters(tiny_checkpoint, tmp_path):
    """Large mask logits (the sigmoid far from linear between grid cells): SegViT's order (upsample the logits,
    then combine) and combine-then-upsample differ; the exported file follows ``predict``."""
    import torch.nn.functional as F

    from step_lightning.api.export import export_model

    model = load_module(tiny_checkpoint("segvit")).model.eval()
    with torch.no_grad():
        for stage in model.head.stages:
            stage.layers[-1].cross_attn.q.weight.mul_(300)
    path = export_model(model, "torch_export", tmp_path / "segvit.pt2", 64)
    images = random_batch(2, 64, seed=7)
    expected, out = model.predict(images)
    exported = run_exported("torch_export", path, images)
    torch.testing.assert_close(exported, expected, atol=1e-4, rtol=0)
    grid_first = F.interpolate(model.head_scores(out.outputs[-1]), size=(64, 64), mode="bilinear", align_corners=False)
    assert (exported - grid_first).abs().max() > 1e-2


@pytest.mark.parametrize("fmt", ["torch_export"])
@pytest.mark.parametrize("kind", ["dcts", "step"])
def test_models_with_budgets_export_and_equal_predict(tiny_checkpoint, tmp_path, capsys, kind, fmt):
    """With compute budgets every shape is static: dCTS and STEP export to one torch.export graph that computes
    ``predict`` with the same budgets."""
    checkpoint = tiny_checkpoint(kind)
    budgets = ["budget=0.5"] + (["halt_budget=0.3"] if kind == "step" else [])
    output = tmp_path / f"{kind}{'.pt2' if fmt == 'torch_export' else '.onnx'}"
    path = export(export_cfg(checkpoint, f"format={fmt}", f"output={output}", *budgets))
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"export: {path}" and float(lines[-2].split("eager ")[1].split(" ")[0]) <= 1e-4
    meta = json.loads(path.with_name(f"{path.name}.json").read_text())
    assert meta["budgets"] == {"budget": 0.5, "halt_budget": 0.3 if kind == "step" else None}
    model = load_module(checkpoint).model
    from step_lightning.models.engine import InferenceOptions

    images = torch.cat([random_batch(2, 64, seed=s) * (1 + s) for s in range(2)])
    options = InferenceOptions(budget=0.5, halt_budget=0.3 if kind == "step" else None)
    expected, out = model.predict(images, options=options)
    assert kind == "step" or (out.tokens == 7).all()  # different content, the budget's exact count: 8 - (8 - 16) % 3
    torch.testing.assert_close(run_exported(fmt, path, images), expected, atol=1e-4, rtol=0)


@needs_onnx
@pytest.mark.parametrize("fmt", ["onnx", "torch_export"])
def test_exit_models_with_a_halting_budget_export_to_onnx(tmp_path, fmt):
    """DToP with a halting budget (patch tokens): one static ONNX graph equal to ``predict`` with that budget."""
    from step_lightning.api.export import export_model, export_options, max_difference
    from step_lightning.models.factory import ModelSpec, build_model

    torch.manual_seed(0)
    model = build_model(ModelSpec(backbone="vit_t", num_classes=5, img_size=64, depth=3, drop_path_rate=0.0,
                                  prune_heads=(1, 2))).eval()
    options = export_options(halt_budget=0.4)
    path = export_model(model, fmt, tmp_path / f"dtop.{fmt}", 64, options)
    assert max_difference(model, fmt, path, 64, options) <= 1e-4
