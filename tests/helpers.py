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


def record_validations(monkeypatch) -> list[tuple[int, float]]:
    """(step, mIoU) of every segmenter validation that completes from now on (in this process)."""
    from step_lightning.lit.module import SegmentationModule

    validations = []
    original = SegmentationModule.on_validation_epoch_end

    def recording(self):
        original(self)
        validations.append((self.global_step, float(self.last_val["mIoU"])))

    monkeypatch.setattr(SegmentationModule, "on_validation_epoch_end", recording)
    return validations


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


def write_policy_checkpoint(path: Path, noise: float = 0.0) -> Path:
    """A policy checkpoint laid out like task=policy's (hyper-parameters + ``policy.*`` tensors) of an
    untrained network; ``noise`` perturbs its weights so that its window scores vary from image to image."""
    import torch

    from step_lightning.core import IMAGENET_MEAN, IMAGENET_STD
    from step_lightning.tokens.policy import PolicyNet
    from step_lightning.tokens.tau import WINDOW_SIZES

    torch.manual_seed(0)
    policy = PolicyNet(pretrained=False, sizes=WINDOW_SIZES, input_mean=IMAGENET_MEAN, input_std=IMAGENET_STD)
    with torch.no_grad():
        for parameter in policy.parameters():  # not the BatchNorm statistics: a negative variance would be NaN
            parameter += noise * torch.randn_like(parameter)
    state = {f"policy.{k}": v for k, v in policy.state_dict().items()}
    hparams = {"sizes": list(WINDOW_SIZES), "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"hyper_parameters": hparams, "state_dict": state}, path)
    return path


def write_segmenter_checkpoint(overrides: Sequence[str], path: Path) -> Path:
    """A step_lightning.train checkpoint of an untrained tiny model (debug=tiny, synthetic data), written by
    Lightning from the module train builds (``from_config`` with the datamodule's metadata), without a step."""
    import lightning as L
    from hydra.utils import instantiate

    from step_lightning.lit.module import SegmentationModule

    cfg = compose_config(["debug=tiny", "data.num_train=4", "data.num_val=2", *overrides], output_dir=path.parent)
    datamodule = instantiate(cfg.data)
    L.seed_everything(0, verbose=False)  # the same weights in every session
    module = SegmentationModule.from_config(cfg, datamodule.num_classes, datamodule.ignore_index,
                                            dataset=datamodule.metadata())
    trainer = L.Trainer(max_steps=0, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    trainer.save_checkpoint(path)
    return path
