"""The one adapter from a composed config to a segmenter: ``cfg.model`` (plus the method keys) -> ModelSpec."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from step_lightning.core import PATCH_SIZE, ConfigError
from step_lightning.models.base import SegmenterBase
from step_lightning.models.checkpoint import load_policy
from step_lightning.models.factory import TOKENIZERS, ModelSpec, build_model
from step_lightning.tokens.policy import PolicyNet
from step_lightning.tokens.tau import WINDOW_SIZES


def tokenizer_kind(cfg: DictConfig) -> str:
    """'cts' when asked for; otherwise a tau selects dCTS; otherwise plain patches."""
    kind = cfg.get("tokenizer", "patch")
    if kind not in TOKENIZERS:
        raise ConfigError(f"tokenizer={kind} must be one of {', '.join(TOKENIZERS)}.")
    if kind == "patch" and cfg.get("tau") is not None:
        return "dcts"
    if kind == "dcts" and cfg.get("tau") is None:
        raise ConfigError("tokenizer=dcts needs merging thresholds: set tau, e.g. tau=6899.")
    return kind


def model_spec(cfg: DictConfig, num_classes: int, ignore_index: int) -> ModelSpec:
    kind = tokenizer_kind(cfg)
    policy = "oracle" if kind == "patch" or cfg.get("policy", "oracle") in (None, "oracle") else "net"
    options = OmegaConf.to_container(cfg.model, resolve=True)
    sizes, head = policy_architecture(kind, cfg.crop_size)
    return ModelSpec(**options, num_classes=num_classes, tokenizer=kind, policy=policy, ignore_index=ignore_index,
                     policy_sizes=sizes, policy_head=head)


def policy_architecture(kind: str, crop_size: int) -> tuple[tuple[int, ...], str]:
    """The policy network's window sizes and head: CTS scores 2x2 windows with one 1x1 conv; dCTS every size
    with a window inside the crop (a head for a size that never fits would get no gradient), MLP heads."""
    if kind == "cts":
        return (2,), "linear"
    return tuple(s for s in WINDOW_SIZES if s * PATCH_SIZE <= crop_size), "mlp"


def policy_network(cfg: DictConfig, spec: ModelSpec) -> PolicyNet | None:
    """The trained policy a config names (``policy=<checkpoint>``), None for the oracle or plain patches, and
    None for ``policy=random`` (speed measurements: ``build_model`` then makes an untrained PolicyNet)."""
    if spec.policy != "net":
        return None
    policy = str(cfg.policy)
    if policy == "random":
        return None
    if policy == "train":
        raise ConfigError(
            "policy=train trains a policy at the start of a training run; here give a checkpoint "
            "(policy=<run>/policy/last.ckpt) or policy=oracle."
        )
    if not Path(policy).is_file():
        raise ConfigError(
            f"policy={policy} is neither 'oracle', 'random' nor an existing checkpoint; train one with "
            "`python -m step_lightning.train task=policy` or use policy=oracle."
        )
    return load_policy(policy, mean=spec.mean, std=spec.std)


def build_model_from_config(cfg: DictConfig, num_classes: int, ignore_index: int = 255) -> SegmenterBase:
    spec = model_spec(cfg, num_classes, ignore_index)
    return build_model(spec, policy_network(cfg, spec))
