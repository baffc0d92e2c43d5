"""The one way weights come out of a checkpoint file: read, pick the model's tensors, load.

``read_checkpoint`` reads a checkpoint file or a model folder safely (below) and turns unreadable ones into
one-line errors; ``load_weights`` loads a segmenter's
tensors strictly (the default: every tensor must match) or, with ``strict=False``, copies only the tensors
whose name and shape match (starting a new model from another run, e.g. DToP's phase 2 with new exit
heads), at least ``min_fraction`` of the model's (``matching_tensors``, also run on a model on the meta device
before a training starts); ``load_policy`` rebuilds the frozen dCTS policy network of a policy-training
checkpoint.

Checkpoints are files from elsewhere: unpickling runs whatever code the pickle names. Files are read with
``torch.load(weights_only=True)``, which admits tensors and plain values (dicts, lists, numbers, strings) and
nothing else; this project's own checkpoints hold nothing else (``tests/test_models_checkpoint.py``). A file
with other objects is refused unless the caller trusts it (``trusted``, or the environment variable
``STEP_LIGHTNING_TRUST_CHECKPOINTS=1`` for the commands). Model folders are JSON and safetensors: no code.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from step_lightning.core import ConfigError
from step_lightning.models.model_folder import hyper_parameters, read_model_folder
from step_lightning.tokens.policy import PolicyNet

MODEL_PREFIX = "model."  # SegmentationModule keeps the segmenter under .model
POLICY_PREFIX = "policy."  # PolicyModule keeps the network under .policy
TRUST_VARIABLE = "STEP_LIGHTNING_TRUST_CHECKPOINTS"


def read_checkpoint(path: str | Path, key: str = "ckpt_path", mmap: bool = False, trusted: bool = False) -> dict:
    """The checkpoint dict of ``path``: a checkpoint file, or a model folder as a Lightning checkpoint's
    ``hyper_parameters`` and ``state_dict``; ``key`` names the option that gave it, for the error message.
    ``mmap``: map the tensors instead of reading them (cheap when only the hyper-parameters are needed).
    ``trusted``: unpickle whatever the file holds (only for files from a trusted source)."""
    file = Path(str(path)).expanduser()
    if file.is_dir():
        config, state = read_model_folder(file, key)
        return {"hyper_parameters": hyper_parameters(config),
                "state_dict": {MODEL_PREFIX + k: v for k, v in state.items()}}
    if not file.is_file():
        raise ConfigError(f"{key}={path} does not exist; give a checkpoint of a previous run (e.g. last.ckpt).")
    trusted = trusted or os.environ.get(TRUST_VARIABLE) == "1"
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=not trusted, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))  # anything else: a damaged file
        raise (untrusted_objects(f"{key}={path}", found.group(1)) if found else unreadable(f"{key}={path}", err)) \
            from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise unreadable(f"{key}={path}", err) from None
    if not isinstance(checkpoint, dict):
        raise ConfigError(f"{key}={path} holds a {type(checkpoint).__name__}, not a checkpoint dictionary.")
    return checkpoint


def unreadable(where: str, err: BaseException) -> ConfigError:
    return ConfigError(
        f"{where} is not a readable checkpoint ({type(err).__name__}); the file is truncated or corrupt: "
        "use another checkpoint of the run (e.g. checkpoints/last.ckpt)."
    )


def untrusted_objects(where: str, name: str) -> ConfigError:
    """The refusal of a file holding pickled objects, naming the first one torch would not unpickle."""
    return ConfigError(
        f"{where} holds pickled Python objects besides tensors and plain values (e.g. {name}); unpickling them runs "
        "whatever code the file's author chose, so it was not loaded. If you trust its source: rerun with "
        f"{TRUST_VARIABLE}=1 (Python: trust_checkpoint=True), or convert a segmenter checkpoint once into a model "
        "folder, which loads safely (step-export format=hub)."
    )


def model_state(checkpoint: dict, prefix: str = MODEL_PREFIX) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix`` of a Lightning checkpoint, prefix removed (plain state dicts as they are)."""
    state = checkpoint.get("state_dict", checkpoint)
    if any(k.startswith(prefix) for k in state):
        return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


@dataclass
class Loaded:
    checkpoint: dict  # the whole file: hyper-parameters, callbacks' states, ...
    tensors: int  # tensors copied into the model
    total: int  # tensors of the model (not strict: the policy network's left out)


