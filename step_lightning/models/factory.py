"""Builds a segmenter from explicit arguments (``ModelSpec``); the config adapter lives in step_lightning.config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from step_lightning.core import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, ConfigError
from step_lightning.models.backbones import backbone_spec
from step_lightning.models.base import SegmenterBase
from step_lightning.models.early_exit import EarlyExitSegmenter
from step_lightning.models.halting import build_rule
from step_lightning.models.segmenter import Segmenter
from step_lightning.models.tokenizer import CTSTokenizer, DCTSTokenizer, PatchTokenizer
from step_lightning.models.vit import ViTEncoder
from step_lightning.tokens.policy import PolicyNet
from step_lightning.tokens.tau import WINDOW_SIZES, parse_tau

TOKENIZERS = ("patch", "cts", "dcts")
POLICIES = ("oracle", "net")


@dataclass
class ModelSpec:
    """Everything that defines a segmenter's architecture: saved in checkpoints, so a model can be rebuilt
    from its checkpoint alone (``ModelSpec(**saved)``).

    tokenizer: patch (SegViT), cts (top-K 2x2 windows) or dcts (thresholds ``tau``, four digits).
    policy: what scores windows for cts/dcts: ``oracle`` (ground-truth labels) or ``net`` (a PolicyNet,
    passed to ``build_model`` or, when absent, built untrained for weights loaded afterwards).
    prune_heads: 1-indexed layers followed by an exit head; () = no early exit (SegViT's cascaded head).
    halting: the exits' rule (``step_lightning.models.halting.RULES``): ``confidence`` (DToP: prune_threshold,
    keep_top_k), ``budget`` (``halt_budget``: that fraction of each image's tokens halts at every exit; set by
    halt_budget alone) or ``none``. budget: dCTS at most that fraction of the patches (or that many tokens) per image.
    exit_num_heads: attention heads of an early-exit model's ATM heads (DToP: 6 for ViT-B, 8 or 16 for ViT-L);
    None = one per 32 channels, as SegViT.
    head_layers / exit_head_layers: ATM decoder layers per head / per exit head (checkpoints saved before
    exit_head_layers existed rebuild with the default, 3).
    mean/std: the images' normalisation (0..255 scale), which the policy network undoes.
    """

    backbone: str
    num_classes: int
    img_size: int = 512
    depth: int | None = None
    drop_path_rate: float = 0.1
    pretrained: str | None = None
    pretrained_file: str | None = None
    taps: tuple[int, ...] | None = None
    tokenizer: str = "patch"
    tau: int | str | None = None
    cts_k: int | None = None
    policy: str = "oracle"
    prune_heads: tuple[int, ...] = ()
    halting: str = "confidence"
    prune_threshold: float = 0.9
    budget: float | None = None
    halt_budget: float | None = None
    keep_top_k: int = 5
    head_layers: int = 3
    exit_num_heads: int | None = None
    exit_head_layers: int = 3
    ignore_index: int = IGNORE_INDEX
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    policy_sizes: tuple[int, ...] = field(default=WINDOW_SIZES)
    policy_head: str = "mlp"

    def __post_init__(self):
        for name in ("taps", "prune_heads", "mean", "std", "policy_sizes"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, tuple(value))
        if self.halt_budget is not None and self.halting == "confidence":
            self.halting = "budget"
        if self.budget is not None and self.tokenizer != "dcts":
            raise ConfigError(f"budget={self.budget} sets dCTS's token count; tokenizer={self.tokenizer} has none "
                              "(use a dcts/step method, or halt_budget= for the exits).")
        if self.tokenizer not in TOKENIZERS:
            raise ConfigError(f"tokenizer={self.tokenizer} must be one of {', '.join(TOKENIZERS)}.")
        if self.tokenizer == "dcts" and self.tau is None:
            raise ConfigError("tokenizer=dcts needs merging thresholds: set tau, e.g. tau=6899.")
        if self.policy not in POLICIES:
            raise ConfigError(f"policy={self.policy} must be one of {', '.join(POLICIES)} in a model spec.")
        check_prune_heads(self.prune_heads, self.depth or backbone_spec(self.backbone).depth)
        for name in ("head_layers", "exit_head_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value} must be a number of ATM decoder layers >= 1, e.g. {name}=3.")

    def to_dict(self) -> dict:
        return asdict(self)


def check_prune_heads(prune_heads, depth: int) -> tuple[int, ...]:
    heads = tuple(prune_heads or ())
    if any(not isinstance(h, int) or isinstance(h, bool) for h in heads):
        raise ConfigError(f"prune_heads={list(heads)} must be a list of layer numbers, e.g. prune_heads=[8,16].")
    if list(heads) != sorted(set(heads)):
        raise ConfigError(f"prune_heads={list(heads)} must be strictly increasing, e.g. prune_heads=[8,16].")
    if heads and not (1 <= heads[0] and heads[-1] < depth):
        raise ConfigError(
            f"prune_heads={list(heads)} must lie within 1..{depth - 1} (an exit after layer {depth}, the last one, "
            "is the final head)."
        )
    return heads


def build_encoder(spec: ModelSpec) -> ViTEncoder:
    return ViTEncoder(
        spec.backbone,
        img_size=spec.img_size,
        drop_path_rate=spec.drop_path_rate,
        pretrained=spec.pretrained,
        depth=spec.depth,
        pretrained_file=spec.pretrained_file,
    )


def build_tokenizer(spec: ModelSpec, policy: PolicyNet | None = None):
    if spec.tokenizer == "patch":
        return PatchTokenizer()
    if spec.policy == "net" and policy is None:
        policy = PolicyNet(pretrained=False, sizes=spec.policy_sizes, input_mean=spec.mean, input_std=spec.std,
                           head=spec.policy_head)
    policy = policy if spec.policy == "net" else None
    if spec.tokenizer == "cts":
        return CTSTokenizer(policy, spec.cts_k, spec.ignore_index)
    return DCTSTokenizer(policy, parse_tau(spec.tau), spec.ignore_index, spec.budget)


def build_model(spec: ModelSpec, policy: PolicyNet | None = None) -> SegmenterBase:
    """The segmenter ``spec`` describes; ``policy`` drives a cts/dcts tokenizer when ``spec.policy='net'``."""
    encoder = build_encoder(spec)
    tokenizer = build_tokenizer(spec, policy)
    if spec.prune_heads:
        return EarlyExitSegmenter(
            encoder, spec.num_classes, spec.prune_heads, tokenizer, build_rule(spec), head_layers=spec.head_layers,
            exit_head_layers=spec.exit_head_layers, head_num_heads=spec.exit_num_heads,
        )
    taps = spec.taps or backbone_spec(spec.backbone).taps
    taps = tuple(t for t in taps if t <= encoder.depth)
    return Segmenter(encoder, spec.num_classes, taps, tokenizer, spec.head_layers)
