"""What every command shares: resolvers registered before Hydra composes, the known-harmless warnings and
messages silenced in one place, the command line's output folder checked before Hydra writes there, the run
folder owned by one live run (``run.lock``), leftover temporary files cleared from it, and one error ladder
that turns the mistakes a user must fix into one ``error: ...`` line (exit status 1) instead of a traceback.

The commands write their lines through ``logging``: Hydra's job logging (``conf/hydra/default.yaml``) prints
them and keeps them in ``<run dir>/<command>.log``.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, InstantiationException
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from step_lightning.config.extras import check_launcher_extras
from step_lightning.config.resolvers import register_resolvers
from step_lightning.core import ConfigError
from step_lightning.core.files import disk_full, remove_temporaries
from step_lightning.core.lock import RunFolderLock, check_folder_free
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
    where = disk_full(error).filename or (cfg.get("paths") or {}).get("output_dir") or "the output folder"
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
    group = None
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        group = group or instantiated_group(error)
        error = error.__cause__  # Hydra wraps what a datamodule's constructor raised
    if isinstance(error, ConfigError | NonFiniteLossError):
        return worker_message(str(error))
    if group and isinstance(error, ValueError | MisconfigurationException):
        # A library's constructor refusing a setting of its group (Trainer(precision=17)): a config mistake.
        return f"{group}: {str(error).strip().splitlines()[0]} (fix the {group}.* setting)."
    if out_of_memory(error):
        return oom_advice(cfg, error)
    if disk_full(error):
        return disk_full_advice(cfg, error)
    return None


def instantiated_group(error: InstantiationException) -> str | None:
    """The config group whose ``_target_`` Hydra failed to call (its message ends with ``full_key: <key>``)."""
    match = re.search(r"full_key: ([\w.]+)", str(error))
    return match.group(1) if match else None


def own_run_folder(cfg: DictConfig) -> RunFolderLock | None:
    """Lock this command's run folder, where it has one (rank 0: the other ranks of a DDP run share it)."""
    output_dir = (cfg.get("paths") or {}).get("output_dir")
    if not output_dir or rank_zero_only.rank != 0:
        return None
    lock = RunFolderLock(output_dir, " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:500]).acquire()
    if lock.took_over:
        log.info(f"took over {lock.path} from pid {lock.took_over.get('pid')}, which is no longer running")
    return lock


def clear_temporaries(cfg: DictConfig) -> None:
    """Remove what killed writes left in this run's folder (rank 0 only: other ranks start while it writes)."""
    output_dir = (cfg.get("paths") or {}).get("output_dir")
    if output_dir and rank_zero_only.rank == 0:
        for path in remove_temporaries(Path(output_dir)):
            log.info(f"removed {path}, left by an interrupted write")


def run_command(command: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    """Run one command on its composed config, owning its run folder, with the shared error ladder."""
    logging.captureWarnings(True)  # the warnings left go to the console and the run's log
    lock = None
    try:
        lock = own_run_folder(cfg)
        clear_temporaries(cfg)  # after the lock: another live run's temporary files are not ours to remove
        return command(cfg)
    except Exception as error:
        message = one_line_error(error, cfg)
        if message is None:
            raise
        if not any(not isinstance(h, logging.NullHandler) for h in logging.getLogger().handlers):
            raise SystemExit(f"error: {message}") from None  # commands that write no log (predict, export)
        log.error(f"error: {message}")  # to the console and the run's log
        raise SystemExit(1) from None
    finally:
        if lock is not None:
            lock.release()


# Where conf/hydra/default.yaml puts a run / a sweep when the command line names no folder (under the cwd).
DEFAULT_FOLDERS = {"hydra.run.dir": "outputs", "hydra.sweep.dir": "multirun"}


def command_line_folder(argv: Sequence[str]) -> tuple[str, str | None] | None:
    """The option naming the run (or sweep) folder and the folder the command line gives it (None: Hydra's
    default); None when Hydra cannot parse the command line (it then reports the mistake itself)."""
    try:
        parsed = OverridesParser.create().parse_overrides([a for a in argv if "=" in a and not a.startswith("-")])
    except HydraException:
        return None
    values = {o.key_or_group: o.value() for o in parsed}
    multirun = "-m" in argv or "--multirun" in argv or str(values.get("hydra.mode")) == "MULTIRUN"
    option = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    return option, str(values[option]) if option in values else None


def check_output_folder(option: str, folder: str) -> None:
    """The folder, or its nearest existing parent, is a folder this process can write in."""
    path = Path(folder).expanduser()
    existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise ConfigError(f"{option}={folder}: {existing} is a file, not a folder; give a folder for the outputs.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{option}={folder}: cannot write in {existing} (permission denied or a read-only disk); give a folder "
            f"you can write to ({option}=<folder>)."
        )


def check_command_line(argv: Sequence[str], run_folder: bool = True) -> None:
    """What must hold before Hydra composes and writes ``.hydra/`` and the log into the run folder: no
    launcher whose plugin is missing; for a command with a run folder, a writable folder that no live run
    owns (DDP's other ranks share rank 0's)."""
    check_launcher_extras(argv)
    found = command_line_folder(argv) if run_folder else None
    if found is None:
        return
    option, folder = found
    # ${now:...} and the like name new subfolders: their existing part is what can be checked.
    check_output_folder(option, (folder or DEFAULT_FOLDERS[option]).split("${", 1)[0] or ".")
    if folder and option == "hydra.run.dir" and rank_zero_only.rank == 0 and Path(folder).is_dir():
        check_folder_free(folder)


def checked_command_line(run_folder: bool = True) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorates a command's Hydra ``main``: ``check_command_line`` first, its mistakes one ``error:`` line.
    ``run_folder``: the command writes a run folder (False for those whose hydra.run.dir is the cwd)."""

    def decorate(main: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(main)
        def checked(*args, **kwargs) -> T:
            try:
                check_command_line(sys.argv[1:], run_folder)
            except ConfigError as e:
                raise SystemExit(f"error: {e}") from None
            return main(*args, **kwargs)

        return checked

    return decorate
