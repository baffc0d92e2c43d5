"""Pretrained weights by name: a timm tag (timm's own Hugging Face cache) or a local timm, big_vision or mmseg file.

``vit_state_dict``   the encoder tensors of a ViTEncoder in timm names, position embedding resampled once.
``check_vit_weights``  the same source checked before a run (a file read, a tag's weights located).
``timm_pretrained``  ``timm.create_model(tag, pretrained=True)`` with one-line errors (also used by the policy).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
from timm.layers import resample_abs_pos_embed
from timm.models import VisionTransformer, load_state_dict
from torch import Tensor

from step_lightning.core import PATCH_SIZE, ConfigError
from step_lightning.core.hub import check_timm_weights, timm_pretrained
from step_lightning.models.backbones import BackboneSpec

FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".npz")
# timm has no mmseg reader: these undo mmseg's tools/model_converters/vit2mmseg.py renaming, in order.
MMSEG_TO_TIMM = (
    (r"^patch_embed\.projection\.", "patch_embed.proj."),
    (r"^layers\.", "blocks."),
    (r"\.ln(\d)\.", r".norm\1."),
    (r"\.attn\.attn\.in_proj_", ".attn.qkv."),
    (r"\.attn\.attn\.out_proj\.", ".attn.proj."),
    (r"\.ffn\.layers\.0\.0\.", ".mlp.fc1."),
    (r"\.ffn\.layers\.1\.", ".mlp.fc2."),
)


def vit_state_dict(
    source: str | None,
    backbone: str,
    spec: BackboneSpec,
    grid: tuple[int, int],
    depth: int,
    pretrained_file: str | None = None,
) -> dict[str, Tensor] | None:
    """Weights for ``ViTEncoder`` (timm names: ``patch_embed.proj.*``, ``pos_embed``, ``blocks.<i < depth>.*``)
    from ``source``: None / "none" (no weights), a timm tag (optionally read from ``pretrained_file``), or a local
    checkpoint: timm .pth/.bin/.safetensors, big_vision .npz, or mmseg (SegViT/DToP) .pth, detected by its keys.

    The position embedding loses its class-token slot and is resampled once, bicubic, to ``grid``.
    """
    kind, source = _source_kind(source, spec, pretrained_file)
    if kind is None:
        return None
    path = Path(source).expanduser()
    if kind == "file":
        state = _read_npz(path) if path.suffix == ".npz" else _read_checkpoint(path)
    else:
        opts = ("backbone.pretrained", pretrained_file, "backbone.pretrained_file")
        state = timm_pretrained(source, _timm_arch(spec), *opts, num_classes=0).state_dict()
    state = _timm_names(state, source)

    weight = state["patch_embed.proj.weight"]
    found = (weight.shape[0], 1 + max((int(k.split(".")[1]) for k in state if k.startswith("blocks.")), default=-1))
    # A checkpoint may hold more blocks than a truncated model uses, never fewer.
    if found[0] != spec.embed_dim or not depth <= found[1] <= spec.depth or weight.shape[-1] != PATCH_SIZE:
        raise ConfigError(
            f"backbone.pretrained={source} is a ViT/{weight.shape[-1]} of width {found[0]} and depth {found[1]}, "
            f"backbone={backbone} is a ViT/{PATCH_SIZE} of width {spec.embed_dim} and depth {spec.depth}; "
            "choose the backbone the checkpoint was trained as, or a checkpoint of this backbone."
        )
    # timm's checkpoint_filter_fn resamples for a model with its own prefix tokens; ours has none while
    # checkpoints keep the class (or register) slots, so they are cut here and resample_abs_pos_embed runs once.
    # No antialias: as the encoder's runtime resize and mmseg's resize_pos_embed.
    pos = state["pos_embed"]
    slots = pos.shape[1] - math.isqrt(pos.shape[1]) ** 2
    state["pos_embed"] = resample_abs_pos_embed(
        pos[:, slots:], new_size=list(grid), num_prefix_tokens=0, interpolation="bicubic", antialias=False
    )
    own = ("pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias")
    return {k: v for k, v in state.items() if k in own or k.startswith("blocks.") and int(k.split(".")[1]) < depth}


def check_vit_weights(
    source: str | None, backbone: str, spec: BackboneSpec, grid: tuple[int, int], depth: int,
    pretrained_file: str | None = None,
) -> None:
    """Before a run: what ``vit_state_dict`` will read can be read. A local file is read whole now (its shapes
    are checked); a tag's weights are only located (a file by hand, cached, or downloadable now)."""
    kind, source = _source_kind(source, spec, pretrained_file)
    if kind == "tag":
        check_timm_weights(source, _timm_arch(spec), "backbone.pretrained", pretrained_file, "backbone.pretrained_file")
    elif kind == "file":
        vit_state_dict(source, backbone, spec, grid, depth)


