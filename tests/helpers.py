"""What tests share: composing the package's configs like the CLI, running training and commands, the tiny run."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir

from step_lightning.config.resolvers import register_resolvers

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "step_lightning" / "conf"

# A SegViT run that trains and validates in seconds on CPU (debug=tiny: 2-layer ViT-Ti, 64 px), 16 train / 4 val
# scenes. The method and policy are pinned so that changes of train.yaml's defaults do not change these tests.
TINY_RUN = ["debug=tiny", "method=segvit", "policy=oracle", "data.num_train=16", "data.num_val=4"]
# The default method the same size: STEP, its policy trained first in the run (policy phase, then segmenter).
TINY_STEP_RUN = ["debug=tiny", "method=step", "policy=train", "data.num_train=16", "data.num_val=4"]


def compose_config(overrides: Sequence[str] = (), config_name: str = "train", output_dir: Path | None = None):
    """Compose conf/<config_name>.yaml like the CLI would. ``paths.output_dir`` normally resolves from
    ``${hydra:runtime.output_dir}``, which only exists inside a Hydra app, so it is set explicitly."""
    register_resolvers()
    overrides = list(overrides)
    if output_dir is not None:
        overrides.append(f"paths.output_dir={output_dir}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def run_train(overrides: Sequence[str], output_dir: Path) -> dict:
    """``step_lightning.train.train`` on a composed config; returns its summary."""
    from step_lightning.train import train

    return train(compose_config(overrides, "train", output_dir))


def run_module(module: str, args: Sequence[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m <module> args`` from the repo root, its Hydra run directory ``cwd``."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", module, *args, f"hydra.run.dir={cwd}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