def policy_tensors(model: nn.Module) -> set[str]:
    """Names of the model's tensors that belong to a policy network: ``policy=`` gives them, never a
    segmenter checkpoint that only initialises the model."""
    return {f"{name}.{key}" for name, module in model.named_modules() if isinstance(module, PolicyNet)
            for key in module.state_dict()}


def matching_tensors(model: nn.Module, checkpoint: dict, min_fraction: float, where: str) -> tuple[dict, int]:
    """The checkpoint's tensors whose name and shape match ``model``'s, its policy network left out, and the
    number of the model's tensors they could fill; ConfigError when they fill less than ``min_fraction``."""
    skip = policy_tensors(model)
    own = {k: v for k, v in model.state_dict().items() if k not in skip}
    state = model_state(checkpoint)
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise ConfigError(f"{where} shares no weights with this model; is it a step-lightning checkpoint?")
    if len(matched) < min_fraction * len(own):
        unmatched = [k for k in own if k not in matched]
        example = next((k for k in unmatched if k in state), unmatched[0])  # a shape mismatch tells the most
        why = f"file {tuple(state[example].shape)}, model {tuple(own[example].shape)}" if example in state else "absent"
        raise ConfigError(
            f"{where} fills {len(matched)}/{len(own)} of this model's tensors, fewer than init_from_min_fraction="
            f"{min_fraction:g} (e.g. {example}: {why}); it was trained with another backbone or method: give a "
            "checkpoint of this model, or set init_from_min_fraction=0 to start from its matching tensors on purpose."
        )
    return matched, len(own)


def load_weights(
    model: nn.Module, source: str | Path | dict, *, strict: bool = True, min_fraction: float = 0.0,
    key: str = "ckpt_path",
) -> Loaded:
    """Load a step_lightning segmenter checkpoint (a path, or a dict ``read_checkpoint`` returned) into ``model``.

    strict: every tensor of the model must be in the file with its shape, and nothing else (one-line error
    naming how many differ and one example). Not strict: copy the tensors whose name and shape match, the
    policy network's excepted, and keep the others' initialisation; they must fill at least ``min_fraction``
    of the model's tensors, and at least one.
    """
    checkpoint = source if isinstance(source, dict) else read_checkpoint(source, key)
    where = f"{key}={source}" if not isinstance(source, dict) else key
    if not strict:
        matched, total = matching_tensors(model, checkpoint, min_fraction, where)
        model.load_state_dict(matched, strict=False)
        return Loaded(checkpoint, len(matched), total)
    state = model_state(checkpoint)
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in matched]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        reshaped = [k for k in state if k in own and own[k].shape != state[k].shape]
        example = (reshaped or missing or unexpected)[0]
        shape = f" (file {tuple(state[example].shape)}, model {tuple(own[example].shape)})" if reshaped else ""
        raise ConfigError(
            f"{where} does not fit this model: {len(missing)} tensors missing or of another shape, "
            f"{len(unexpected)} unexpected (e.g. {example}{shape}); it was trained with another backbone, "
            "method or dataset: use it with the settings it was trained with."
        )
    model.load_state_dict(matched, strict=True)
    return Loaded(checkpoint, len(matched), len(own))


def load_policy(path: str | Path, mean=None, std=None, key: str = "policy") -> PolicyNet:
    """Frozen PolicyNet (eval mode, no gradients) from a policy-training checkpoint (``task=policy``).

    ``mean``/``std`` set the input normalisation of the segmenter that feeds it (the checkpoint's own
    otherwise). ImageNet weights are not read: the checkpoint has all weights.
    """
    checkpoint = read_checkpoint(path, key)
    hparams = checkpoint.get("hyper_parameters", {})
    if "sizes" not in hparams:
        raise ConfigError(f"{key}={path} is not a policy checkpoint (task=policy or policy=train writes one).")
    policy = PolicyNet(
        pretrained=False,
        sizes=hparams["sizes"],
        input_mean=mean if mean is not None else hparams["mean"],
        input_std=std if std is not None else hparams["std"],
        neck_dim=hparams.get("neck_dim", 128),
        hidden_dim=hparams.get("hidden_dim", 64),
        head=hparams.get("head", "mlp"),
    )
    policy.load_state_dict(model_state(checkpoint, POLICY_PREFIX))
    return policy.eval().requires_grad_(False)
