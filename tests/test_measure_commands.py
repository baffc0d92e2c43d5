"""Measurement tools on tiny configs: benchmark, tokens CLI, per-layer profile, visualisations, callback."""

from __future__ import annotations

import contextlib
import csv
import json
import re

import pytest
import torch
from PIL import Image

from tests.helpers import compose_config, run_module

TINY = ["debug=tiny", "data.num_val=3", "threads=1"]
# The last state of a command's progress bar: what ran last, all its passes done, the time taken and left.
PROGRESS = r"{what}: 100%\|[^|]*\| {done}/{done} \[\d\d:\d\d<00:00"


def test_policy_random_measures_an_untrained_policy_network_with_progress(tmp_path, capsys):
    """policy=random, documented for speed rows with a policy network, is accepted; the bar names each stage."""
    from step_lightning.benchmark import benchmark
    from step_lightning.measure.presets import build_models, method_configs
    from step_lightning.tokens.policy import PolicyNet

    overrides = [*TINY, "methods=[dcts@6899]", "policy=random", "resolution=64", "num_images=2", "repeats=2",
                 "warmup=1", "engines=[packed]", "components=false"]
    report = benchmark(compose_config(overrides, "benchmark", tmp_path), overrides)
    assert report["setting"]["policy"] == "random" and report["methods"]["dcts@6899"]["gflops"] > 0
    # 2 crops of token statistics + 1 GFLOPs trace + 1 memory forward + (1 warm-up + 2 timed passes) x 2 batches
    err = capsys.readouterr().err
    assert re.search(PROGRESS.format(what=r"benchmark: timing dcts@6899 packed \(pass 2/2\)", done=10), err)
    configs = method_configs("benchmark", overrides, ["dcts@6899"], str(tmp_path))
    model = build_models(configs, 8, 255)["dcts@6899"]
    assert any(isinstance(m, PolicyNet) for m in model.modules())  # a network scores the windows, not the labels


def test_benchmark_outputs_and_monotone_flops(tmp_path):
    from step_lightning.benchmark import benchmark

    methods = "methods=[segvit,cts,dcts@6899,{name:step1,method:step,prune_heads:[1],force_halt:0.5}]"
    overrides = [*TINY, methods, "resolution=128", "num_images=2", "repeats=1"]
    report = benchmark(compose_config(overrides, "benchmark", tmp_path), overrides)
    rows = report["methods"]
    assert list(rows) == ["segvit", "cts", "dcts@6899", "step1"]
    seg, dcts, step = rows["segvit"], rows["dcts@6899"], rows["step1"]
    # Synthetic scenes have large homogeneous sky/ground: the oracle merges, FLOPs drop.
    assert dcts["tokens_mean"] < seg["tokens_mean"] == 64 and dcts["gflops"] < seg["gflops"]
    assert rows["cts"]["tokens_mean"] == 64 - 3 * 6  # CTS: k = round(103 * 64 / 1024) = 6 windows
    assert step["halted_fraction"] == pytest.approx(0.5, abs=0.1) and len(step["tokens_after_exits"]) == 1
    assert seg["gflops_ratio"] == 1 and dcts["gflops_ratio"] > 1
    for row in rows.values():
        assert row["images_per_s"] > 0 and row["peak_mem_mb"] is not None
        assert row["throughput_per_gflops_ratio"] == pytest.approx(row["throughput_ratio"] / row["gflops_ratio"])
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert saved["setting"]["images"] == 2 and saved["methods"]["step1"]["halted_fraction"] == step["halted_fraction"]
    table = (tmp_path / "benchmark.md").read_text()
    assert "throughput ratio / GFLOPs ratio" in table and "| dcts@6899 |" in table
    with open(tmp_path / "benchmark.csv") as file:
        assert [r["method"] for r in csv.DictReader(file)] == list(rows)
    assert Image.open(tmp_path / "throughput_vs_gflops.png").size[0] > 100


