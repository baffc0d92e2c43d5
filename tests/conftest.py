"""Fixtures: composing configs into a test's tmp_path, and one tiny training run shared by the tests that read it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from omegaconf import DictConfig

from tests.helpers import TINY_RUN, TINY_STEP_RUN, compose_config, run_train


@pytest.fixture
def compose_cfg(tmp_path) -> Callable[..., DictConfig]:
    """``compose_cfg(overrides, config_name="train")`` with outputs under the test's tmp_path."""

    def _compose(overrides: Sequence[str] = (), config_name: str = "train", output_dir: Path | None = None):
        return compose_config(overrides, config_name, output_dir or tmp_path / "run")

    return _compose


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    """One tiny SegViT training run shared by the tests that read its outputs (summary, checkpoints)."""
    output_dir = tmp_path_factory.mktemp("tiny_run")
    summary = run_train(TINY_RUN, output_dir)
    return {"summary": summary, "output_dir": output_dir}


@pytest.fixture(scope="session")
def tiny_step_run(tmp_path_factory) -> dict:
    """One tiny run of the default method (STEP: policy phase, then segmenter) shared by the tests that read it."""
    output_dir = tmp_path_factory.mktemp("tiny_step_run")
    summary = run_train([*TINY_STEP_RUN, "callbacks.visualization=null"], output_dir)
    return {"summary": summary, "output_dir": output_dir}
