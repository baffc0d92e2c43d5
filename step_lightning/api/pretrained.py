"""A trained model shared the way the field does: a model folder (``model.safetensors``, ``config.json`` and a
model card, ``README.md``) written from a checkpoint, loaded back by ``step_lightning.load`` from the folder or
from a Hugging Face Hub repo id, and pushed to the Hub.

    step_lightning.save_pretrained("outputs/<run>/checkpoints/last.ckpt", "my-model")
    model = step_lightning.load("my-model")          # or load("org/name") once pushed: push_to_hub("my-model", ...)

huggingface_hub's PyTorchModelHubMixin is not used: it rebuilds a model from its constructor's arguments, while
a segmenter is built from a ModelSpec (``build_model``) and its folder also carries the dataset and the
evaluation protocol. Its parts are: snapshot_download, HfApi, ModelCard.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from timm.models import get_pretrained_cfg

from step_lightning.api.export import random_batch
from step_lightning.api.predictor import dataset_metadata
from step_lightning.core import PATCH_SIZE, ConfigError
from step_lightning.core.files import atomic_write_text, read_json
from step_lightning.core.hub import push_folder
from step_lightning.data.transforms import protocol_scale
from step_lightning.lit.checkpoint import load_module
from step_lightning.models.model_folder import FILES, folder_config, is_model_folder, write_model_folder

CARD_FILE = "README.md"
DATASET_NAMES = {"ade20k": "ADE20K", "cityscapes": "Cityscapes", "cocostuff10k": "COCO-Stuff-10k",
                 "cocostuff164k": "COCO-Stuff-164k"}
# conf/method/: the methods by tokenizer and whether the model has exit heads (step_single: STEP with one).
METHODS = {("patch", False): "SegViT", ("patch", True): "DToP", ("cts", False): "CTS", ("cts", True): "CTS + DToP",
           ("dcts", False): "dCTS", ("dcts", True): "STEP"}
CITATION = """\
@inproceedings{proust2025step,
  title     = {{STEP}: SuperToken and Early-Pruning for Efficient Semantic Segmentation},
  author    = {Proust, M. and Poreba, M. and Szczepanski, M. and Haroun, K.},
  booktitle = {20th International Joint Conference on Computer Vision, Imaging and Computer Graphics Theory
               and Applications (VISIGRAPP 2025)},
  pages     = {56--61},
  year      = {2025},
  doi       = {10.5220/0013132800003912}
}
@misc{szczepanski_where_do_tokens_go,
  title  = {Where Do Tokens Go? Understanding Pruning Behaviors in {STEP} at High Resolutions},
  author = {Szczepanski, Micha{\\l} and Poreba, Martyna and Haroun, Karim},
  note   = {extended version of the VISIGRAPP 2025 paper}
}"""


def save_pretrained(
    checkpoint: str | Path, folder: str | Path, *, summary: str | Path | bool | None = None,
    repo_id: str | None = None, trust_checkpoint: bool = False,
) -> Path:
    """Write the model folder of a ``step_lightning.train`` checkpoint to ``folder``: ``model.safetensors`` (every
    tensor, the policy network's included), ``config.json`` and the model card. ``checkpoint`` may also be a run
    folder (the checkpoint its summary.json measured: the final weights, last.ckpt) or another model folder.

    ``summary``: the run's ``summary.json`` (or ``eval.json``) the card's figures come from; None: the run's
    own, beside its ``checkpoints/`` folder, when there is one; False: a card without figures. It must measure
    this checkpoint. ``repo_id``: the Hub repository the card's examples load from (default: the folder).
    ``trust_checkpoint``: the file may hold any pickled object (only for a file from a trusted source).
    The folder is written whole or not at all, after the model read back from it computed exactly the checkpoint's
    class scores on a random batch; an existing model folder there is replaced."""
    target = Path(folder).expanduser()
    check_target(target)
    source, figures = measured_model(Path(str(checkpoint)).expanduser(), summary)
    module = load_module(source, trusted=trust_checkpoint)
    hparams = module.hparams
    dataset = dataset_metadata(module)
    if "eval_scale" not in dataset:  # checkpoints written before the scale was kept hold its short side
        dataset["eval_scale"] = list(protocol_scale(dataset.pop("short_side")))
    config = folder_config(dict(hparams.model), dataset,
                           {"mode": hparams.eval_mode, "crop": hparams.eval_crop, "stride": hparams.eval_stride})
    card = model_card(config, figures, repo_id or target.name)
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    write_model_folder(partial, config, module.model.state_dict())
    atomic_write_text(partial / CARD_FILE, card)
    for file in partial.iterdir():
        file.chmod(0o644)  # atomic writes create private files; a model folder is for sharing
    check_round_trip(module, partial)
    if target.exists():  # renames: a crash leaves the old folder or the new one, never a mix of both
        previous = target.with_name(f".{target.name}.previous")
        shutil.rmtree(previous, ignore_errors=True)
        target.rename(previous)
        partial.rename(target)
        shutil.rmtree(previous)
    else:
        partial.rename(target)
    return target


def check_target(target: Path) -> None:
    """``target`` is new, empty or a model folder (replaced); never a folder with other files."""
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{target} is a file; give a folder for the model (nothing was written).")
    others = sorted(p.name for p in target.iterdir() if p.name not in (*FILES, CARD_FILE)) if target.exists() else []
    if others or (target.exists() and any(target.iterdir()) and not is_model_folder(target)):
        raise ConfigError(
            f"{target} holds other files than a model folder's ({', '.join(others[:3]) or 'no config.json'}); "
            "choose a new or empty folder (nothing was written)."
        )


def measured_model(source: Path, summary: str | Path | bool | None) -> tuple[Path, dict | None]:
    """The checkpoint (or model folder) to write and the run summary whose figures describe it
    (``save_pretrained``'s ``summary``). ``source`` may be a run folder: the checkpoint its summary.json measured."""
    if is_model_folder(source):
        if summary not in (None, False):
            raise ConfigError(f"{source} is a model folder: its figures are in its {CARD_FILE}; give summary=false "
                              "or export the run's checkpoint.")
        return source, None
    run_folder = source.is_dir()
    if summary is False:
        if run_folder:
            raise ConfigError(f"{source} is a run folder; with summary=false give one of its checkpoints.")
        return source, None
    default = source / "summary.json" if run_folder else source.parent.parent / "summary.json"
    file = default if summary is None else Path(str(summary)).expanduser()
    if not file.is_file():
        if summary is not None or run_folder:
            raise ConfigError(f"summary={file} does not exist; give the run's summary.json or eval.json.")
        return source, None
    figures = read_json(file)
    if "mIoU" not in figures:
        raise ConfigError(f"summary={file} holds no segmentation results (a policy run's?); give the segmenter "
                          "run's summary.json or an eval.json.")
    measured = Path(figures["checkpoint"]).name
    if run_folder:
        source = source / "checkpoints" / measured
    if measured != source.name:
        raise ConfigError(
            f"{file} measures {measured}, not {source.name}: export that checkpoint (ckpt_path="
            f"{source.with_name(measured)}, or the run folder), or give the eval.json of `step-eval ckpt_path="
            f"{source}` as summary=..., or summary=false for a card without figures."
        )
    return source, figures


def model_card(config: dict, summary: dict | None, repo_id: str) -> str:
    """The model card of a model folder: Hub metadata (license, pipeline, mIoU as model-index) and the text."""
    spec, dataset = config["model"], config["dataset"]
    dataset_name = DATASET_NAMES.get(dataset["name"], dataset["name"])
    backbone = f"{spec['backbone']} (depth {spec['depth']})" if spec.get("depth") else spec["backbone"]
    method = METHODS[spec["tokenizer"], bool(spec["prune_heads"])]
    title = f"{method} {spec['backbone']} on {dataset_name}"
    weights, license_id = backbone_weights(summary)
    results = []
    if summary:
        results = [EvalResult(task_type="image-segmentation", dataset_type=dataset["name"], dataset_name=dataset_name,
                              metric_type="mean_iou", metric_value=round(summary["mIoU"], 2), metric_name="mIoU (%)")]
    data = ModelCardData(license=license_id, library_name="step-lightning", pipeline_tag="image-segmentation",
                         tags=["semantic-segmentation", "vision-transformer", "token-reduction", "step-lightning"],
                         model_name=title, eval_results=results or None)
    evaluation = config["evaluation"]
    protocol = "the whole image" if evaluation["mode"] == "whole" else (
        f"sliding windows of {evaluation['crop']} px, stride {evaluation['stride']}")
    rows = [
        ("Dataset", f"{dataset_name}, {len(dataset['class_names'])} classes; evaluated on {protocol}, resized to "
                    f"{dataset['eval_scale'][1]} px on the short side first"),
        ("Method", f"{method} ({summary['method']})" if summary and summary.get("method") else method),
        ("Tokens", f"{tokenizer_text(spec, config['inference'])}; {exits_text(spec)}"),
        ("Backbone", f"{backbone}, ViT/{PATCH_SIZE} at {spec['img_size']} px; initialised from {weights}"),
    ]
    if summary:
        rows += [(name, value) for name, value in figure_rows(summary) if value is not None]
    lines = [
        "---", data.to_yaml(), "---", "", f"# {title}", "",
        "Semantic segmentation with a plain Vision Transformer and attention-to-mask heads (SegViT), trained "
        "with step-lightning, the implementation of STEP (SuperToken and Early-Pruning) and of the token "
        "reductions it builds on. Every weight is in `model.safetensors`, the policy network's included; "
        "`config.json` rebuilds the model.", "",
        "| | |", "|---|---|", *[f"| {name} | {value} |" for name, value in rows], "",
    ]
    if not summary:
        lines += ["No run summary was given: this card has no measured figures.", ""]
    lines += cost_table(summary)
    lines += [
        "## How to use", "", "```python", "import step_lightning", "",
        f'model = step_lightning.load("{repo_id}")' + ("   # downloaded into the Hugging Face cache once"
                                                          if "/" in repo_id else "   # this folder"),
        'labels = model.predict("photo.jpg")        # int64 [H, W] class ids; model.class_names names them',
        "```", "",
        f"or `step-predict ckpt_path={repo_id} input=photos/ output=predictions`; both need step-lightning "
        "installed.",
    ]
    if "tau" in config["inference"] and config["inference"]["tau"] is not None:
        lines += ["", "Options that change without retraining (`config.json`'s `inference`): the dCTS thresholds, "
                      f'e.g. `step_lightning.load("{repo_id}", tau=4999)` instead of the trained '
                      f"`tau={config['inference']['tau']}` (lower thresholds merge more windows: fewer tokens)."]
    lines += [
        "", "## License", "",
        f"Backbone initialised from {weights}" + ("" if license_id == "unknown" else f", released under {license_id}")
        + f". Those weights' terms and the training data's ({dataset_name}) bound this model's; whoever publishes "
        "it sets its `license` in the metadata above.", "",
        "## Citation", "", "```bibtex", CITATION, "```", "",
    ]
    return ModelCard("\n".join(lines)).content


def backbone_weights(summary: dict | None) -> tuple[str, str]:
    """(what the backbone was initialised from, the license of those weights) from the run's config."""
    tag = (((summary or {}).get("config") or {}).get("model") or {}).get("pretrained")
    if summary is None:
        return "weights not recorded here (no run summary)", "unknown"
    if tag in (None, "none"):
        return "nothing (trained from scratch)", "unknown"
    cfg = get_pretrained_cfg(str(tag))
    if cfg is None:
        return f"`{Path(str(tag)).name}` (a local file; its license is not recorded)", "unknown"
    return f"timm's `{tag}`", cfg.license or "unknown"


def tokenizer_text(spec: dict, inference: dict) -> str:
    if spec["tokenizer"] == "patch":
        return "16x16 patches"
    if spec["tokenizer"] == "cts":
        return f"CTS superpatches ({spec['cts_k']} merged 2x2 windows)" if spec.get("cts_k") else "CTS superpatches"
    return f"dCTS superpatches (tau={inference['tau']}, {spec['policy']} policy)"


def exits_text(spec: dict) -> str:
    heads = list(spec["prune_heads"])
    return f"early exits after layers {heads} (threshold {spec['prune_threshold']})" if heads else "no early exit"


def figure_rows(summary: dict) -> list[tuple[str, str | None]]:
    exits = summary.get("exit_stats") or {}
    token_stats = summary.get("token_stats") or {}
    gflops = summary.get("gflops")
    return [
        ("mIoU", f"{summary['mIoU']:.2f}" + (f" (aAcc {summary['aAcc']:.2f})" if "aAcc" in summary else "")),
        ("GFLOPs", None if gflops is None else f"{gflops:.4g} per forward (per window in slide mode)"),
        ("Tokens per image", f"{summary['tokens_per_image']:.1f}"
         + (f" ({token_stats['reduction']:.2f}x reduction from 16x16 patches)" if "reduction" in token_stats else "")),
        ("Halted fraction", f"{exits['halted_fraction']:.3f}" if exits else None),
        ("Training steps", None if summary.get("steps") is None else str(summary["steps"])),
    ]


def cost_table(summary: dict | None) -> list[str]:
    """Accuracy against cost over the run's phases (DToP's recipe: halting off, then fine-tuned with halting);
    nothing for a run of one phase."""
    phases = (summary or {}).get("phases") or {}
    if not phases:
        return []
    rows = [*phases.items(), ("final", summary)]
    lines = ["## Accuracy and cost", "", "| phase | mIoU | GFLOPs | tokens per image | halted fraction |",
             "|---|---|---|---|---|"]
    for name, figures in rows:
        halted = (figures.get("exit_stats") or {}).get("halted_fraction")
        gflops = figures.get("gflops")
        lines.append(f"| {name} | {figures['mIoU']:.2f} | {'-' if gflops is None else f'{gflops:.4g}'} | "
                     f"{figures['tokens_per_image']:.1f} | {'-' if halted is None else f'{halted:.3f}'} |")
    return [*lines, ""]


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload a model folder to the Hub repository ``repo_id`` (created when missing; ``private`` then); returns
    the commit's URL. Needs a login: ``hf auth login`` or HF_TOKEN."""
    path = Path(folder).expanduser()
    if not is_model_folder(path):
        raise ConfigError(f"{folder} is not a model folder; write one first with step_lightning.save_pretrained.")
    return push_folder(path, repo_id, private, "Upload a step-lightning model")


def check_round_trip(module, folder: Path) -> None:
    """The model read back from ``folder`` computes exactly ``module``'s class scores on a random batch."""
    scores = []
    for model in (module.model, load_module(folder).model):
        with torch.no_grad():
            scores.append(model.eval().predict(random_batch(2, module.hparams.model["img_size"], seed=3))[0])
    difference = float((scores[0] - scores[1]).abs().max())
    if difference != 0:
        shutil.rmtree(folder)
        raise ConfigError(f"the model folder computes other class scores than its checkpoint (by {difference:.3g}); "
                          "nothing was written.")
