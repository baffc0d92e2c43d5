"""A trained segmenter as a model folder, the layout the Hugging Face Hub serves and ``from_pretrained`` readers
expect: ``model.safetensors`` (every tensor of the segmenter, its policy network's included; safetensors holds
tensors only, so reading it runs no code) and ``config.json``; ``step_lightning.api.pretrained`` adds the
model card, ``README.md``.

config.json::

    step_lightning   the folder format's version
    model            the ModelSpec (``step_lightning.models.factory``), less the inference options
    inference        ModelSpec fields a trained model runs with other values of, without retraining
                     (``INFERENCE_FIELDS``; ``step_lightning.load(folder, tau=...)`` replaces them)
    dataset          class names, palette, normalisation, evaluation scale (``SegDataModule.metadata``)
    evaluation       the protocol it was evaluated with: mode (whole | slide), crop, stride
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from step_lightning.core import ConfigError
from step_lightning.core.files import atomic_write, write_json

FORMAT_VERSION = 1
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
FILES = (CONFIG_FILE, WEIGHTS_FILE)
# ModelSpec fields that change what a trained model computes at inference, not its tensors.
INFERENCE_FIELDS = ("tau",)


def folder_config(spec: dict, dataset: dict, evaluation: dict) -> dict:
    """config.json of a model: its ModelSpec dict, dataset metadata and evaluation protocol (mode, crop, stride)."""
    return {
        "step_lightning": FORMAT_VERSION,
        "model": {k: v for k, v in spec.items() if k not in INFERENCE_FIELDS},
        "inference": {k: spec.get(k) for k in INFERENCE_FIELDS},
        "dataset": dataset,
        "evaluation": {k: evaluation[k] for k in ("mode", "crop", "stride")},
    }


def write_model_folder(folder: Path, config: dict, state: dict[str, torch.Tensor]) -> None:
    """config.json and model.safetensors in ``folder``, each written whole or not at all."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    data = safetensors_bytes(tensors, metadata={"format": "pt"})  # "pt": what transformers-style readers check
    atomic_write(folder / WEIGHTS_FILE, lambda f: f.write(data), binary=True)
    write_json(folder / CONFIG_FILE, config)


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def read_model_folder(folder: Path, key: str = "ckpt_path") -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json with the inference options put back into the model spec, the tensors); one-line errors
    for what is not a step-lightning model folder. ``key``: the option that named it."""
    config_file, weights_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_file.is_file() or not weights_file.is_file():
        raise ConfigError(
            f"{key}={folder} is a folder without {CONFIG_FILE} and {WEIGHTS_FILE}; give a model folder "
            "(step_lightning.save_pretrained or step-export format=hub write one) or a checkpoint file."
        )
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{key}={folder}: {CONFIG_FILE} is not valid JSON ({err}); write the folder again.") from None
    if not isinstance(config, dict) or "step_lightning" not in config:
        raise ConfigError(
            f"{key}={folder} holds another library's {CONFIG_FILE} (no 'step_lightning' entry); give a folder "
            "written by step_lightning.save_pretrained."
        )
    if config["step_lightning"] > FORMAT_VERSION:
        raise ConfigError(
            f"{key}={folder} is model folder format {config['step_lightning']}, newer than this step-lightning "
            f"reads ({FORMAT_VERSION}); upgrade step-lightning."
        )
    try:
        state = load_file(str(weights_file))
    except (SafetensorError, OSError) as err:
        raise ConfigError(
            f"{key}={folder}: {WEIGHTS_FILE} is not a readable safetensors file ({err}); the download or copy is "
            "incomplete: fetch the folder again."
        ) from None
    spec = {**config["model"], **{k: v for k, v in config.get("inference", {}).items() if k in INFERENCE_FIELDS}}
    return {**config, "model": spec}, state


def hyper_parameters(config: dict) -> dict:
    """A model folder's config as the hyper-parameters of the module that rebuilds it (``SegmentationModule``)."""
    evaluation = config["evaluation"]
    return {"model": config["model"], "dataset": config["dataset"], "eval_mode": evaluation["mode"],
            "eval_crop": evaluation["crop"], "eval_stride": evaluation["stride"]}
