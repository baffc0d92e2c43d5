"""Several methods side by side: one config per method entry, composed through Hydra like the command line,
and models that share every tensor they have in common, so methods differ only in token reduction.

Entries: a method preset (``segvit``), a preset with thresholds (``dcts@4999``), or a dict
``{name: step8, method: step, prune_heads: [8], force_halt: 0.4}`` whose other keys are config overrides
for that method only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from step_lightning.config.checks import check_config
from step_lightning.config.model import build_model_from_config
from step_lightning.core import ConfigError
from step_lightning.measure.timing import synchronize
from step_lightning.models.base import SegmenterBase
from step_lightning.models.engine import InferenceOptions

# Timed engines of the benchmark: the padded store, the packed store, packed + fast (graphs/compile, fused
# policy; see step_lightning.models.engine).
ENGINES = ("padded", "packed", "fast")

# Keys a method preset sets: a command-line value of these would override every method alike.
METHOD_KEYS = ("methods", "method", "tokenizer", "tau", "prune_heads")


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


def method_config(config_name: str, overrides: Sequence[str], spec: dict, output_dir: str) -> DictConfig:
    """``config_name`` composed with the command's ``overrides`` (minus the method keys), the entry's preset
    and its keys on top. Needs an initialised Hydra (inside a command, or ``initialize_config_module``)."""
    parser = OverridesParser.create()
    kept = [o for o, parsed in zip(overrides, parser.parse_overrides(list(overrides)), strict=True)
            if parsed.key_or_group not in METHOD_KEYS]
    try:
        if GlobalHydra.instance().is_initialized():  # inside a command: compose from its config source
            cfg = compose(config_name=config_name, overrides=[*kept, f"method={spec['method']}"])
        else:  # called from Python
            with initialize_config_module("step_lightning.conf", version_base="1.3"):
                cfg = compose(config_name=config_name, overrides=[*kept, f"method={spec['method']}"])
    except Exception as err:  # Hydra's MissingConfigException and override errors
        raise ConfigError(f"method entry '{spec['name']}': {str(err).splitlines()[0]}") from None
    with open_dict(cfg):
        cfg.paths.output_dir = output_dir
        for key, value in spec.items():
            if key not in ("name", "method"):
                OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def method_configs(config_name: str, overrides: Sequence[str], entries, output_dir: str) -> dict[str, DictConfig]:
    """One composed config per entry, by entry name."""
    configs: dict[str, DictConfig] = {}
    for spec in map(parse_method, entries):
        if spec["name"] in configs:
            raise ConfigError(f"two method entries are named '{spec['name']}'; give dict entries distinct names.")
        configs[spec["name"]] = method_config(config_name, overrides, spec, output_dir)
    return configs


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


def build_models(configs: dict[str, DictConfig], num_classes: int, ignore_index: int) -> dict[str, SegmenterBase]:
    """One eval-mode model per config, sharing the tensors of the models built before it."""
    models: dict[str, SegmenterBase] = {}
    for name, cfg in configs.items():
        check_config(cfg)
        torch.manual_seed(cfg.seed)
        model = build_model_from_config(cfg, num_classes, ignore_index)
        share_weights(model, list(models.values()))
        models[name] = model.eval()
    return models


def engine_options(options: InferenceOptions, engine: str) -> InferenceOptions:
    """``options`` on one of the benchmark's ``ENGINES``."""
    return replace(options, engine="padded" if engine == "padded" else "packed", fast=engine == "fast")


def engine_forward(model: SegmenterBase, options: InferenceOptions, engine: str):
    """``forward(images, labels)`` of ``model`` with ``options`` on one of ``ENGINES``."""
    options = engine_options(options, engine)
    return lambda images, labels: model(images, labels, options)


def training_step(model: SegmenterBase, criterion: nn.Module, autocast):
    """``step(images, labels)``: one training forward, the ATM loss and its backward (gradients discarded)."""

    def step(images, labels):
        model.zero_grad(set_to_none=True)
        with autocast():
            out = model(images, labels)
        criterion(out.outputs, labels)["loss"].backward()

    return step


def training_split(model: SegmenterBase, criterion: nn.Module, autocast, batches: list, device) -> dict[str, float]:
    """ms per batch of a training step's parts, the device synchronised between them: ``forward`` (the model's),
    ``loss`` (the ATM loss and its backward to the heads' outputs) and ``backward`` (the model's, from there)."""
    parts = dict.fromkeys(("forward", "loss", "backward"), 0.0)
    for images, labels in batches:
        model.zero_grad(set_to_none=True)
        synchronize(device)
        start = time.perf_counter()
        with autocast():
            out = model(images, labels)
        heads = [tensor for output in out.outputs for tensor in output.values()]
        synchronize(device)
        forward_end = time.perf_counter()
        grads = torch.autograd.grad(criterion(out.outputs, labels)["loss"], heads, allow_unused=True)
        synchronize(device)
        loss_end = time.perf_counter()
        used = [(tensor, grad) for tensor, grad in zip(heads, grads, strict=True) if grad is not None]
        torch.autograd.backward([t for t, _ in used], [g for _, g in used])
        synchronize(device)
        end = time.perf_counter()
        for part, seconds in (("forward", forward_end - start), ("loss", loss_end - forward_end),
                              ("backward", end - loss_end)):
            parts[part] += seconds * 1e3 / len(batches)
    return parts
