"""A trained segmenter back from its checkpoint alone: the module rebuilds the model from the spec in its
hyper-parameters, then every tensor is loaded strictly. No run config, pretrained file or policy
checkpoint is read."""

from __future__ import annotations

from pathlib import Path

from step_lightning.core import ConfigError
from step_lightning.lit.module import SegmentationModule
from step_lightning.models.checkpoint import MODEL_PREFIX, load_weights, read_checkpoint
from step_lightning.tokens.policy import PolicyNet

TOKENIZER_FIELDS = ("tokenizer", "tau", "cts_k", "policy", "policy_sizes", "policy_head")
POLICY_TENSORS = "tokenizer.policy."  # inside the segmenter


def load_module(
    path: str | Path, key: str = "ckpt_path", tokenizer: dict | None = None, policy: PolicyNet | None = None,
    **overrides,
) -> SegmentationModule:
    """The ``SegmentationModule`` of a ``step_lightning.train`` checkpoint in eval mode; ``overrides`` replace
    hyper-parameters that do not change the architecture (e.g. ``eval_mode``, ``eval_stride``).

    ``tokenizer``: ModelSpec fields of another tokenizer to run the trained encoder and heads with (e.g. dCTS
    on a SegViT, as CTS plugs its tokenizer into trained models), ``policy`` its trained network (None: the
    oracle, or an untrained one for a spec whose policy is 'net'). Every other tensor still loads strictly.
    """
    checkpoint = read_checkpoint(path, key)
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
    module = SegmentationModule(**{**hparams, **overrides, "model": spec, "init_from": None}, policy=policy)
    if tokenizer:  # the new tokenizer's policy tensors stay as built; the trained ones are left out
        prefix = MODEL_PREFIX + POLICY_TENSORS
        state = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(prefix)}
        state |= {MODEL_PREFIX + k: v for k, v in module.model.state_dict().items() if k.startswith(POLICY_TENSORS)}
        checkpoint = {**checkpoint, "state_dict": state}
    load_weights(module.model, checkpoint, key=f"{key}={path}")
    return module.eval()
