"""The checks that run on a composed config before any data or model is loaded (``check_config``), and before
a training's first step: every file and weight tag it will read can be read (``check_sources``), and
``init_from`` fits the model (``check_init_from``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from step_lightning.config.extras import check_logger_extras
from step_lightning.config.model import model_spec, policy_architecture, tokenizer_kind
from step_lightning.config.resolvers import default_eval_stride
from step_lightning.core import PATCH_SIZE, ConfigError
from step_lightning.data.folders import check_root
from step_lightning.data.module import FolderSegDataModule
from step_lightning.models.backbones import backbone_spec
from step_lightning.models.checkpoint import matching_tensors, read_checkpoint
from step_lightning.models.factory import build_model, check_prune_heads
from step_lightning.models.pretrained import check_vit_weights
from step_lightning.tokens.policy import check_policy_weights, window_sizes_for
from step_lightning.tokens.tau import parse_tau

POLICY_WORDS = ("train", "oracle", "random")  # policy= values that name no checkpoint


@dataclass(frozen=True)
class Bound:
    """The numbers a setting admits: within [low, high] (``open``: the bound itself excluded)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    nullable: bool = False

    def admits(self, value) -> bool:
        if value is None:
            return self.nullable
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or (self.integer and not isinstance(value, int)):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"{kind} in {left}{self.low}, {self.high}{right}"
        elif self.low is not None:
            text = f"{kind} {'>' if self.low_open else '>='} {self.low}"
        else:
            text = kind
        return text + (" or null" if self.nullable else "")


COUNT = Bound(1, integer=True)  # steps, layers, sizes: 1 or more
STEPS = Bound(0, integer=True)  # warm-up steps and the like: 0 or more
POSITIVE = Bound(0, low_open=True)
WEIGHT = Bound(0)  # loss weights, weight decay: 0 or more
FRACTION = Bound(0, 1, high_open=True)

