"""Export a trained checkpoint to torch.export (``.pt2``) or ONNX, checked against the eager model, or to a model
folder for the Hugging Face Hub.

    python -m step_lightning.export ckpt_path=outputs/<run>/checkpoints/last.ckpt format=onnx [output=model.onnx]
    python -m step_lightning.export ckpt_path=outputs/<run>/checkpoints/last.ckpt format=hub [push_to=org/name]

The graph takes a normalised float batch [B, 3, S, S] (any B; S = the training crop unless ``size=``) and
returns class scores [B, K, S, S]. Beside it, ``<output>.json`` holds what a runtime needs to use it: class
names, palette, normalisation, input and output names. The exported file is loaded back (torch.export.load
or onnxruntime) and run on a random batch; the largest difference from the eager model is printed and must
stay within ``tolerance``. segvit and cts export to both formats, dcts to torch_export; why the others do
not is one ``error:`` line (``step_lightning.api.export``). ``format=hub`` writes a model folder
(``step_lightning.api.pretrained``: model.safetensors, config.json, a model card from the run's summary.json)
whose model computes exactly the checkpoint's class scores, and with ``push_to`` uploads it. The last line is
``export: <file or folder>``.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from step_lightning.api.export import (
    FORMATS,
    INPUT_NAME,
    OUTPUT_NAME,
    check_exportable,
    export_model,
    export_options,
    max_difference,
)
from step_lightning.api.predictor import dataset_metadata
from step_lightning.api.pretrained import push_to_hub, save_pretrained
from step_lightning.cli import checked_command_line, run_command
from step_lightning.core import PATCH_SIZE, ConfigError
from step_lightning.core.files import write_json
from step_lightning.lit.checkpoint import load_module
from step_lightning.models.model_folder import is_model_folder


def export(cfg: DictConfig) -> Path:
    if not cfg.get("ckpt_path"):
        raise ConfigError("ckpt_path is required, e.g. ckpt_path=outputs/<run>/checkpoints/last.ckpt")
    if cfg.format == "hub":
        return export_folder(cfg)
    module = load_module(cfg.ckpt_path)
    spec = dict(module.hparams.model)
    options = export_options(cfg.get("budget"), cfg.get("halt_budget"))
    check_exportable(spec, cfg.format, options)
    size = cfg.size or spec["img_size"]
    if not isinstance(size, int) or size <= 0 or size % PATCH_SIZE:
        raise ConfigError(f"size={size} must be a positive multiple of {PATCH_SIZE} (e.g. {spec['img_size']}).")
    output = Path(cfg.output or Path(cfg.ckpt_path).with_suffix(FORMATS[cfg.format])).expanduser()
    export_model(module.model, cfg.format, output, size, options)
    difference = max_difference(module.model, cfg.format, output, size, options)
    print(f"export: max abs difference from eager {difference:.3g} (tolerance {cfg.tolerance:g})")
    if not difference <= cfg.tolerance:
        output.unlink()
        raise SystemExit(
            f"error: the exported model differs from eager by {difference:.3g} > tolerance={cfg.tolerance:g}; "
            "nothing was written (a looser tolerance=... accepts it)."
        )
    dataset = dataset_metadata(module)
    write_json(output.with_name(f"{output.name}.json"), {
        "format": cfg.format,
        "checkpoint": str(cfg.ckpt_path),
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, size, size], "dtype": "float32",
                  "normalisation": "(rgb_0_255 - mean) / std", "mean": dataset["mean"], "std": dataset["std"]},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(dataset["class_names"]), size, size],
                   "meaning": "class scores; the arg-max over dimension 1 is the label map"},
        "dataset": dataset,
        "model": spec,
        "budgets": {"budget": options.budget, "halt_budget": options.halt_budget},
        "max_abs_difference": difference,
    })
    print(f"export: {output}")
    return output


def export_folder(cfg: DictConfig) -> Path:
    """The model folder of ``cfg.ckpt_path`` (default: beside it, named after it; in a run folder, ``model/``),
    checked against the checkpoint and pushed to ``cfg.push_to`` when given."""
    source = Path(str(cfg.ckpt_path)).expanduser()
    run_folder = source.is_dir() and not is_model_folder(source)
    output = Path(cfg.output or (source / "model" if run_folder else source.with_suffix(""))).expanduser()
    folder = save_pretrained(source, output, summary=cfg.summary, repo_id=cfg.push_to)
    print("export: the model folder computes the checkpoint's class scores exactly (random batch)")
    if cfg.push_to:
        print(f"export: pushed to {push_to_hub(folder, cfg.push_to, cfg.private)}")
    print(f"export: {folder}")
    return folder


@checked_command_line(run_folder=False)
@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    run_command(export, cfg)


if __name__ == "__main__":
    main()
