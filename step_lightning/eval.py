"""Evaluate a trained checkpoint on the validation split.

    python -m step_lightning.eval ckpt_path=outputs/.../checkpoints/last.ckpt [eval.mode=slide] [data.root=...]

The model is rebuilt from the training run's config, found next to the checkpoint
(``<run>/.hydra/config.yaml``, else the ``config`` of ``<run>/summary.json``; ``run_config=`` names
another file). Overrides given on this command line are applied on top of that config, so the dataset,
inference mode and paths can change while the architecture stays the one that was trained. Without a run
config the command line alone describes the model. Prints mIoU / aAcc / per-class IoU and tokens per image,
writes ``eval.json`` in this run's directory and ends with ``eval: <path>``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from step_lightning.config import check_config, register_resolvers
from step_lightning.core import ConfigError
from step_lightning.core.files import write_json

# Keys that belong to the eval command itself and never come from the training run.
EVAL_ONLY_KEYS = ("ckpt_path", "run_config")
# Method presets are global packages: overriding `method=` on the command line changes these keys.
METHOD_KEYS = ("method", "tokenizer", "tau", "prune_heads")


def checkpoint_path(cfg: DictConfig) -> Path:
    if OmegaConf.is_missing(cfg, "ckpt_path") or cfg.get("ckpt_path") in (None, ""):
        raise ConfigError(
            "ckpt_path is required: python -m step_lightning.eval ckpt_path=outputs/<run>/checkpoints/last.ckpt"
        )
    path = Path(str(cfg.ckpt_path)).expanduser()
    if not path.is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} does not exist; give the .ckpt file a training run wrote.")
    return path


def find_run_config(ckpt: Path, explicit: str | None = None) -> DictConfig | None:
    """The training run's config: an explicit file, else ``.hydra/config.yaml`` or ``summary.json`` of the run
    directory holding ``checkpoints/<ckpt>`` (or the checkpoint's own folder)."""
    if explicit:
        file = Path(explicit).expanduser()
        if not file.is_file():
            raise ConfigError(f"run_config={explicit} does not exist; give a run's .hydra/config.yaml or summary.json.")
        candidates = [file]
    else:
        candidates = [
            d / name for d in (ckpt.parent.parent, ckpt.parent) for name in (".hydra/config.yaml", "summary.json")
        ]
    for file in candidates:
        if not file.is_file():
            continue
        if file.suffix == ".json":
            config = json.loads(file.read_text()).get("config")
            if config is None:
                raise ConfigError(f"{file} has no 'config' entry; pass run_config=<the run's .hydra/config.yaml>.")
            return OmegaConf.create(config)
        return OmegaConf.load(file)
    return None


def _raw_value(cfg: DictConfig, key: str):
    """The value at a dotted key without resolving interpolations, so ``${...}`` follow the merged config."""
    value = OmegaConf.to_container(cfg, resolve=False)
    for part in key.split("."):
        value = value[part]
    return value


def merge_run_config(run_cfg: DictConfig, eval_cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """The training run's config with this command's overrides (values taken from the composed eval config)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    merged = run_cfg.copy()
    OmegaConf.set_struct(merged, False)
    keys: list[str] = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if key.startswith("hydra.") or key == "hydra" or key in EVAL_ONLY_KEYS:
            continue
        if override.is_delete():
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(merged, parent) if parent else merged
            if isinstance(node, DictConfig) and leaf in node:
                del node[leaf]
            continue
        keys.extend(METHOD_KEYS if key == "method" else [key])
    for key in keys:
        if OmegaConf.select(eval_cfg, key, default="__absent__", throw_on_missing=False) != "__absent__":
            OmegaConf.update(merged, key, _raw_value(eval_cfg, key), merge=False, force_add=True)
    for key in EVAL_ONLY_KEYS:
        merged[key] = eval_cfg.get(key)
    # The outputs of this evaluation go to its own run directory, never the training run's.
    merged.paths = merged.get("paths") or {}
    merged.paths.output_dir = str(eval_cfg.paths.output_dir)
    return merged


def trained_policy(ckpt: Path) -> Path:
    """The policy a ``policy=train`` run trained first (its weights are also inside the segmenter checkpoint)."""
    run_dir = ckpt.parent.parent
    summary = run_dir / "summary.json"
    if summary.is_file():
        policy = json.loads(summary.read_text()).get("config", {}).get("policy")
        if policy not in (None, "train", "oracle") and Path(policy).is_file():
            return Path(policy)
    candidates = sorted((run_dir / "policy").glob("*.ckpt"))
    if not candidates:
        raise ConfigError(
            f"the run of {ckpt} trained its dCTS policy (policy=train) but {run_dir / 'policy'} holds no "
            "checkpoint; pass policy=<policy .ckpt> or policy=oracle."
        )
    return candidates[0]


def load_weights(module: torch.nn.Module, ckpt: Path, num_classes: int) -> dict:
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)  # a run's own Lightning checkpoint
    if "state_dict" not in checkpoint:
        raise ConfigError(f"{ckpt} is not a Lightning checkpoint of step_lightning.train (no 'state_dict').")
    trained_classes = checkpoint.get("hyper_parameters", {}).get("num_classes", num_classes)
    if trained_classes != num_classes:
        raise ConfigError(
            f"{ckpt} was trained for {trained_classes} classes but the dataset has {num_classes}; "
            "evaluate on the dataset it was trained on (data=...)."
        )
    state = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("val_metrics.")}
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("val_metrics.")]
    # A trained policy's weights are unused when this evaluation asks for policy=oracle.
    unexpected = [k for k in result.unexpected_keys if not k.startswith("model.tokenizer.policy.")]
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise ConfigError(
            f"{ckpt} does not match the model this config builds ({len(missing)} missing, "
            f"{len(unexpected)} unexpected tensors, e.g. {example}); without the run's "
            ".hydra/config.yaml or summary.json next to the checkpoint, repeat the training overrides "
            "(backbone=..., method=..., crop_size=...) or pass run_config=<file>."
        )
    return checkpoint


def format_table(class_names: Sequence[str], iou: Sequence[float]) -> str:
    width = max([len("class")] + [len(str(n)) for n in class_names])
    lines = [f"{'class':<{width}}  {'IoU':>6}"]
    for name, value in zip(class_names, iou, strict=True):
        lines.append(f"{name:<{width}}  {'n/a' if value != value else f'{value:6.2f}':>6}")
    return "\n".join(lines)


def evaluate(eval_cfg: DictConfig, overrides: Sequence[str] = ()) -> dict:
    """Evaluate ``eval_cfg.ckpt_path``; ``overrides`` are the command-line overrides that produced
    ``eval_cfg`` (applied on top of the training run's config). Returns what eval.json holds."""
    from step_lightning.models.factory import tokenizer_kind
    from step_lightning.train import build_module

    start = time.time()
    ckpt = checkpoint_path(eval_cfg)
    run_cfg = find_run_config(ckpt, eval_cfg.get("run_config"))
    if run_cfg is None:
        print(f"eval: no run config next to {ckpt}; the model is built from the command-line config")
        cfg = eval_cfg
    else:
        cfg = merge_run_config(run_cfg, eval_cfg, overrides)
    if cfg.get("policy") == "train" and tokenizer_kind(cfg) != "patch":
        cfg.policy = str(trained_policy(ckpt))
    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    datamodule = hydra.utils.instantiate(cfg.data)
    module = build_module(cfg, datamodule)
    load_weights(module, ckpt, datamodule.num_classes)
    trainer = L.Trainer(
        accelerator=cfg.trainer.get("accelerator", "auto"),
        devices=1,
        precision=cfg.trainer.get("precision", "32-true"),
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=str(output_dir),
        limit_val_batches=cfg.trainer.get("limit_val_batches"),
    )
    trainer.validate(module, datamodule=datamodule, verbose=False)
    val = module.last_val
    iou = val["IoU"].tolist()
    token_stats = val.get("token_stats")
    tokens = token_stats["total"]["mean"] if token_stats else val["tokens"]
    result = {
        "mIoU": float(val["mIoU"]),
        "aAcc": float(val["aAcc"]),
        "per_class_IoU": dict(zip(datamodule.class_names, iou, strict=True)),
        "tokens_per_image": tokens,
        "token_stats": token_stats,
        "exit_stats": val.get("exit_stats"),
        "mode": cfg.eval.mode,
        "crop": cfg.eval.crop,
        "stride": cfg.eval.stride,
        "checkpoint": str(ckpt),
        "wall_time_s": time.time() - start,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    path = write_json(output_dir / "eval.json", result)
    print(format_table(datamodule.class_names, iou))
    print(f"mIoU={result['mIoU']:.2f} aAcc={result['aAcc']:.2f} tokens_per_image={result['tokens_per_image']:.1f} "
          f"mode={cfg.eval.mode}")
    print(f"eval: {path}")
    return result


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    try:
        return evaluate(cfg, HydraConfig.get().overrides.task)["mIoU"]
    except ConfigError as e:
        raise SystemExit(f"eval: error: {e}") from None


if __name__ == "__main__":
    register_resolvers()
    main()