def _timm_arch(spec: BackboneSpec) -> str:
    return spec.timm_name.rsplit("_", 1)[0]  # vit_base_patch16_224 -> any vit_base_patch16_<res> tag


def _source_kind(source: str | None, spec: BackboneSpec, pretrained_file: str | None) -> tuple[str | None, str]:
    """(None | "file" | "tag", the source as a string) of a ``backbone.pretrained`` value."""
    source = None if source is None or str(source).lower() == "none" else str(source)
    path = Path(str(source)).expanduser()
    if pretrained_file and (source is None or path.is_file()):
        raise ConfigError(
            f"backbone.pretrained_file={pretrained_file} is a local copy of a timm tag's weights; "
            "set backbone.pretrained=<that tag> (or give the file as backbone.pretrained)."
        )
    if source is None:
        return None, ""
    if path.is_file():
        return "file", source
    if len(path.parts) > 1 or path.suffix in FILE_SUFFIXES:
        raise ConfigError(
            f"backbone.pretrained={source} does not exist; give a ViT checkpoint file (timm, big_vision .npz or "
            f"mmseg), a timm tag (e.g. {_timm_arch(spec)}_384.augreg_in21k_ft_in1k) or null."
        )
    return "tag", source


def _read_checkpoint(path: Path) -> dict[str, Tensor]:
    try:  # timm's reader: torch or safetensors, unwraps state_dict / model (EMA first), strips DDP prefixes
        return load_state_dict(str(path), weights_only=True)
    except RuntimeError as err:  # pickled objects beyond tensors (timm re-raises torch's refusal), or a broken file
        raise ConfigError(
            f"backbone.pretrained={path} cannot be read by torch.load(weights_only=True) (objects besides tensors, "
            "or a damaged file); re-save only its state_dict with torch.save."
        ) from err


def _read_npz(path: Path) -> dict[str, Tensor]:
    """timm's big_vision / AugReg reader (``_load_weights``) copies into a model: built here with the archive's
    patch, width, depth and grid, so that it neither resamples the position embedding (ours does, once) nor
    fails on another architecture before the width/depth check. Heads do not shape any tensor: one will do."""
    with np.load(path) as npz:
        names = npz.files
        kernels = [k for k in names if k.endswith("embedding/kernel")]
        if not kernels:
            raise ConfigError(f"{path} is not a big_vision ViT .npz (no embedding/kernel); give a ViT checkpoint.")
        patch, _, _, width = npz[kernels[0]].shape
        tokens = npz[next(k for k in names if k.endswith("pos_embedding"))].shape[-2]
        stacked = [k for k in names if k.endswith("encoderblock/LayerNorm_0/scale")]
        blocks = {m[1] for k in names if (m := re.search(r"encoderblock_(\d+)/", k))}
        depth = npz[stacked[0]].shape[0] if stacked else len(blocks)
    side = math.isqrt(tokens)
    vit = VisionTransformer(
        img_size=side * patch, patch_size=patch, embed_dim=width, depth=depth, num_heads=1,
        class_token=tokens > side * side, global_pool="avg", num_classes=0,
    )  # fmt: skip
    vit.load_pretrained(str(path))
    return vit.state_dict()


def _timm_names(state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """Drop any wrapper prefix (``backbone.``, ``encoder.`` ...) and rename mmseg keys to timm's."""
    anchor = next((k for k in state if k.endswith(("patch_embed.proj.weight", "patch_embed.projection.weight"))), "")
    prefix = anchor[: anchor.find("patch_embed.")]
    state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not anchor or "pos_embed" not in state:
        raise ConfigError(
            f"backbone.pretrained={source} holds no ViT patch and position embedding; "
            "give a timm, big_vision (.npz) or mmseg ViT checkpoint."
        )
    if anchor.endswith("projection.weight"):
        for pattern, new in MMSEG_TO_TIMM:
            state = {re.sub(pattern, new, k): v for k, v in state.items()}
    return state