# Every numeric setting of the commands' configs and what it admits; absent keys (another command's) are skipped.
RANGES: dict[str, Bound] = {
    "seed": Bound(0, 2**32 - 1, integer=True),
    "prune_threshold": Bound(0, 1, low_open=True),
    "budget": Bound(0, low_open=True, nullable=True),  # a fraction of the patches (<= 1) or a token count
    "halt_budget": dataclasses.replace(FRACTION, nullable=True),
    "cts_k": dataclasses.replace(COUNT, nullable=True),
    "halting_finetune_steps": STEPS,
    "init_from_min_fraction": Bound(0, 1),
    "backbone.depth": dataclasses.replace(COUNT, nullable=True),
    "backbone.drop_path_rate": FRACTION,
    **{f"backbone.mean.{c}": Bound(0, 255) for c in range(3)},  # the images' normalisation, 0..255 scale
    **{f"backbone.std.{c}": POSITIVE for c in range(3)},
    "model.keep_top_k": COUNT,
    "model.head_layers": COUNT,
    "model.exit_head_layers": COUNT,
    "model.exit_num_heads": dataclasses.replace(COUNT, nullable=True),
    "policy_train.max_steps": COUNT,
    "policy_train.val_check_interval": COUNT,
    "policy_train.lr": POSITIVE,
    "policy_train.weight_decay": WEIGHT,
    "policy_train.warmup_steps": STEPS,
    "policy_train.batch_size": dataclasses.replace(COUNT, nullable=True),
    "policy_train.size": Bound(2 * PATCH_SIZE, integer=True, nullable=True),
    "optim.lr": POSITIVE,
    "optim.weight_decay": WEIGHT,
    "optim.head_lr_mult": POSITIVE,
    "optim.betas.0": FRACTION,
    "optim.betas.1": FRACTION,
    "optim.warmup_steps": STEPS,
    "optim.poly_power": POSITIVE,
    "loss.no_object_weight": WEIGHT,
    "loss.focal_weight": WEIGHT,
    "loss.dice_weight": WEIGHT,
    "data.batch_size": COUNT,
    "data.val_batch_size": COUNT,
    "data.num_workers": STEPS,
    "data.num_train": COUNT,
    "data.num_val": COUNT,
    "data.max_objects": COUNT,
    **{f"data.scale_range.{i}": POSITIVE for i in range(2)},  # random resize factors
    **{f"data.base_scale.{i}": COUNT for i in range(2)},  # px
    **{f"data.eval_scale.{i}": dataclasses.replace(COUNT, nullable=True) for i in range(2)},
    "data.cat_max_ratio": Bound(0, 1, low_open=True),
    "data.ignore_index": Bound(0, integer=True),  # a label value of the files
    "trainer.max_steps": COUNT,
    "trainer.val_check_interval": COUNT,  # steps: the schedules and last.ckpt count steps, not epochs
    "trainer.num_nodes": COUNT,
    "trainer.accumulate_grad_batches": COUNT,
    "trainer.gradient_clip_val": dataclasses.replace(WEIGHT, nullable=True),
    "trainer.log_every_n_steps": COUNT,
    "trainer.num_sanity_val_steps": Bound(-1, integer=True),  # -1: all
    "callbacks.last_checkpoint.every_n_train_steps": dataclasses.replace(COUNT, nullable=True),
    "callbacks.model_checkpoint.save_top_k": Bound(-1, integer=True),  # -1: all
    "callbacks.visualization.num_images": COUNT,
    "callbacks.progress_bar.refresh_rate": STEPS,  # 0: no bar
    "callbacks.visualization.every_n_validations": COUNT,
    # measurement commands
    "num_classes": COUNT,
    "num_images": dataclasses.replace(COUNT, nullable=True),
    "batch_size": COUNT,
    "warmup": STEPS,
    "repeats": COUNT,
    "profile_batches": COUNT,
    "threads": dataclasses.replace(COUNT, nullable=True),
    "force_halt": Bound(0, 1, nullable=True),
}
# Settings that take one of a few words.
CHOICES: dict[str, tuple] = {
    "task": ("segment", "policy"),
    "eval.mode": ("whole", "slide"),
    "optim.schedule": ("poly", "cosine"),
    "optim.param_groups": ("timm", "segvit"),
    "policy_train.schedule": ("cosine", "constant"),
    "policy_train.data": ("augmented", "whole", "crops"),
    "trainer.gradient_clip_algorithm": ("norm", "value"),
    "engine": ("packed", "padded"),
    "precision": ("fp32", "bf16", "fp16"),  # the measurement commands' dtype
    # Lightning's precision values
    "trainer.precision": ("64-true", "32-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed", "transformer-engine",
                          "transformer-engine-float16", "64", "32", "16", "bf16", 64, 32, 16),
}


def world_size(trainer: DictConfig) -> int | None:
    """Processes the trainer config will run (devices x nodes); None where only Lightning can tell."""
    devices = trainer.get("devices", 1)
    if isinstance(devices, ListConfig | list):
        count = len(devices)
    elif isinstance(devices, str) and devices.strip().isdigit():
        count = int(devices)
    elif isinstance(devices, int) and devices > 0:
        count = devices
    elif devices in (-1, "-1", "auto") and trainer.get("accelerator") in ("gpu", "cuda"):
        count = torch.cuda.device_count()
        if count == 0:
            return None
    else:
        return None
    return count * int(trainer.get("num_nodes", 1) or 1)


