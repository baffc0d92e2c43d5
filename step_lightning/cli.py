"""What every command shares: resolvers registered before Hydra composes, and one error ladder that turns
the mistakes a user must fix into one ``error: ...`` line (exit status 1) instead of a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

import torch
from omegaconf import DictConfig

from step_lightning.config.extras import check_launcher_extras
from step_lightning.config.resolvers import register_resolvers
from step_lightning.core import ConfigError
from step_lightning.lit.callbacks.durability import NonFiniteLossError

T = TypeVar("T")

register_resolvers()  # before any @hydra.main composes a config that uses them


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


def run_command(command: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    """Run one command on its composed config with the shared error ladder."""
    try:
        return command(cfg)
    except (ConfigError, NonFiniteLossError) as e:
        raise SystemExit(f"error: {e}") from None
    except (RuntimeError, MemoryError) as e:
        if out_of_memory(e):
            raise SystemExit(f"error: {oom_advice(cfg, e)}") from None
        raise


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
