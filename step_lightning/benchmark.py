"""Efficiency of several methods side by side: same images, same random encoder weights (paper Tables 3-6).

    python -m step_lightning.benchmark methods=[segvit,cts,dcts@6899,dcts@4999,step_single] force_halt=0.4 \
        backbone=vit_b resolution=1024 data=cityscapes data.root=/work/shared/realdata/cityscapes \
        data.split=train num_images=2 policy=oracle

Method entries: a preset of conf/method (segvit, cts, dcts, step, step_single, dtop, cts_dtop), optionally
with ``@<tau>`` (``dcts@4999``), or a dict ``{name: step8, method: step, prune_heads: [8], force_halt: 0.4}``
whose other keys override the composed config for that method only. Every model is built by
``models.factory.build_model``; tensors with the same name and shape are copied from the models built
before it, so methods differ only in token reduction (and in the exit heads they add).

Model inputs: each image of the split is resized so its short side is ``resolution`` (the datamodule's
evaluation transform), its label resized to it with nearest neighbour, then cut into ``resolution`` x
``resolution`` crops: ``crop=center`` (one crop per image) or ``crop=tiles`` (the mmseg window grid with
stride = resolution: Cityscapes 2048x1024 gives two crops side by side). ``num_images`` counts crops.

Measured per method: GFLOPs (fvcore, batch 1, averaged over the crops), throughput (``repeats`` timed passes
over all crops in batches of ``batch_size`` after ``warmup`` passes, methods interleaved so drift hits all
alike; median images/s over passes; CUDA synchronised), extra memory of one forward (CUDA: peak allocated
minus allocated before; CPU: peak RSS minus RSS before, peak reset through /proc/self/clear_refs), tokens
after the tokenizer and after each exit, halted fraction, and mIoU on the crops for methods given a
checkpoint. Writes benchmark.json/.md/.csv and PNG plots in the run directory; the last line printed is
``benchmark: <path of benchmark.json>``.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import gc
import statistics
import time
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from step_lightning.config import check_config, register_resolvers
from step_lightning.core import ConfigError
from step_lightning.core.files import atomic_write_text, write_json
from step_lightning.flops import count_gflops
from step_lightning.inference import window_starts
from step_lightning.metrics import SegMetrics
from step_lightning.models.factory import build_model
from step_lightning.models.tokenizer import SupertokenTokenizer
from step_lightning.tokens.policy import policy_gflops

CONF_DIR = Path(__file__).resolve().parent / "conf"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------- inputs
def eval_dataset(datamodule, split: str | None):
    """The split's evaluation dataset (folder datamodules), else the validation set (synthetic)."""
    if hasattr(datamodule, "eval_dataset"):
        return datamodule.eval_dataset(split or datamodule.split)
    datamodule.setup("validate")
    return datamodule.val_set


