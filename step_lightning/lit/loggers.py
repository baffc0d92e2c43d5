"""Loggers of a run: instantiated from the config group, W&B offline without a key, final metrics, one W&B
run per training (the policy's and the segmenter's), finished before the next job of a multirun."""

from __future__ import annotations

import logging
import netrc
import os
from urllib.parse import urlparse

import hydra
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def instantiate_group(group: DictConfig | None, exclude: tuple[str, ...] = (), name_suffix: str = "") -> list:
    """Instantiate every ``_target_`` entry of a callbacks/logger group (``name_suffix`` separates the
    loggers of a second training in the same run, e.g. the policy's)."""
    items = []
    for key, c in (group or {}).items():
        if c is None or "_target_" not in c or key in exclude:
            continue
        extra = {"name": f"{c.name}_{name_suffix}"} if name_suffix and "name" in c else {}
        items.append(hydra.utils.instantiate(c, **extra))
    return items


def final_metrics(summary: dict) -> dict[str, float]:
    """The flat ``final/...`` metrics of a summary: dataset-level scores, per-class IoU, cost, tokens, exits."""
    metrics = {"final/mIoU": summary["mIoU"], "final/aAcc": summary["aAcc"], "final/gflops": summary["gflops"],
               "final/tokens_per_image": summary["tokens_per_image"],
               "final/token_reduction": summary["token_stats"]["reduction"]}
    metrics |= {f"final/IoU/{name}": iou for name, iou in summary["per_class_IoU"].items() if iou == iou}
    if summary["exit_stats"]:
        metrics["final/halted_fraction"] = summary["exit_stats"]["halted_fraction"]
    return {k: float(v) for k, v in metrics.items()}


@rank_zero_only
def log_final(loggers: list[Logger], summary: dict, step: int) -> None:
    metrics = final_metrics(summary)
    for logger in loggers:
        logger.log_metrics(metrics, step=step)
        if isinstance(logger, WandbLogger):  # the run's summary is what the W&B runs table shows
            logger.experiment.summary.update(metrics)
        logger.save()


def finish_wandb(loggers: list[Logger]) -> None:
    """End this job's W&B run, so that the next job of a multirun (same process) starts its own."""
    if any(isinstance(logger, WandbLogger) for logger in loggers) and rank_zero_only.rank == 0:
        import wandb

        run = wandb.run
        offline = run is not None and run.settings.mode == "offline"
        directory = run.settings.sync_dir if run is not None else None
        wandb.finish()
        if offline:
            log.info(f"wandb: offline run saved; upload it with `wandb sync {directory}`")


def wandb_key_available() -> bool:
    """An API key in the environment or in ~/.netrc (where `wandb login` stores it), without touching wandb."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_offline_unless_logged_in(cfg: DictConfig) -> None:
    """No API key and no WANDB_MODE: run W&B offline instead of failing on a machine without network."""
    if "wandb" not in (cfg.get("logger") or {}) or os.environ.get("WANDB_MODE") or wandb_key_available():
        return
    log.info("wandb: no API key found; logging offline (set WANDB_API_KEY or run `wandb login` to log online)")
    os.environ["WANDB_MODE"] = "offline"  # before wandb reads its settings; inherited by DDP ranks