def test_shared_weights_across_methods(tmp_path):
    from step_lightning.measure.presets import build_models, method_configs

    overrides = [*TINY, "methods=[segvit,dcts,step]", "backbone.dtop_heads=[1]", "resolution=64"]
    cfg = compose_config(overrides, "benchmark", tmp_path)
    models = build_models(method_configs("benchmark", overrides, cfg.methods, str(tmp_path)), 8, 255)
    seg, dcts, step = models.values()
    for key, value in seg.encoder.state_dict().items():
        assert torch.equal(value, dcts.encoder.state_dict()[key]) and torch.equal(value, step.encoder.state_dict()[key])
    assert all(torch.equal(v, dcts.state_dict()[k]) for k, v in seg.state_dict().items())


def test_tokens_cli_prints_table_and_last_line(tmp_path):
    result = run_module("step_lightning.token_stats", ["resolution=64", "data.num_val=3", "tau=6899"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("tokens_mean=") and " reduction=" in lines[-1]
    assert any(line.startswith("| mean |") for line in lines)
    assert re.search(PROGRESS.format(what=r"token_stats step: tokenizer \(crops 1-3 of 3\)", done=3), result.stderr)
    stats = json.loads((tmp_path / "tokens.json").read_text())["stats"]
    assert stats["images"] == 3 and stats["reduction"] == pytest.approx(16 / stats["total"]["mean"])


def test_profile_parts_add_up(tmp_path, capsys):
    from step_lightning.profile_layers import profile

    cfg = compose_config(
        [*TINY, "method=step_single", "force_halt=0.5", "resolution=64", "num_images=1", "repeats=3"],
        "profile",
        tmp_path,
    )
    report = profile(cfg)
    rows, total = report["rows"], report["total"]
    assert {"tokenizer", "block 1", "block 2", "exit head 1 (L1)", "final head", "halting rule"} <= set(rows)
    # GFLOPs: the named parts hold nearly everything (the remainder is the final scores/canvas).
    named = sum(r["gflops"] for k, r in rows.items() if k != "other")
    assert named == pytest.approx(total["gflops"], rel=0.05)
    # Time: each run's 'other' = forward - timed parts, so the mean parts add up to the mean forward.
    assert sum(r["ms"] for r in rows.values()) == pytest.approx(total["ms"], rel=1e-9)
    assert 0 <= rows["other"]["ms"] < 0.5 * total["ms"]
    assert rows["block 2"]["tokens"] < rows["block 1"]["tokens"] == 16  # half the tokens halted after layer 1
    assert (tmp_path / "profile.png").is_file() and "| block 1 |" in (tmp_path / "profile.md").read_text()
    what = r"profile_layers step_single: timing per part \(crop 1/1\)"
    assert re.search(PROGRESS.format(what=what, done=1 + 1 + 3), capsys.readouterr().err)  # GFLOPs, warm-up, 3 runs


def test_visualize_writes_pngs(tmp_path):
    from step_lightning.visualize import visualize

    cfg = compose_config(
        [*TINY, "method=step_single", "force_halt=0.4", "resolution=64", "num_images=2"], "visualize", tmp_path
    )
    paths = visualize(cfg)
    assert len(paths) == 2 and all(Image.open(p).size[0] > 300 for p in paths)


def test_halt_head_matches_halted_counts():
    from step_lightning.models.early_exit import EarlyExitSegmenter
    from step_lightning.models.engine import InferenceOptions
    from step_lightning.models.vit import ViTEncoder

    torch.manual_seed(0)
    model = EarlyExitSegmenter(ViTEncoder("vit_t", 64, depth=3), 5, [1, 2]).eval()
    out = model(torch.randn(2, 3, 64, 64), options=InferenceOptions(force_halt=0.3))
    halt_head = out.extras["halt_head"]
    assert halt_head.shape == (2, 16)
    assert torch.equal((halt_head == 0).sum(1), out.extras["halted"][:, 0])
    assert torch.equal((halt_head == -1).sum(1), out.extras["active_after"][:, -1])


def test_callback_writes_pngs_with_csv_logger(tmp_path):
    from step_lightning.train import train

    overrides = [
        "method=step_single",
        "force_halt=null",
        "backbone=vit_t",
        "backbone.depth=2",
        "backbone.taps=[1,2]",
        "backbone.single_head=[1]",
        "crop_size=64",
        "data.num_train=8",
        "data.num_val=2",
        "data.batch_size=4",
        "policy=oracle",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "logger=csv",
        "callbacks.progress_bar=null",
        "callbacks.visualization.num_images=2",
    ]
    cfg = compose_config([o for o in overrides if not o.startswith("force_halt")], "train", tmp_path)
    train(cfg)
    pngs = sorted(tmp_path.glob("csv/**/vis/*.png"))
    assert len(pngs) >= 2, sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))


