"""Shared fixtures: Hydra composition of the repo's conf/ without a Hydra app, and tiny training runs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from step_lightning.config.resolvers import register_resolvers

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "step_lightning" / "conf"

# A SegViT run that trains and validates in seconds on CPU: 2-layer ViT-Ti, 64 px, 16 train / 4 val scenes.
# The method and policy are pinned so that changes of train.yaml's defaults do not change these tests.
TINY_RUN = [
    "method=segvit",
    "policy=oracle",
    "backbone.depth=2",
    "backbone.taps=[1,2]",
    "crop_size=64",
    "data.num_train=16",
    "data.num_val=4",
    "data.batch_size=4",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "logger=csv",
    "callbacks.progress_bar=null",
]


def compose_config(overrides: Sequence[str] = (), config_name: str = "train", output_dir: Path | None = None):
    """Compose conf/<config_name>.yaml like the CLI would. ``paths.output_dir`` normally resolves from
    ``${hydra:runtime.output_dir}``, which only exists inside a Hydra app, so it is set explicitly."""
    register_resolvers()
    overrides = list(overrides)
    if output_dir is not None:
        overrides.append(f"paths.output_dir={output_dir}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


@pytest.fixture
def compose_cfg(tmp_path) -> Callable[..., DictConfig]:
    """``compose_cfg(overrides, config_name="train")`` with outputs under the test's tmp_path."""

    def _compose(overrides: Sequence[str] = (), config_name: str = "train", output_dir: Path | None = None):
        return compose_config(overrides, config_name, output_dir or tmp_path / "run")

    return _compose


def run_train(overrides: Sequence[str], output_dir: Path) -> dict:
    """``step_lightning.train.train`` on a composed config; returns its summary."""
    from step_lightning.train import train

    return train(compose_config(overrides, "train", output_dir))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    """One tiny SegViT training run shared by the tests that read its outputs (summary, checkpoints)."""
    output_dir = tmp_path_factory.mktemp("tiny_run")
    summary = run_train(TINY_RUN, output_dir)
    return {"summary": summary, "output_dir": output_dir}


def run_module(module: str, args: Sequence[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m <module> args`` from the repo root (conf/ is found relative to the package)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", module, *args, f"hydra.run.dir={cwd}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
