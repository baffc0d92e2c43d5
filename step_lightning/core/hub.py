"""The Hugging Face Hub: pretrained weights by timm tag, through timm's own machinery, with one-line errors (used
by the ViT encoder and the dCTS policy network), checked before a run starts; trained models' folders
downloaded into and read from the Hub's cache (``download_snapshot``) and uploaded (``push_folder``).

The Hub is contacted once, with a short timeout, before weights are fetched: when it cannot be reached,
huggingface_hub is put in offline mode for this process and the processes it starts, so that cached weights
load at once and missing ones fail at once, instead of after a minute of retries per file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from huggingface_hub import HfApi, get_session, snapshot_download, try_to_load_from_cache
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    LocalTokenNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from timm.models import get_pretrained_cfg, split_model_name_tag
from torch import nn

from step_lightning.core.errors import ConfigError

CONTACT_TIMEOUT_S = 5.0
# What timm's load_state_dict_from_hf reads from a tag's Hub repository without hf_hub_filename, in order.
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def go_offline() -> None:
    """huggingface_hub's offline mode here (it reads ``constants.HF_HUB_OFFLINE`` at call time) and in the
    processes started from here (DDP ranks, loader workers: the environment)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub_constants.HF_HUB_OFFLINE = True


def hub_reachable() -> bool:
    """False in offline mode; otherwise one HEAD request to the Hub, and offline mode when it gets no answer."""
    if hub_constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(hub_constants.ENDPOINT, timeout=CONTACT_TIMEOUT_S)
    except Exception:  # no answer at all, whatever the cause (DNS, refused, timeout, proxy): the Hub is unreachable
        go_offline()
        return False
    return True


def cached(tag: str) -> bool:
    """The tag's weight file is in the Hugging Face cache (or, for timm's URL-only tags, torch.hub's)."""
    cfg = get_pretrained_cfg(tag)
    if cfg is None:
        return False
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        names = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_WEIGHT_FILES
        return any(isinstance(try_to_load_from_cache(repo, name, revision=revision or None), str) for name in names)
    if cfg.url:
        return (Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name).is_file()
    return False


def check_timm_weights(
    tag: str, arch: str, option: str, file: str | None = None, file_option: str | None = None
) -> None:
    """The weights of ``tag`` can be loaded: a pretrained tag of ``arch`` (``vit_base_patch16`` also admits
    ``vit_base_patch16_384``) whose weights are ``file``, cached, or downloadable now. ``option`` /
    ``file_option``: the settings named in error messages."""
    if not timm.is_model_pretrained(tag):
        raise ConfigError(f"{option}={tag} is no timm pretrained tag; list them with timm.list_pretrained('{arch}*').")
    model_name = split_model_name_tag(tag)[0]
    if not re.fullmatch(rf"{re.escape(arch)}(_\d+)?", model_name):
        raise ConfigError(
            f"{option}={tag} holds {model_name} weights, this model needs {arch}; pick a tag from "
            f"timm.list_pretrained('{arch}*') or the model that matches the tag."
        )
    if file:
        if not Path(file).expanduser().is_file():
            raise ConfigError(f"{file_option}={file} does not exist; give the downloaded weight file of {tag}.")
        return
    # Contacted even when cached: offline, the download's freshness check would otherwise retry for a minute.
    if not hub_reachable() and not cached(tag):
        raise not_downloadable(tag, option, file_option)


def not_downloadable(tag: str, option: str, file_option: str | None) -> ConfigError:
    by_hand = f", or download the file by hand and set {file_option}=<file>" if file_option else ""
    return ConfigError(
        f"{option}={tag}: the weights are not in the Hugging Face cache and cannot be downloaded (offline?); "
        f"fetch them once with network (timm.create_model('{tag}', pretrained=True)){by_hand}."
    )


def timm_pretrained(
    tag: str, arch: str, option: str, file: str | None = None, file_option: str | None = None, **kwargs
) -> nn.Module:
    """``timm.create_model(tag, pretrained=True, **kwargs)``: weights from timm's Hugging Face cache (offline with
    HF_HUB_OFFLINE=1 once cached) or, given ``file``, from that local copy through ``pretrained_cfg_overlay``.
    Checked first by ``check_timm_weights``."""
    check_timm_weights(tag, arch, option, file, file_option)
    overlay = None
    if file:
        path = Path(file).expanduser()
        # timm reads a local file with torch / safetensors unless told it is the big_vision .npz format.
        overlay = dict(file=str(path), custom_load=path.suffix == ".npz")
    try:
        return timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except LocalEntryNotFoundError as err:
        raise not_downloadable(tag, option, file_option) from err
    except (RuntimeError, KeyError) as err:  # timm's strict load of a file by hand: size mismatches, missing keys
        if not file:
            raise
        raise ConfigError(
            f"{file_option}={file} does not hold {tag} weights in timm's layout ({type(err).__name__}); give that "
            f"tag's file, or give the file alone as {option} (other architectures and mmseg files are read there)."
        ) from err


def download_snapshot(repo_id: str, files: Sequence[str], option: str) -> Path:
    """The local folder of ``files`` of the Hub model repository ``repo_id``: huggingface_hub's snapshot in its
    cache (HF_HUB_CACHE), downloaded when missing or outdated; offline (HF_HUB_OFFLINE=1, or no answer from the
    Hub) the cached snapshot. One snapshot, not a download per file: the files come from one commit.
    ``option``: the setting named in error messages."""
    hub_reachable()
    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(files), library_name="step-lightning"))
    except (RepositoryNotFoundError, GatedRepoError) as err:  # the Hub answers 401 for a private repository too
        raise ConfigError(
            f"{option}={repo_id}: no such model on the Hugging Face Hub, or a private or gated one this login "
            "cannot read (hf auth login, or HF_TOKEN); nor is it a local file or folder."
        ) from err
    except RevisionNotFoundError as err:
        raise ConfigError(f"{option}={repo_id}: the Hub repository has no main branch; push a model first.") from err
    except LocalEntryNotFoundError as err:
        raise ConfigError(
            f"{option}={repo_id} is not a local file or folder, nor in the Hugging Face cache, and the Hub cannot "
            "be reached (offline?); download it once with network, or give the model folder's path."
        ) from err
    except HFValidationError as err:
        raise ConfigError(f"{option}={repo_id} is neither a local file or folder nor a Hub repo id.") from err


def push_folder(folder: Path, repo_id: str, private: bool, message: str) -> str:
    """Upload ``folder`` to the Hub model repository ``repo_id`` (created when missing) in one commit with
    huggingface_hub's HfApi; returns the commit's URL. Needs a login (``hf auth login`` or HF_TOKEN)."""
    if hub_constants.HF_HUB_OFFLINE:
        raise ConfigError(f"push_to={repo_id}: HF_HUB_OFFLINE=1 forbids uploads; unset it to push.")
    api = HfApi()
    try:
        repo = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo.repo_id, folder_path=str(folder), repo_type="model",
                                   commit_message=message)
    except LocalTokenNotFoundError as err:
        raise ConfigError(f"push_to={repo_id}: not logged in to the Hugging Face Hub; run `hf auth login` or set "
                          "HF_TOKEN.") from err
    except HFValidationError as err:
        raise ConfigError(f"push_to={repo_id} is not a Hub repo id; use org/name.") from err
    except HfHubHTTPError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"push_to={repo_id}: the Hub refused the upload ({first[:200]}); the model folder "
                          f"{folder} is written: push it again later.") from err
    return commit.commit_url