def test_collect_sweep_table(tmp_path):
    import importlib.util

    from tests.helpers import REPO

    spec = importlib.util.spec_from_file_location("collect_sweep", REPO / "scripts" / "collect_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for job, (tau, miou, gflops) in enumerate([("6899", 46.0, 181.0), ("4999", 45.3, 159.0)]):
        config = {"method": "dcts", "tau": tau, "prune_heads": [], "backbone": {"name": "vit_l"}}
        summary = {"mIoU": miou, "gflops": gflops, "tokens_per_image": 700.0, "exit_stats": None, "config": config}
        (tmp_path / str(job)).mkdir()
        (tmp_path / str(job) / "summary.json").write_text(json.dumps(summary))
    table = module.main([str(tmp_path)]).read_text()
    rows = [line for line in table.splitlines() if "tau=" in line]
    assert [r.split("|")[2].strip() for r in rows] == ["tau=4999", "tau=6899"]  # sorted by GFLOPs
    assert (tmp_path / "sweep.png").is_file() and (tmp_path / "sweep.csv").read_text().count("\n") == 3


@pytest.mark.slow
def test_commands_rebuild_a_trained_model_from_its_checkpoint(tiny_step_run, tmp_path):
    """A STEP training checkpoint (2-layer ViT-Ti, trained policy) used by flops, benchmark, profile_layers and
    visualize with none of its training overrides repeated: the command lines describe only the input."""
    from step_lightning.benchmark import benchmark
    from step_lightning.flops import flops
    from step_lightning.profile_layers import profile
    from step_lightning.visualize import visualize

    ckpt = tiny_step_run["summary"]["checkpoint"]
    inputs = ["resolution=64", "num_images=1", "data.num_val=2", "repeats=1", "warmup=0"]
    flops(compose_config([f"ckpt_path={ckpt}", "resolution=64"], "flops", tmp_path / "flops"))
    by_module = json.loads((tmp_path / "flops" / "flops.json").read_text())["by_module"]
    assert by_module["tokenizer"] > 0 and "encoder.blocks.2" not in by_module  # the policy, 2 blocks
    overrides = [*inputs, "methods=[segvit,step]", f"checkpoints={{step: {ckpt}}}"]
    report = benchmark(compose_config(overrides, "benchmark", tmp_path / "benchmark"), overrides)
    assert report["methods"]["step"]["mIoU"] is not None and report["methods"]["segvit"].get("mIoU") is None
    rows = profile(compose_config([*inputs, f"ckpt_path={ckpt}"], "profile", tmp_path / "profile"))["rows"]
    assert {"block 1", "block 2", "exit head 1 (L1)"} <= set(rows) and "block 3" not in rows
    paths = visualize(compose_config([*inputs, f"ckpt_path={ckpt}"], "visualize", tmp_path / "vis"))
    assert len(paths) == 1 and Image.open(paths[0]).size[0] > 300


def test_training_benchmark_times_the_step_parts_and_profiles_after_writing_its_tables(tmp_path, monkeypatch):
    """mode=train: the parts of a step (forward, loss, backward) per method; the profile comes after the tables
    are on disk (a profile cut short loses nothing)."""
    from step_lightning import benchmark as command

    def interrupted(*args):
        assert "| step1 |" in (tmp_path / "benchmark.md").read_text()
        raise KeyboardInterrupt

    overrides = [*TINY, "methods=[segvit,{name:step1,method:step,prune_heads:[1],force_halt:0.5}]", "resolution=64",
                 "num_images=2", "repeats=1", "warmup=0", "batch_size=2", "mode=train", "profile=true"]
    report = command.benchmark(compose_config(overrides, "benchmark", tmp_path), overrides)
    for row in report["methods"].values():
        assert set(row["step_split_ms"]) == {"forward", "loss", "backward"} and min(row["step_split_ms"].values()) > 0
        profile = row["profile"]["train"]
        assert profile["wall_ms"] >= profile["host_ms"] > 0 and profile["syncs"] == 0 and "kernels" not in profile
    table = (tmp_path / "benchmark.md").read_text()
    assert "| step1 |" in table.split("Training step parts")[1] and "Under torch.profiler" in table
    monkeypatch.setattr(command, "profile_pass", interrupted)
    (tmp_path / "benchmark.md").unlink()
    with pytest.raises(KeyboardInterrupt):
        command.benchmark(compose_config(overrides, "benchmark", tmp_path), overrides)


def test_the_timed_step_parts_give_the_gradients_of_one_backward():
    """training_split differentiates the loss to the heads' outputs, then the model from there: the gradients
    are those of ``loss.backward()``."""
    from step_lightning.measure.presets import training_split, training_step
    from step_lightning.models.factory import ModelSpec, build_model
    from step_lightning.models.loss import ATMLoss

    torch.manual_seed(0)
    model = build_model(ModelSpec(backbone="vit_t", num_classes=5, depth=2, taps=(1, 2), tokenizer="dcts",
                                  tau=6899, prune_heads=(1,), drop_path_rate=0.0)).train()
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    labels[:, :32] = 1  # homogeneous windows: supertokens
    criterion = ATMLoss(5)
    torch.manual_seed(1)  # the same dropout in both
    training_step(model, criterion, contextlib.nullcontext)(images, labels)
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    torch.manual_seed(1)
    parts = training_split(model, criterion, contextlib.nullcontext, [(images, labels)], torch.device("cpu"))
    got = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(expected) and len(got) > 10 and min(parts.values()) > 0
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-7)


