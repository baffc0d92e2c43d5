"""A trained segmenter back from its checkpoint alone: the module rebuilds the model from the spec in its
hyper-parameters, then every tensor is loaded strictly. No run config, pretrained file or policy
checkpoint is read."""

from __future__ import annotations

from pathlib import Path

from step_lightning.core import ConfigError
from step_lightning.lit.module import SegmentationModule
from step_lightning.models.checkpoint import load_weights, read_checkpoint


def load_module(path: str | Path, key: str = "ckpt_path", **overrides) -> SegmentationModule:
    """The ``SegmentationModule`` of a ``step_lightning.train`` checkpoint in eval mode; ``overrides`` replace
    hyper-parameters that do not change the architecture (e.g. ``eval_mode``, ``eval_stride``)."""
    checkpoint = read_checkpoint(path, key)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if not isinstance(hparams.get("model"), dict):
        raise ConfigError(
            f"{key}={path} is not a segmenter checkpoint of step_lightning.train (no model spec in its "
            "hyper-parameters); a policy checkpoint goes to policy=..."
        )
    module = SegmentationModule(**{**hparams, **overrides, "init_from": None})
    load_weights(module.model, checkpoint, key=f"{key}={path}")
    return module.eval()
