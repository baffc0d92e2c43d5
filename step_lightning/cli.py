"""What every command shares: resolvers registered before Hydra composes, the known-harmless warnings and
messages silenced in one place, leftover temporary files cleared from the run folder, and one error ladder
that turns the mistakes a user must fix into one ``error: ...`` line (exit status 1) instead of a traceback.

The commands write their lines through ``logging``: Hydra's job logging (``conf/hydra/default.yaml``) prints
them and keeps them in ``<run dir>/<command>.log``.
"""

from __future__ import annotations

import errno
import functools
import logging
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from hydra.errors import InstantiationException
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from step_lightning.config.extras import check_launcher_extras
from step_lightning.config.resolvers import register_resolvers
from step_lightning.core import ConfigError
from step_lightning.core.files import remove_temporaries
from step_lightning.lit.callbacks.durability import NonFiniteLossError

T = TypeVar("T")
log = logging.getLogger(__name__)

register_resolvers()  # before any @hydra.main composes a config that uses them

# Warnings every run triggers that say nothing about this run: (message regex, category).
HARMLESS_WARNINGS = (
    (r"`torch\.jit\.script` is deprecated", FutureWarning),  # timm's EfficientNet, at import
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", Warning),  # Lightning vs torch 2.14
    (r"Found \d+ module\(s\) in eval mode", Warning),  # the frozen dCTS policy, on purpose
    (r"The number of training batches .* is smaller than the logging interval", Warning),
    (r".*does not have many workers", Warning),  # num_workers=0 is the synthetic data's choice
    # DDP: validation metrics are torchmetrics states summed over the ranks, so they are already global.
    (r"Using `DistributedSampler` with the dataloaders\. During `trainer\.validate\(\)`", Warning),
    (r"It is recommended to use `self\.log\('val/.*sync_dist=True\)` when logging on epoch level", Warning),
)
# Lightning's info messages that are noise here (kept out of the console and the run log by HarmlessFilter).
HARMLESS_MESSAGES = re.compile(r"`weights_only` was not set|💡 Tip:")


def silence_harmless_warnings() -> None:
    for message, category in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


silence_harmless_warnings()  # at import: the jit warning fires while the commands import timm


class HarmlessFilter(logging.Filter):
    """Drops Lightning's known-harmless info lines; attached to the job logging's handlers."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not HARMLESS_MESSAGES.search(record.getMessage())


class BelowWarning(logging.Filter):
    """Keeps the console's stdout handler to info lines; warnings and errors go to stderr."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, the RuntimeErrors of other backends/older torch, the CPU allocator's."""
    text = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError | MemoryError) or (
        isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
    )


def disk_full(error: BaseException) -> bool:
    """OSError(ENOSPC), also when torch's zip writer reports it as a RuntimeError."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    return isinstance(error, RuntimeError) and "no space left on device" in str(error).lower()


def oom_advice(cfg: DictConfig, error: BaseException) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    data = cfg.get("data") or {}
    trainer = cfg.get("trainer") or {}
    backbone = cfg.get("backbone") or {}
    return (
        f"out of memory ({first[:200]}). Lower data.batch_size (now {data.get('batch_size')}, the global "
        f"batch; trainer=ddp splits it over GPUs), crop_size (now {cfg.get('crop_size')}), use "
        f"trainer.precision=bf16-mixed (now {trainer.get('precision')}) or a smaller backbone "
        f"(now {backbone.get('name')})."
    )


def disk_full_advice(cfg: DictConfig, error: BaseException) -> str:
    where = getattr(error, "filename", None) or (cfg.get("paths") or {}).get("output_dir") or "the output folder"
    return (
        f"no space left on device while writing {where}. Free disk space there or point hydra.run.dir at a "
        "disk with room; files are written whole or not at all, so a rerun into the same folder resumes from "
        "its last complete checkpoint."
    )


def worker_message(text: str) -> str:
    """A DataLoader worker re-raises the error as ``Caught <type> in DataLoader worker process k.`` followed by
    the worker's whole traceback; the user needs the original message, its last line."""
    if not text.startswith("Caught ") or "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    return last.partition(": ")[2] or last


def one_line_error(error: BaseException, cfg: DictConfig) -> str | None:
    """The ``error: ...`` line for a mistake the user must fix; None for anything else (a bug: its
    traceback is what helps)."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__  # Hydra wraps what a datamodule's constructor raised
    if isinstance(error, ConfigError | NonFiniteLossError):
        return worker_message(str(error))
    if out_of_memory(error):
        return oom_advice(cfg, error)
    if disk_full(error):
        return disk_full_advice(cfg, error)
    return None


def clear_temporaries(cfg: DictConfig) -> None:
    """Remove what killed writes left in this run's folder (rank 0 only: other ranks start while it writes)."""
    output_dir = (cfg.get("paths") or {}).get("output_dir")
    if output_dir and rank_zero_only.rank == 0:
        for path in remove_temporaries(Path(output_dir)):
            log.info(f"removed {path}, left by an interrupted write")


def run_command(command: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    """Run one command on its composed config with the shared error ladder."""
    logging.captureWarnings(True)  # the warnings left go to the console and the run's log
    clear_temporaries(cfg)
    try:
        return command(cfg)
    except Exception as error:
        message = one_line_error(error, cfg)
        if message is None:
            raise
        if not any(not isinstance(h, logging.NullHandler) for h in logging.getLogger().handlers):
            raise SystemExit(f"error: {message}") from None  # commands that write no log (predict, export)
        log.error(f"error: {message}")  # to the console and the run's log
        raise SystemExit(1) from None


def launcher_checked(main: Callable[..., T]) -> Callable[..., T]:
    """A command's ``main`` that first checks the command line for a launcher whose plugin is not installed
    (``hydra/launcher=slurm`` without the slurm extra): Hydra could not even compose it."""

    @functools.wraps(main)
    def checked(*args, **kwargs) -> T:
        try:
            check_launcher_extras(sys.argv[1:])
        except ConfigError as e:
            raise SystemExit(f"error: {e}") from None
        return main(*args, **kwargs)

    return checked