def test_profile_summary_counts_host_syncs_and_ranks_kernels():
    """Per batch: syncs less the pass's own final one, kernels by device time, the GPU's idle share."""
    from types import SimpleNamespace

    from step_lightning.measure.timing import profile_summary

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    events = [SimpleNamespace(name=n, device_type=d, device_time=t) for n, d, t in [
        ("aten::linear", cpu, 0), ("cudaLaunchKernel", cpu, 0), ("cudaMemcpyAsync", cpu, 0),
        ("cudaStreamSynchronize", cpu, 0), ("cudaStreamSynchronize", cpu, 0), ("cudaDeviceSynchronize", cpu, 0),
        ("gemm", cuda, 3000.0), ("softmax", cuda, 500.0), ("gemm", cuda, 3000.0), ("copy", cuda, 1500.0)]]
    got = profile_summary(events, wall_s=0.02, host_s=0.004, batches=2, gpu=True, final_syncs=1)
    assert got["syncs"] == 1.0 and got["kernels"] == 2.0 and got["gpu_busy_ms"] == 4.0
    assert got["gpu_idle_fraction"] == pytest.approx(0.6) and got["wall_ms"] == 10 and got["host_ms"] == 2
    assert got["top_kernels"] == [["gemm", 3.0], ["copy", 0.75], ["softmax", 0.25]]
    assert set(profile_summary(events[:6], 0.02, 0.02, 1, gpu=False)) == {"wall_ms", "host_ms", "syncs"}


