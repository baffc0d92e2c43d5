"""Optional extras: a logger or launcher whose package is not installed is a one-line error naming the
extra that installs it, before anything runs, instead of an import error deep in a run (or Hydra's
"could not load" when a launcher plugin is absent)."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

from omegaconf import DictConfig

from step_lightning.core import ConfigError

# Logger class (a logger config's _target_, last part) -> (the module it needs, the extra that installs it).
LOGGER_EXTRAS = {"WandbLogger": ("wandb", "wandb"), "TensorBoardLogger": ("tensorboard", "tensorboard")}
# hydra/launcher option -> (the Hydra plugin it composes from, the extra that installs it).
LAUNCHER_EXTRAS = {"slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm")}


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package of a dotted name
        return False


def missing_extra(option: str, module: str, extra: str) -> ConfigError:
    return ConfigError(
        f"{option} needs the optional package {module.split('.')[-1]}, which is not installed: "
        f"pip install 'step-lightning[{extra}]'"
    )


def check_logger_extras(cfg: DictConfig) -> None:
    """Every logger the config selects can be imported."""
    for key, logger in (cfg.get("logger") or {}).items():
        if not logger or "_target_" not in logger:
            continue
        need = LOGGER_EXTRAS.get(str(logger._target_).rsplit(".", 1)[-1])
        if need and not installed(need[0]):
            raise missing_extra(f"logger={key}", *need)


def check_launcher_extras(overrides: Sequence[str]) -> None:
    """Command-line overrides select no launcher whose plugin is missing (checked before Hydra composes)."""
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        need = LAUNCHER_EXTRAS.get(value) if key == "hydra/launcher" else None
        if need and not installed(need[0]):
            raise missing_extra(f"hydra/launcher={value}", *need)
