"""A trained segmenter back from its checkpoint (or model folder) alone: the module rebuilds the model from the
spec in its hyper-parameters, then every tensor is loaded strictly. No run config, pretrained file or policy
checkpoint is read."""

from __future__ import annotations

from pathlib import Path

from step_lightning.core import ConfigError
from step_lightning.lit.module import SegmentationModule
from step_lightning.models.checkpoint import MODEL_PREFIX, load_weights, read_checkpoint
from step_lightning.models.model_folder import INFERENCE_FIELDS
from step_lightning.tokens.policy import PolicyNet

TOKENIZER_FIELDS = ("tokenizer", "tau", "cts_k", "policy", "policy_sizes", "policy_head")
POLICY_TENSORS = "tokenizer.policy."  # inside the segmenter


def load_module(
    path: str | Path, key: str = "ckpt_path", tokenizer: dict | None = None, policy: PolicyNet | None = None,
    inference: dict | None = None, trusted: bool = False, **overrides,
) -> SegmentationModule:
    """The ``SegmentationModule`` of a ``step_lightning.train`` checkpoint or a model folder in eval mode;
    ``overrides`` replace hyper-parameters that do not change the architecture (e.g. ``eval_mode``,
    ``eval_stride``); ``trusted``: the file may hold any pickled object (``read_checkpoint``).

    ``tokenizer``: ModelSpec fields of another tokenizer to run the trained encoder and heads with (e.g. dCTS
    on a SegViT, as CTS plugs its tokenizer into trained models), ``policy`` its trained network (None: the
    oracle, or an untrained one for a spec whose policy is 'net'). Every other tensor still loads strictly.
    ``inference``: other values of the trained model's ``INFERENCE_FIELDS`` (e.g. ``{"tau": 4999}``); every
    tensor, the trained policy's included, loads as trained.
    """
    checkpoint = read_checkpoint(path, key, trusted=trusted)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if not isinstance(hparams.get("model"), dict):
        raise ConfigError(
            f"{key}={path} is not a segmenter checkpoint of step_lightning.train (no model spec in its "
            "hyper-parameters); a policy checkpoint goes to policy=..."
        )
    spec = hparams["model"]
    if tokenizer:
        changed = set(tokenizer) - set(TOKENIZER_FIELDS)
        if changed:
            raise ConfigError(f"{sorted(changed)} would change the trained architecture; only the tokenizer can.")
        spec = {**spec, **tokenizer}
    if inference:
        spec = {**spec, **inference_fields(spec, inference)}
    module = SegmentationModule(**{**hparams, **overrides, "model": spec, "init_from": None}, policy=policy)
    if tokenizer:  # the new tokenizer's policy tensors stay as built; the trained ones are left out
        prefix = MODEL_PREFIX + POLICY_TENSORS
        state = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(prefix)}
        state |= {MODEL_PREFIX + k: v for k, v in module.model.state_dict().items() if k.startswith(POLICY_TENSORS)}
        checkpoint = {**checkpoint, "state_dict": state}
    load_weights(module.model, checkpoint, key=f"{key}={path}")
    return module.eval()


def inference_fields(spec: dict, inference: dict) -> dict:
    """``inference`` checked against the trained spec: only ``INFERENCE_FIELDS``, each one the model uses."""
    unknown = sorted(set(inference) - set(INFERENCE_FIELDS))
    if unknown:
        raise ConfigError(
            f"{', '.join(unknown)} cannot change in a trained model; what can: {', '.join(INFERENCE_FIELDS)}."
        )
    if inference.get("tau") is not None and spec["tokenizer"] != "dcts":
        raise ConfigError(
            f"tau={inference['tau']} sets dCTS's merging thresholds; this model's tokenizer is {spec['tokenizer']}."
        )
    return {k: v for k, v in inference.items() if v is not None}