def test_gpu_table_checks_each_speed_target_per_cell_and_engine(tmp_path):
    """scripts/gpu_table.py on two hand-made cells: the tables, and a verdict per target from the figures."""
    import importlib.util

    from tests.helpers import REPO

    spec = importlib.util.spec_from_file_location("gpu_table", REPO / "scripts" / "gpu_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def row(gflops, speed, mem, train=False):
        ratio = 100.0 / gflops
        engines = ["train"] if train else ["packed", "fast"]
        return {"gflops": gflops, "gflops_ratio": ratio, "images_per_s": 10 * speed, "throughput_ratio": speed,
                "throughput_per_gflops_ratio": speed / ratio, "peak_mem_mb": mem,
                "images_per_s_by_engine": dict.fromkeys(engines, 10 * speed),
                "speedup_by_engine": dict.fromkeys(engines, speed),
                "speedup_per_gflops_by_engine": dict.fromkeys(engines, speed / ratio)}

    setting = {"device": "GPU", "torch": "2", "cuda": "13", "cudnn": 9, "attention": "varlen", "precision": "bf16",
               "images": 8, "data": "cityscapes", "policy": "oracle", "force_halt": 0.4, "reference": "segvit"}
    inference = {"setting": setting | {"mode": "inference", "backbone": "vit_l", "resolution": 1024, "batch_size": 8,
                                       "engines": ["packed", "fast"]},
                 "config": {"methods": ["segvit", "dcts", "step", {"name": "dcts_budget", "method": "dcts"}]},
                 "methods": {"segvit": row(100, 1.0, 1000), "dcts": row(25, 3.6, 400), "step": row(20, 3.5, 400),
                             "dcts_budget": row(20, 4.0, 300)}}
    training = {"setting": setting | {"mode": "train", "backbone": "vit_l", "resolution": 1024, "batch_size": 2,
                                      "engines": ["train"]},
                "config": {"methods": ["segvit", "dcts"]},
                "methods": {"segvit": row(100, 1.0, 9000, True), "dcts": row(25, 3.0, 5000, True) | {
                    "step_split_ms": {"forward": 10.0, "loss": 10.0, "backward": 20.0}}}}
    (tmp_path / "vit_l_1024_b8").mkdir()
    (tmp_path / "vit_l_1024_b8" / "benchmark.json").write_text(json.dumps(inference))
    (tmp_path / "train_vit_l_1024_b2.json").write_text(json.dumps(training))
    text = module.summary(tmp_path)
    assert "| dcts | 4.00 / 3.60 / 0.90, 400 MB | 4.00 / 3.60 / 0.90, 400 MB |" in text
    assert "| dcts | 4.00 / 3.00 / 0.75, 5000 MB, loss 0.25 |" in text
    targets = text.split("Targets:")[1]
    assert "- met: ViT-L 1024 b8 fast every method faster than segvit" in targets
    assert "- met: ViT-L 1024 b8 fast dcts speedup 3.60 = 0.90 of its GFLOPs ratio" in targets
    assert "- MISSED: ViT-L 1024 b8 fast step speedup 3.50 = 0.70 of its GFLOPs ratio" in targets
    assert "- MISSED: ViT-L 1024 b8 fast step (1.25x fewer GFLOPs than dcts) speedup 3.50 vs dcts 3.60" in targets
    assert "- met: ViT-L 1024 b8 packed dcts_budget per GFLOP 0.80 vs dcts 0.90" not in targets
    assert "- MISSED: ViT-L 1024 b8 packed dcts_budget per GFLOP 0.80 vs dcts 0.90" in targets
    assert "- MISSED: train ViT-L 1024 b2 dcts training speedup 3.00 = 0.75 of its training-GFLOPs ratio" in targets


def test_loss_benchmark_runs_both_formulations(tmp_path):
    """scripts/bench_loss.py (tiny): both losses timed side by side, their ratio and peak memories printed."""
    import subprocess
    import sys

    from tests.helpers import REPO

    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_loss.py"), "--size", "64", "--rounds", "1",
                             "--classes", "6"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("2 labels at 64x64") and "3 outputs" in lines[0]
    assert re.match(r"new +[\d.]+ s \([\d.]+-[\d.]+\), peak -?\d+ MB", lines[1])
    assert re.match(r"autograd +[\d.]+ s", lines[2]) and re.match(r"autograd / new: [\d.]+x", lines[3])