def check_config(cfg: DictConfig) -> None:
    """Fail fast, with the fix in the message, on mistakes that would otherwise surface deep in a run."""
    check_values(cfg)
    spec = backbone_spec(cfg.backbone.name)
    depth = cfg.backbone.get("depth") or spec.depth
    crop = cfg.crop_size
    if not isinstance(crop, int) or crop <= 0 or crop % PATCH_SIZE:
        raise ConfigError(f"crop_size={crop} must be a positive multiple of {PATCH_SIZE} (e.g. 512).")
    check_prune_heads(cfg.get("prune_heads"), depth)
    taps = list(cfg.backbone.taps)
    if taps != sorted(set(taps)) or taps[0] < 1 or taps[-1] > depth:
        raise ConfigError(f"backbone.taps={taps} must be increasing layer numbers within 1..{depth}.")
    if cfg.get("tau") is not None:
        parse_tau(cfg.tau)
    check_policy(cfg)
    check_policy_data(cfg)
    world = world_size(cfg.trainer)
    if world and "batch_size" in cfg.data and cfg.data.batch_size % world:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} (global) is not divisible by the {world} devices; "
            f"use a multiple of {world}."
        )
    check_eval_protocol(cfg)
    check_logger_extras(cfg)


def check_values(cfg: DictConfig) -> None:
    """Every setting of RANGES and CHOICES the config holds is within what it admits. A setting that follows
    another (``policy_train.size: ${crop_size}``) is left to that one's check, which names what to change."""
    for key, bound in RANGES.items():
        value = OmegaConf.select(cfg, key, default="<absent>")
        if value != "<absent>" and not bound.admits(value) and not follows_another(cfg, key):
            raise ConfigError(f"{key}={value} must be {bound.describe()}.")
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key, default="<absent>")
        if value != "<absent>" and value not in choices:
            words = [f"'{c}'" for c in dict.fromkeys(str(c) for c in choices)]
            listed = " or ".join(words) if len(words) == 2 else f"one of {', '.join(words)}"
            raise ConfigError(f"{key}={value} must be {listed}.")


