"""Fixtures: the Hugging Face Hub out of reach, composing configs into a test's tmp_path, one tiny training run
shared by the tests that read it, and untrained tiny checkpoints of each kind of model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import huggingface_hub.constants
import pytest
from omegaconf import DictConfig

from tests.helpers import (
    TINY_RUN,
    TINY_STEP_RUN,
    compose_config,
    run_train,
    write_policy_checkpoint,
    write_segmenter_checkpoint,
)


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    """No test contacts the Hub, nor do the commands it starts: huggingface_hub's offline mode (read from the
    environment at import, from its constants at call time). Tests of the online path fake the Hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


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


# Untrained tiny checkpoints by kind. With tau=5555 the strongly perturbed policy merges a varying number of
# windows per image, so dCTS's token count is data-dependent here as it is in a trained model. CTS gets a mildly
# perturbed one: its top-K ranking of saturated, near-equal scores would not be reproducible across runtimes.
CHECKPOINT_KINDS = {
    "segvit": ["method=segvit"],
    "segvit_slide": ["method=segvit", "eval.mode=slide"],
    "cts": ["method=cts", "policy={mild_policy}"],
    "dcts": ["method=dcts", "tau=5555", "policy={policy}"],
    "step": ["method=step", "tau=5555", "policy={policy}"],
    "dcts_oracle": ["method=dcts", "policy=oracle"],
}
POLICY_NOISE = {"policy": 1.0, "mild_policy": 0.1}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Callable[[str], Path]:
    """``tiny_checkpoint(kind)``: the path of an untrained tiny checkpoint of a kind of CHECKPOINT_KINDS,
    written once per session."""
    folder = tmp_path_factory.mktemp("checkpoints")
    written: dict[str, Path] = {}

    def _checkpoint(kind: str) -> Path:
        if kind not in written:
            policies = {name: folder / f"{name}.ckpt" for name in POLICY_NOISE}
            for name, path in policies.items():
                if not path.is_file():
                    write_policy_checkpoint(path, noise=POLICY_NOISE[name])
            overrides = [o.format(**policies) for o in CHECKPOINT_KINDS[kind]]
            written[kind] = write_segmenter_checkpoint(overrides, folder / kind / "last.ckpt")
        return written[kind]

    return _checkpoint
