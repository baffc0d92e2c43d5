"""Pretrained weights by timm tag, through timm's own machinery, with one-line errors (used by the ViT
encoder and the dCTS policy network)."""

from __future__ import annotations

import re
from pathlib import Path

import timm
from huggingface_hub.errors import LocalEntryNotFoundError
from timm.models import split_model_name_tag
from torch import nn

from step_lightning.core.errors import ConfigError


def timm_pretrained(
    tag: str, arch: str, option: str, file: str | None = None, file_option: str | None = None, **kwargs
) -> nn.Module:
    """``timm.create_model(tag, pretrained=True, **kwargs)``: weights from timm's Hugging Face cache (offline with
    HF_HUB_OFFLINE=1 once cached) or, given ``file``, from that local copy through ``pretrained_cfg_overlay``.

    ``arch``: the timm architecture the tag must name (``vit_base_patch16`` also admits ``vit_base_patch16_384``);
    ``option`` / ``file_option``: the settings named in error messages.
    """
    if not timm.is_model_pretrained(tag):
        raise ConfigError(f"{option}={tag} is no timm pretrained tag; list them with timm.list_pretrained('{arch}*').")
    model_name = split_model_name_tag(tag)[0]
    if not re.fullmatch(rf"{re.escape(arch)}(_\d+)?", model_name):
        raise ConfigError(
            f"{option}={tag} holds {model_name} weights, this model needs {arch}; pick a tag from "
            f"timm.list_pretrained('{arch}*') or the model that matches the tag."
        )
    overlay = None
    if file:
        path = Path(file).expanduser()
        if not path.is_file():
            raise ConfigError(f"{file_option}={file} does not exist; give the downloaded weight file of {tag}.")
        # timm reads a local file with torch / safetensors unless told it is the big_vision .npz format.
        overlay = dict(file=str(path), custom_load=path.suffix == ".npz")
    try:
        return timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except LocalEntryNotFoundError as err:
        by_hand = f", or download the file by hand and set {file_option}=<file>" if file_option else ""
        raise ConfigError(
            f"{option}={tag}: the weights are not in the Hugging Face cache and cannot be downloaded (offline?); "
            f"fetch them once with network (timm.create_model('{tag}', pretrained=True)){by_hand}."
        ) from err
    except (RuntimeError, KeyError) as err:  # timm's strict load of a file by hand: size mismatches, missing keys
        if not file:
            raise
        raise ConfigError(
            f"{file_option}={file} does not hold {tag} weights in timm's layout ({type(err).__name__}); give that "
            f"tag's file, or give the file alone as {option} (other architectures and mmseg files are read there)."
        ) from err
