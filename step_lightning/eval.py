"""Evaluate a trained checkpoint on a dataset split.

    python -m step_lightning.eval ckpt_path=outputs/.../checkpoints/last.ckpt [eval.mode=slide] [data.split=...]

The model is rebuilt from the checkpoint alone. The dataset and evaluation settings come from the training
run's config, found next to the checkpoint (``<run>/.hydra/config.yaml``, else the ``config`` of
``<run>/summary.json``; ``run_config=`` names another file), with this command line's overrides on top;
without a run config, from the command line alone. Every image of ``data.split`` (default: the validation
split) is scored, whatever the training run limited. Prints mIoU / aAcc / per-class IoU and tokens per
image, writes ``eval.json`` in this run's directory and ends with ``eval: <path>``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import hydra
import lightning as L
from hydra.core.override_parser.overrides_parser import OverridesParser
from lightning.pytorch.callbacks import TQDMProgressBar
from omegaconf import DictConfig, OmegaConf

from step_lightning.cli import checked_command_line, run_command
from step_lightning.config.checks import check_eval_protocol, check_values
from step_lightning.config.model import model_spec, policy_network
from step_lightning.core import ConfigError
from step_lightning.lit.checkpoint import load_module
from step_lightning.lit.summary import headline, sample_batch, validation_gflops, validation_summary, write_summary
from step_lightning.models.engine import InferenceOptions

log = logging.getLogger(__name__)

# Keys that belong to the eval command itself and never come from the training run.
EVAL_ONLY_KEYS = ("ckpt_path", "run_config")
# Method presets are global packages: `method=` on the command line changes these keys.
METHOD_KEYS = ("method", "tokenizer", "tau", "prune_heads")
# What an evaluation may change in a trained model: its tokenizer (the encoder and heads stay the trained ones).
TOKENIZER_KEYS = ("method", "tokenizer", "tau", "cts_k", "policy")


class EvalProgressBar(TQDMProgressBar):
    """Lightning's bar (batches done, time left) named after what is evaluated: method, split, protocol."""

    def __init__(self, description: str):
        super().__init__(refresh_rate=1 if sys.stderr.isatty() else 50)  # a log file gets every 50th batch
        self.description = description

    @property
    def validation_description(self) -> str:
        return self.description


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


def format_table(class_names: Sequence[str], iou: Sequence[float]) -> str:
    width = max([len("class")] + [len(str(n)) for n in class_names])
    lines = [f"{'class':<{width}}  {'IoU':>6}"]
    for name, value in zip(class_names, iou, strict=True):
        lines.append(f"{name:<{width}}  {'n/a' if value != value else f'{value:6.2f}':>6}")
    return "\n".join(lines)


def tokenizer_override(cfg: DictConfig, overrides: Sequence[str]) -> tuple[dict | None, object]:
    """The tokenizer the command line asks for (``method=``/``tau=``/``policy=``...), as ModelSpec fields, and its
    policy network; (None, None) when the command line keeps the trained one."""
    keys = {o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides))}
    if not keys & set(TOKENIZER_KEYS):
        return None, None
    cfg = cfg.copy()
    cfg.model.tau, cfg.model.cts_k = cfg.get("tau"), cfg.get("cts_k")  # a resolved run config froze the old ones
    spec = model_spec(cfg, num_classes=1, ignore_index=255)
    fields = {k: getattr(spec, k) for k in ("tokenizer", "tau", "cts_k", "policy", "policy_sizes", "policy_head")}
    return fields, policy_network(cfg, spec)


def evaluate(eval_cfg: DictConfig, overrides: Sequence[str] = ()) -> dict:
    """Evaluate ``eval_cfg.ckpt_path``; ``overrides`` are the command-line overrides that produced
    ``eval_cfg`` (applied on top of the training run's config). Returns what eval.json holds."""
    start = time.time()
    ckpt = checkpoint_path(eval_cfg)
    run_cfg = find_run_config(ckpt, eval_cfg.get("run_config"))
    if run_cfg is None:
        log.info(f"eval: no run config next to {ckpt}; the dataset comes from the command line")
        cfg = eval_cfg
    else:
        cfg = merge_run_config(run_cfg, eval_cfg, overrides)
    check_values(cfg)
    check_eval_protocol(cfg)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    datamodule = hydra.utils.instantiate(cfg.data)
    tokenizer, policy = tokenizer_override(cfg, overrides)
    module = load_module(ckpt, tokenizer=tokenizer, policy=policy, eval_mode=cfg.eval.mode, eval_crop=cfg.eval.crop,
                         eval_stride=cfg.eval.stride)
    module.inference = InferenceOptions.from_config(eval_cfg)
    trained_classes = module.model.num_classes
    if trained_classes != datamodule.num_classes:
        raise ConfigError(
            f"{ckpt} was trained for {trained_classes} classes but data={cfg.data.name} has "
            f"{datamodule.num_classes}; evaluate on the dataset it was trained on (data=...)."
        )
    split = cfg.data.get("split") or getattr(datamodule, "split", None)
    loader = datamodule.eval_dataloader(split)
    trainer = L.Trainer(
        accelerator=cfg.trainer.get("accelerator", "auto"),
        devices=1,
        precision=cfg.trainer.get("precision", "32-true"),
        logger=False,
        callbacks=[EvalProgressBar(f"eval {cfg.get('method')} {split} ({cfg.eval.mode})")],
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=str(output_dir),
    )
    trainer.validate(module, dataloaders=loader, verbose=False)
    image, label = sample_batch(datamodule, count=1, dataset=loader.dataset)
    options = module.inference
    result = {
        **validation_summary(module.last_val, datamodule.class_names),
        "gflops": validation_gflops(module.model, module.last_val, image.to(module.device), label.to(module.device),
                                    options),
        "budget": options.budget,
        "halt_budget": options.halt_budget,
        "tau": module.hparams.model.get("tau"),
        "images": module.last_val["token_stats"]["images"],
        "split": split,
        "mode": cfg.eval.mode,
        "crop": cfg.eval.crop,
        "stride": cfg.eval.stride,
        "checkpoint": str(ckpt),
        "wall_time_s": time.time() - start,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    log.info(format_table(datamodule.class_names, result["per_class_IoU"].values()))
    line = f"{headline(result)} images={result['images']} split={split} mode={cfg.eval.mode}"
    return write_summary(result, output_dir / "eval.json", line, label="eval")


@checked_command_line()
@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    return run_command(lambda c: evaluate(c, HydraConfig.get().overrides.task)["mIoU"], cfg)


if __name__ == "__main__":
    main()