def follows_another(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and OmegaConf.is_interpolation(node, leaf)


def check_eval_protocol(cfg: DictConfig) -> None:
    """Sliding windows (``eval.mode``, checked with the CHOICES) as ``check_slide`` admits."""
    if cfg.eval.mode == "slide":
        check_slide(cfg.eval.crop, cfg.eval.stride)


def check_slide(crop, stride, option: str = "eval.") -> None:
    """Sliding windows of a multiple of the patch size whose stride leaves no pixel between two windows;
    ``option``: the settings' prefix in messages."""
    if isinstance(crop, bool) or not isinstance(crop, int) or crop <= 0 or crop % PATCH_SIZE:
        raise ConfigError(f"{option}crop={crop} must be a positive multiple of {PATCH_SIZE} (e.g. the crop_size).")
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= crop:
        raise ConfigError(
            f"{option}stride={stride} must be within 1..{option}crop ({crop}): a larger stride leaves pixels between "
            f"the sliding windows unscored; e.g. {option}stride={default_eval_stride(crop)} (2/3 of the crop)."
        )


def check_training_weights(cfg: DictConfig) -> None:
    """The weights a training starts from are asked for on purpose: a real dataset's recipe fine-tunes
    pretrained ones, and an untrained policy network (policy=random) is for speed measurements only."""
    if cfg.get("task", "segment") == "segment" and cfg.data.get("name") != "synthetic" and not cfg.backbone.pretrained:
        raise ConfigError(
            f"data={cfg.data.name} would train a {cfg.backbone.name} from random weights; name pretrained weights "
            "(backbone.pretrained=<timm tag or file>, e.g. vit_base_patch16_384.augreg_in21k_ft_in1k) or ask for "
            "random ones on purpose with backbone.pretrained=none."
        )
    if str(cfg.get("policy")) == "random" and tokenizer_kind(cfg) != "patch":
        raise ConfigError(
            "policy=random (an untrained policy network) is for speed measurements (benchmark, flops, "
            "profile_layers); train with policy=train, policy=oracle or policy=<trained policy checkpoint>."
        )


def check_policy(cfg: DictConfig) -> None:
    """A supertoken method's policy: trainable on this crop (policy=train), random (an untrained network, for
    speed measurements) or a readable policy checkpoint."""
    if tokenizer_kind(cfg) == "patch" or cfg.get("policy") in (None, "oracle"):
        return
    policy = str(cfg.policy)
    if policy not in POLICY_WORDS:
        policy_architecture(cfg)  # reads the checkpoint's hyper-parameters: an existing, readable policy checkpoint
    elif policy == "train" and not window_sizes_for(cfg.crop_size):
        raise ConfigError(
            f"crop_size={cfg.crop_size} holds no 2x2 window of {PATCH_SIZE} px patches for policy=train to learn; "
            f"use crop_size >= {2 * PATCH_SIZE}."
        )


POLICY_DATA = CHOICES["policy_train.data"]


def check_policy_data(cfg: DictConfig) -> None:
    """The policy's training data (``policy_train``): a known mode, and whole images or crops that hold a window
    of every size the policy has a head for (a head without targets would never learn)."""
    policy_train = cfg.get("policy_train")
    if policy_train is None:
        return
    data, size = policy_train.get("data", "augmented"), policy_train.get("size")
    if data not in POLICY_DATA:
        raise ConfigError(f"policy_train.data={data} must be one of {', '.join(POLICY_DATA)}.")
    if data == "augmented":
        return
    if not isinstance(size, int) or size <= 0 or size % PATCH_SIZE:
        raise ConfigError(f"policy_train.size={size} must be a positive multiple of {PATCH_SIZE} (e.g. the crop_size).")
    largest = max(window_sizes_for(cfg.crop_size), default=0)
    if size < largest * PATCH_SIZE:
        raise ConfigError(
            f"policy_train.size={size} holds no {largest}x{largest} window ({largest * PATCH_SIZE} px), which the "
            f"policy scores at crop_size={cfg.crop_size}; use policy_train.size >= {largest * PATCH_SIZE}."
        )


def check_sources(cfg: DictConfig, trains_policy: bool) -> None:
    """Before a training's first step: the pretrained backbone (a file read, a tag's weights cached or
    downloadable now), the policy network's ImageNet weights when it trains one and ``init_from`` can all be
    read, so that none fails after hours of an earlier phase (``check_config`` reads the policy checkpoint)."""
    spec = backbone_spec(cfg.backbone.name)
    grid = (cfg.crop_size // PATCH_SIZE,) * 2
    depth = cfg.backbone.get("depth") or spec.depth
    check_vit_weights(cfg.model.pretrained, cfg.backbone.name, spec, grid, depth, cfg.model.get("pretrained_file"))
    if trains_policy:
        check_policy_weights(cfg.policy_train.pretrained)
    if cfg.get("init_from"):
        read_checkpoint(cfg.init_from, "init_from", mmap=True)


def check_datamodule(cfg: DictConfig, datamodule) -> None:
    """Before a training's first step, once its datamodule is built: a dataset folder holds its dataset's
    layout (its splits are listed when a phase starts), and ``init_from`` fits the model."""
    if isinstance(datamodule, FolderSegDataModule):
        check_root(datamodule.root, datamodule.layout)
    check_init_from(cfg, datamodule.num_classes, datamodule.ignore_index)


def check_init_from(cfg: DictConfig, num_classes: int, ignore_index: int) -> None:
    """``init_from`` fills at least ``init_from_min_fraction`` of the model's tensors, checked on the model
    built on the meta device (names and shapes, no memory, no weights read)."""
    if not cfg.get("init_from") or cfg.get("task") == "policy":
        return
    spec = dataclasses.replace(model_spec(cfg, num_classes, ignore_index), pretrained=None, pretrained_file=None)
    with torch.device("meta"):
        model = build_model(spec)
    checkpoint = read_checkpoint(cfg.init_from, "init_from", mmap=True)
    matching_tensors(model, checkpoint, cfg.get("init_from_min_fraction", 0.5), f"init_from={cfg.init_from}")
