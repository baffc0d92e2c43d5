"""Where a training run continues from: an explicit ``ckpt_path`` (of the policy phase or of the segmenter) or,
with ``auto_resume``, what its own folder holds, but only when that folder's run had the same settings.

A run folder holds ``run_config.yaml`` (the resolved settings its checkpoints were trained with),
``policy/last.ckpt`` and ``policy/policy.json`` (the policy phase: in progress, finished) and
``checkpoints/last.ckpt`` (the segmenter). Hydra rewrites ``.hydra/config.yaml`` before the run starts, so
it cannot tell what the folder's checkpoints were trained with; ``run_config.yaml`` can.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from step_lightning.core import ConfigError
from step_lightning.core.files import atomic_write_text
from step_lightning.lit.callbacks.durability import LAST
from step_lightning.models.checkpoint import read_checkpoint

RUN_CONFIG = "run_config.yaml"
POLICY_DIR = "policy"
POLICY_RESULT = "policy.json"  # written when the policy phase is over: its checkpoint, metrics and steps
# Keys that say how to resume, not what is trained.
RESUME_KEYS = ("ckpt_path", "auto_resume")
SHOWN = 6  # differing keys named in the error


@dataclass
class Resume:
    """``phase``: the phase that continues ("policy" or "segment"); ``checkpoint``: the Lightning checkpoint
    fit continues from (None: the policy phase is over and the segmenter starts afresh); ``policy``: the
    finished policy phase's result, when known; ``state``: the checkpoint dict (tensors memory-mapped)."""

    phase: str
    checkpoint: Path | None = None
    policy: dict | None = None
    state: dict | None = None


def finished_policy(run_dir: Path) -> dict | None:
    """The result the policy phase of ``run_dir`` wrote when it ended, if its checkpoint is still there."""
    file = run_dir / POLICY_DIR / POLICY_RESULT
    if not file.is_file():
        return None
    result = json.loads(file.read_text())
    return result if Path(result.get("checkpoint", "")).is_file() else None


def checkpoint_phase(path: Path, state: dict) -> str:
    hparams = state.get("hyper_parameters") or {}
    if isinstance(hparams.get("model"), dict):
        return "segment"
    if "sizes" in hparams:
        return "policy"
    raise ConfigError(f"ckpt_path={path} is not a checkpoint of step_lightning.train; give a run's "
                      "checkpoints/last.ckpt (or policy/last.ckpt while it trained its policy).")


def plan_resume(cfg: DictConfig, run_dir: Path, trains_policy: bool) -> Resume | None:
    """What this run continues from; None for a fresh start. ``trains_policy``: the run has a policy phase.

    Raises ConfigError, before any work, for an unreadable checkpoint, a policy checkpoint given to a run
    without a policy phase, or a folder whose run had other settings (unless ``auto_resume=force``).
    """
    if cfg.get("ckpt_path"):
        path = Path(str(cfg.ckpt_path)).expanduser()
        if path.is_dir():
            raise ConfigError(f"ckpt_path={cfg.ckpt_path} is a folder, not a training checkpoint: a model folder holds "
                              f"no training state to resume; start from its weights with init_from={cfg.ckpt_path}.")
        if not path.is_file():
            raise ConfigError(f"ckpt_path={cfg.ckpt_path} does not exist; give a run's checkpoints/{LAST}.")
        state = read_checkpoint(path, "ckpt_path", mmap=True)
        phase = checkpoint_phase(path, state)
        if phase == "policy" and not trains_policy:
            raise ConfigError(f"ckpt_path={path} is a policy checkpoint and this run trains no policy; give it as "
                              "policy=<path>, or resume the segmenter from its run's checkpoints/last.ckpt.")
        if phase == "segment" and cfg.get("task") == "policy":
            raise ConfigError(f"ckpt_path={path} is a segmenter checkpoint; task=policy resumes from a "
                              "policy/last.ckpt.")
        own_run = path.parent.parent
        return Resume(phase, path, finished_policy(own_run) if phase == "segment" else None, state)
    if not cfg.get("auto_resume"):
        return None
    segment, policy = run_dir / "checkpoints" / LAST, run_dir / POLICY_DIR / LAST
    finished = finished_policy(run_dir) if trains_policy and cfg.get("task") != "policy" else None
    if cfg.get("task") == "policy":
        candidates = [("policy", policy)]
    else:
        candidates = [("segment", segment)] + ([("policy", policy)] if trains_policy else [])
    found = next(((phase, path) for phase, path in candidates if path.is_file()), None)
    if found is None and finished is None:
        return None
    check_same_settings(cfg, run_dir)
    if found is None or (found[0] == "policy" and finished is not None):
        return Resume("segment", None, finished)
    phase, path = found
    state = read_checkpoint(path, "auto_resume", mmap=True)
    return Resume(phase, path, finished, state)


def flat(container, prefix: str = "") -> dict:
    if isinstance(container, dict):
        items = {}
        for key, value in container.items():
            items |= flat(value, f"{prefix}{key}.")
        return items or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): container}


def differences(saved: dict, current: dict) -> list[str]:
    """``key: old -> new`` for every setting that differs, the resume keys left out. Paths inside each run's
    own folder compare equal, so a run folder that was moved continues where it is."""
    old, new = (within_run(flat(c), (c.get("paths") or {}).get("output_dir")) for c in (saved, current))
    changed = []
    for key in sorted(old.keys() | new.keys()):
        if key.split(".")[0] in RESUME_KEYS or old.get(key, "<unset>") == new.get(key, "<unset>"):
            continue
        changed.append(f"{key}: {old.get(key, '<unset>')} -> {new.get(key, '<unset>')}")
    return changed


def within_run(settings: dict, run_dir: str | None) -> dict:
    if not run_dir:
        return settings
    return {k: v.replace(run_dir, "<run dir>") if isinstance(v, str) else v for k, v in settings.items()}


def resolved(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def check_same_settings(cfg: DictConfig, run_dir: Path) -> None:
    """Continue a folder's run only with the settings it was started with (or when forced)."""
    file = run_dir / RUN_CONFIG
    if not file.is_file() or str(cfg.get("auto_resume")) == "force":
        return
    changed = differences(OmegaConf.to_container(OmegaConf.load(file), resolve=False), resolved(cfg))
    if changed:
        more = f" and {len(changed) - SHOWN} more" if len(changed) > SHOWN else ""
        raise ConfigError(
            f"{run_dir} holds a run with other settings ({'; '.join(changed[:SHOWN])}{more}); rerun with its "
            "settings to continue it, give a new hydra.run.dir for a new run, or add auto_resume=force to "
            "continue it with these."
        )


def save_run_config(cfg: DictConfig, run_dir: Path) -> None:
    """Record the settings this folder's checkpoints are trained with (rank 0; other ranks run the same)."""
    if rank_zero_only.rank == 0:
        atomic_write_text(run_dir / RUN_CONFIG, OmegaConf.to_yaml(OmegaConf.create(resolved(cfg))))