def crop_boxes(height: int, width: int, size: int, mode: str) -> list[tuple[int, int]]:
    if mode == "center":
        return [((height - size) // 2, (width - size) // 2)]
    if mode == "tiles":
        return [(y, x) for y in window_starts(height, size, size) for x in window_starts(width, size, size)]
    raise ConfigError(f"crop={mode} must be 'center' or 'tiles'.")


def sample_crops(cfg: DictConfig) -> tuple[torch.Tensor, torch.Tensor, list[str], object]:
    """Images [N, 3, R, R], aligned labels [N, R, R], crop names and the datamodule (palette, classes)."""
    datamodule = hydra.utils.instantiate(cfg.data)
    dataset = eval_dataset(datamodule, cfg.data.get("split"))
    size, limit = cfg.resolution, cfg.get("num_images")
    images, labels, names = [], [], []
    for index in range(len(dataset)):
        sample = dataset[index]
        image, label = sample["image"], sample["label"]
        if label.shape != image.shape[1:]:
            label = F.interpolate(label[None, None].float(), size=image.shape[1:], mode="nearest")[0, 0].long()
        height, width = image.shape[1:]
        if min(height, width) < size:
            raise ConfigError(f"{sample.get('name', index)} is {width}x{height} px, smaller than resolution={size}.")
        for y, x in crop_boxes(height, width, size, cfg.crop):
            images.append(image[:, y : y + size, x : x + size])
            labels.append(label[y : y + size, x : x + size])
            names.append(f"{sample.get('name', index)}@{y},{x}")
            if limit is not None and len(images) == limit:
                return torch.stack(images), torch.stack(labels), names, datamodule
    if not images:
        raise ConfigError(f"data.split of {cfg.data.name} holds no images; check data.root and data.split.")
    return torch.stack(images), torch.stack(labels), names, datamodule


# ----------------------------------------------------------------------------------------------- models
def parse_method(entry) -> dict:
    """'dcts@4999' -> {name: 'dcts@4999', method: 'dcts', tau: '4999'}; dicts keep their keys."""
    if isinstance(entry, str):
        preset, _, tau = entry.partition("@")
        return {"name": entry, "method": preset, **({"tau": tau} if tau else {})}
    spec = OmegaConf.to_container(entry) if OmegaConf.is_config(entry) else dict(entry)
    if "method" not in spec:
        raise ConfigError(f"method entry {spec} needs a 'method' preset, e.g. {{name: step8, method: step}}.")
    spec.setdefault("name", spec["method"])
    return spec


def method_config(cfg: DictConfig, spec: dict) -> DictConfig:
    """The composed config with the method preset (conf/method/<method>.yaml) and the entry's keys on top."""
    preset = CONF_DIR / "method" / f"{spec['method']}.yaml"
    if not preset.is_file():
        known = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
        raise ConfigError(f"method '{spec['method']}' (entry '{spec['name']}') is not one of {known}.")
    settings = {k: v for k, v in spec.items() if k != "name"}
    return OmegaConf.merge(cfg, OmegaConf.load(preset), settings)


def share_weights(model: nn.Module, donors: list[nn.Module]) -> None:
    """Copy every tensor whose name and shape match one of an earlier model (first donor wins)."""
    state = model.state_dict()
    taken = set()
    for donor in donors:
        for key, value in donor.state_dict().items():
            if key in state and key not in taken and state[key].shape == value.shape:
                state[key] = value
                taken.add(key)
    model.load_state_dict(state)


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Weights of a step_lightning.train checkpoint (LightningModule keys 'model.*')."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"checkpoint {path} does not exist.")
    state = torch.load(file, map_location="cpu", weights_only=False).get("state_dict", {})
    own = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    if not own:
        raise ConfigError(f"{path} holds no 'model.*' tensors; give a checkpoint written by step_lightning.train.")
    model.load_state_dict(own)


def method_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """One composed config per ``methods`` entry, by entry name."""
    configs: dict[str, DictConfig] = {}
    for spec in map(parse_method, cfg.methods):
        if spec["name"] in configs:
            raise ConfigError(f"two method entries are named '{spec['name']}'; give dict entries distinct names.")
        configs[spec["name"]] = method_config(cfg, spec)
    return configs


def build_models(
    configs: dict[str, DictConfig], num_classes: int, ignore_index: int, checkpoints: dict | None = None
) -> dict[str, nn.Module]:
    """One eval-mode model per config, weights loaded from ``checkpoints[name]`` or shared with the models
    built before it; ``force_halt`` of the config is applied to early-exit models."""
    models: dict[str, nn.Module] = {}
    checkpoints = checkpoints or {}
    for name, mcfg in configs.items():
        check_config(mcfg)
        torch.manual_seed(mcfg.seed)
        model = build_model(mcfg, num_classes, ignore_index)
        if checkpoints.get(name):
            load_checkpoint(model, checkpoints[name])
        else:
            share_weights(model, list(models.values()))
        if hasattr(model, "force_halt"):
            model.force_halt = mcfg.get("force_halt")
        models[name] = model.eval()
    return models


# ----------------------------------------------------------------------------------------------- measures
@contextlib.contextmanager
def fixed_layout(tokenizer: SupertokenTokenizer, layout):
    """Make the tokenizer return a precomputed layout (an instance attribute shadows the method)."""
    tokenizer.layout = lambda *_: layout
    try:
        yield
    finally:
        del tokenizer.layout


def gflops_per_image(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """fvcore GFLOPs at batch 1 per crop. Supertoken layouts are computed outside the trace (CTS's top-k
    scatter cannot be JIT-traced; layout building is comparisons and top-k, no multiply-adds) and a trained
    policy's own GFLOPs are added."""
    tokenizer = model.tokenizer
    result = []
    for i in range(len(images)):
        image, label = images[i : i + 1], labels[i : i + 1]
        if not isinstance(tokenizer, SupertokenTokenizer):
            result.append(count_gflops(model, image, label)["gflops"])
            continue
        with torch.no_grad(), fixed_layout(tokenizer, tokenizer.layout(image, label)):
            gflops = count_gflops(model, image, label)["gflops"]
        if tokenizer.policy is not None:
            gflops += policy_gflops(*image.shape[-2:], tokenizer.policy)
        result.append(gflops)
    return result


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))


def _release_free_heap() -> None:
    """Give glibc's free heap memory back to the OS. Freed tensors (e.g. of the fvcore trace) otherwise stay
    resident and the measured forward reuses them without any RSS growth: the delta would read ~0.
    A fixed mmap threshold (M_MMAP_THRESHOLD = 128 KiB, disabling glibc's dynamic one) keeps large
    tensors out of the heap from then on."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)
    libc.malloc_trim(0)


def forward_memory_mb(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Memory one forward needs beyond what is resident before it (weights, inputs): CUDA peak allocated,
    or CPU peak RSS (None where /proc/self/clear_refs cannot reset the peak)."""
    device = images.device
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        model(images, labels)
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        _release_free_heap()
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM (peak RSS) to the current RSS
        base = _rss_kb("VmRSS:")
        model(images, labels)
        return (_rss_kb("VmHWM:") - base) / 1024
    except OSError:  # no /proc/self/clear_refs or no glibc
        return None


def token_statistics(model: nn.Module, images, labels, metrics: SegMetrics | None) -> dict:
    """Tokens after the tokenizer and after each exit, halted fraction (batch 1 per crop); mIoU if asked."""
    tokens, after, halted = [], [], []
    for image, label in zip(images, labels, strict=True):
        scores, out = model.predict(image[None], label[None])
        tokens.append(out.tokens.float())
        if "active_after" in out.extras:
            after.append(out.extras["active_after"].float())
            halted.append(out.extras["halted"].float())
        if metrics is not None:
            metrics.update(scores.argmax(1).cpu(), label[None].cpu())
    tokens = torch.cat(tokens)
    result = {"tokens_mean": tokens.mean().item(), "tokens_after_exits": [], "halted_fraction": 0.0}
    if after:
        result["tokens_after_exits"] = torch.cat(after).mean(0).tolist()
        result["halted_fraction"] = (torch.cat(halted).sum() / tokens.sum()).item()
    if metrics is not None:
        result["mIoU"] = metrics.compute()["mIoU"].item()
    return result


def time_passes(models: dict[str, nn.Module], batches: list, cfg: DictConfig, device) -> dict[str, list[float]]:
    """Seconds per pass over all batches, per method; passes interleaved across methods."""
    for model in models.values():
        for _ in range(cfg.warmup):
            for images, labels in batches:
                model(images, labels)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(cfg.repeats):
        for name, model in models.items():
            synchronize(device)
            start = time.perf_counter()
            for images, labels in batches:
                model(images, labels)
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def sdpa_context(kind: str):
    if kind == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    if kind not in backends:
        raise ConfigError(f"sdpa={kind} must be default or one of {sorted(backends)}.")
    return sdpa_kernel(backends[kind])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def add_ratios(results: dict[str, dict], reference: str) -> None:
    """GFLOPs ratio = reference / method (x-fold reduction), throughput ratio = method / reference;
    their quotient is 1 when the time saved is proportional to the FLOPs saved."""
    ref = results[reference]
    for row in results.values():
        row["gflops_ratio"] = ref["gflops"] / row["gflops"]
        row["throughput_ratio"] = row["images_per_s"] / ref["images_per_s"]
        row["throughput_per_gflops_ratio"] = row["throughput_ratio"] / row["gflops_ratio"]


# ----------------------------------------------------------------------------------------------- outputs
COLUMNS = (
    ("method", "method", "{}"),
    ("mIoU", "mIoU", "{:.2f}"),
    ("GFLOPs", "gflops", "{:.1f}"),
    ("GFLOPs ratio", "gflops_ratio", "{:.2f}"),
    ("img/s", "images_per_s", "{:.3f}"),
    ("throughput ratio", "throughput_ratio", "{:.2f}"),
    ("throughput ratio / GFLOPs ratio", "throughput_per_gflops_ratio", "{:.2f}"),
    ("tokens", "tokens_mean", "{:.0f}"),
    ("tokens after exits", "tokens_after_exits", "{}"),
    ("halted", "halted_fraction", "{:.3f}"),
    ("peak MB", "peak_mem_mb", "{:.0f}"),
)


def cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if key == "tokens_after_exits":
        return "/".join(f"{v:.0f}" for v in value) or "-"
    return fmt.format(value)


def markdown_table(results: dict[str, dict]) -> str:
    columns = [c for c in COLUMNS if c[1] != "mIoU" or any("mIoU" in r for r in results.values())]
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    for name, row in results.items():
        lines.append("| " + " | ".join(cell({**row, "method": name}, key, fmt) for _, key, fmt in columns) + " |")
    return "\n".join(lines)


def write_plots(results: dict[str, dict], out_dir: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [("gflops", "images_per_s", "GFLOPs", "images/s", "throughput_vs_gflops.png")]
    if any("mIoU" in r for r in results.values()):
        pairs.append(("gflops", "mIoU", "GFLOPs", "mIoU", "miou_vs_gflops.png"))
    paths = []
    for xkey, ykey, xlabel, ylabel, filename in pairs:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for name, row in results.items():
            if row.get(ykey) is None:
                continue
            ax.scatter(row[xkey], row[ykey])
            ax.annotate(name, (row[xkey], row[ykey]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(out_dir / filename)
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def write_outputs(report: dict, out_dir: Path) -> Path:
    results = report["methods"]
    setting = report["setting"]
    header = (
        f"{setting['backbone']} {setting['resolution']}x{setting['resolution']}, {setting['images']} crops of "
        f"{setting['data']}, policy={setting['policy']}, force_halt={setting['force_halt']}, "
        f"batch {setting['batch_size']}, device {setting['device']} ({setting['precision']}, "
        f"sdpa {setting['sdpa']}, {setting['threads']} threads), memory: {setting['memory']}"
    )
    atomic_write_text(out_dir / "benchmark.md", f"{header}\n\n{markdown_table(results)}\n")
    with open(out_dir / "benchmark.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow([c[1] for c in COLUMNS])
        for name, row in results.items():
            writer.writerow([name if key == "method" else row.get(key) for _, key, _ in COLUMNS])
    report["plots"] = [str(p) for p in write_plots(results, out_dir, f"{setting['backbone']} {setting['resolution']}")]
    return write_json(out_dir / "benchmark.json", report)


# ----------------------------------------------------------------------------------------------- main
def benchmark(cfg: DictConfig) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.batch_size < 1 or cfg.repeats < 1:
        raise ConfigError(f"batch_size={cfg.batch_size} and repeats={cfg.repeats} must be >= 1.")
    device = resolve_device(cfg.device)
    dtype = DTYPES[cfg.precision]
    images, labels, names, datamodule = sample_crops(cfg)
    checkpoints = cfg.get("checkpoints") or {}
    models = build_models(method_configs(cfg), datamodule.num_classes, datamodule.ignore_index, checkpoints)
    results: dict[str, dict] = {}
    for name, model in models.items():  # fvcore traces with the JIT, which inference_mode would break
        per_image = gflops_per_image(model, images, labels)
        metrics = SegMetrics(datamodule.num_classes, datamodule.ignore_index) if checkpoints.get(name) else None
        results[name] = {
            "gflops": statistics.fmean(per_image),
            "gflops_per_image": per_image,
            **token_statistics(model, images, labels, metrics),
        }
    with torch.inference_mode():
        x, y = images.to(device, dtype), labels.to(device)
        batches = [(x[i : i + cfg.batch_size], y[i : i + cfg.batch_size]) for i in range(0, len(x), cfg.batch_size)]
        with sdpa_context(cfg.sdpa):
            for name, model in models.items():
                model.to(device, dtype)
                results[name]["peak_mem_mb"] = forward_memory_mb(model, *batches[0])
            seconds = time_passes(models, batches, cfg, device)
    for name, passes in seconds.items():
        results[name]["images_per_s"] = statistics.median(len(x) / s for s in passes)
        results[name]["pass_seconds"] = passes
    reference = "segvit" if "segvit" in results else next(iter(results))
    add_ratios(results, reference)
    memory = (
        "CUDA max_memory_allocated during the forward minus allocated before"
        if device.type == "cuda"
        else "CPU peak RSS (VmHWM) during the forward minus RSS before"
    )
    report = {
        "setting": {
            "backbone": cfg.backbone.name,
            "resolution": cfg.resolution,
            "data": cfg.data.name,
            "split": cfg.data.get("split"),
            "crop": cfg.crop,
            "images": len(images),
            "policy": cfg.policy,
            "force_halt": cfg.force_halt,
            "batch_size": cfg.batch_size,
            "warmup": cfg.warmup,
            "repeats": cfg.repeats,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "precision": cfg.precision,
            "sdpa": cfg.sdpa,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "memory": memory,
            "reference": reference,
        },
        "images": names,
        "methods": results,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    path = write_outputs(report, Path(cfg.paths.output_dir))
    print(Path(cfg.paths.output_dir, "benchmark.md").read_text())
    print(f"benchmark: {path}")
    return report


@hydra.main(version_base="1.3", config_path="conf", config_name="benchmark")
def main(cfg: DictConfig) -> None:
    benchmark(cfg)


if __name__ == "__main__":
    register_resolvers()
    main()
