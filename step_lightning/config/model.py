"""The one adapter from a composed config to a segmenter: ``cfg.model`` (plus the method keys) -> ModelSpec."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from step_lightning.core import ConfigError
from step_lightning.models.base import SegmenterBase
from step_lightning.models.checkpoint import load_policy, read_checkpoint
from step_lightning.models.factory import TOKENIZERS, ModelSpec, build_model
from step_lightning.tokens.policy import PolicyNet, window_sizes_for


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
    if policy == "net":
        options["policy_sizes"], options["policy_head"] = policy_architecture(cfg)
    return ModelSpec(**options, num_classes=num_classes, tokenizer=kind, policy=policy, ignore_index=ignore_index)


def policy_architecture(cfg: DictConfig) -> tuple[tuple[int, ...], str]:
    """The policy network's window sizes and head. Trained in this run (or random): CTS scores 2x2 windows
    with one 1x1 conv, dCTS every size with a window inside the crop with MLP heads; else the checkpoint's."""
    if str(cfg.policy) in ("train", "random"):
        return ((2,), "linear") if tokenizer_kind(cfg) == "cts" else (window_sizes_for(cfg.crop_size), "mlp")
    hparams = read_checkpoint(policy_file(cfg), "policy", mmap=True).get("hyper_parameters") or {}
    if "sizes" not in hparams:
        raise ConfigError(f"policy={cfg.policy} is not a policy checkpoint (task=policy or policy=train writes one).")
    return tuple(hparams["sizes"]), hparams.get("head", "mlp")


def policy_file(cfg: DictConfig) -> Path:
    """The trained policy checkpoint ``policy=`` names (never replaced by the oracle: that would change the method)."""
    policy = str(cfg.policy)
    if policy == "train":
        raise ConfigError(
            "policy=train trains a policy at the start of a training run; this command needs a trained one: "
            "policy=<run>/policy/<checkpoint>.ckpt."
        )
    if not Path(policy).is_file():
        raise ConfigError(
            f"policy={policy} is not an existing file; give a trained policy checkpoint (<run>/policy/*.ckpt), "
            "or policy=train in a training run."
        )
    return Path(policy)


def policy_network(cfg: DictConfig, spec: ModelSpec) -> PolicyNet | None:
    """The trained policy a config names (``policy=<checkpoint>``), None for the oracle or plain patches, and
    None for ``policy=random`` (speed measurements: ``build_model`` then makes an untrained PolicyNet)."""
    if spec.policy != "net":
        return None
    if str(cfg.policy) == "random":
        return None
    return load_policy(policy_file(cfg), mean=spec.mean, std=spec.std)


def build_model_from_config(cfg: DictConfig, num_classes: int, ignore_index: int = 255) -> SegmenterBase:
    spec = model_spec(cfg, num_classes, ignore_index)
    return build_model(spec, policy_network(cfg, spec))
