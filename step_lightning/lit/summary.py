"""The run summary: what one validation measured, built in one place for ``train`` and ``eval``, written
atomically with its path printed last."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_only

from step_lightning.core import PATCH_SIZE
from step_lightning.core.files import write_json
from step_lightning.core.resize import resize_labels
from step_lightning.measure.gflops import ForwardCost
from step_lightning.models.checkpoint import read_checkpoint
from step_lightning.models.engine import InferenceOptions, computed_counts

log = logging.getLogger(__name__)


def validation_summary(val: dict, class_names: Sequence[str]) -> dict:
    """``SegmentationModule.last_val`` -> scores, per-class IoU, token and exit statistics (JSON-ready)."""
    token_stats = val["token_stats"]
    return {
        "mIoU": float(val["mIoU"]),
        "aAcc": float(val["aAcc"]),
        "per_class_IoU": dict(zip(class_names, val["IoU"].tolist(), strict=True)),
        "tokens_per_image": token_stats["total"]["mean"],
        "token_stats": token_stats,
        "exit_stats": val["exit_stats"],
    }


def validation_gflops(model, val: dict, image: torch.Tensor, label: torch.Tensor,
                      options: InferenceOptions | None = None) -> float:
    """Mean GFLOPs per model forward over every forward of the validation (each window in slide mode), from
    each one's token counts (``ForwardCost``: exact per token count; the token-independent part is counted
    at ``image``'s size, the model's input size); ``options``: the validation's (budgets)."""
    options = options or InferenceOptions()
    cost = ForwardCost(model, image, label, options)
    tokens, active = val["per_image"]["tokens"], val["per_image"]["active_after"]
    active = active or [()] * len(tokens)
    grid = (image.shape[-2] // PATCH_SIZE, image.shape[-1] // PATCH_SIZE)
    computed = [computed_counts(model, options, grid, int(t), [int(v) for v in a])
                for t, a in zip(tokens, active, strict=True)]
    return sum(cost(t, a) for t, a in computed) / len(tokens)


def best_validated(callback, last_checkpoint: Path, step: int, score: float, key: str) -> dict:
    """The best validated weights, reported beside the last ones: the best-checkpoint ``callback``'s file, its
    step and its ``key`` score; the last weights' where they score better (a run resumed at its last step
    validates them after the fit, unseen by the callback) or the callback kept none (fast_dev_run, disabled)."""
    path = callback.best_model_path if callback is not None else ""
    if path and Path(path).is_file():
        best = float(callback.best_model_score)
        if not (score > best if callback.mode == "max" else score < best):
            return {"checkpoint": path, "step": int(read_checkpoint(path, mmap=True)["global_step"]), key: best}
    return {"checkpoint": str(last_checkpoint), "step": step, key: score}


def headline(summary: dict) -> str:
    """One line of the figures users compare: mIoU, cost, tokens, halting."""
    line = f"mIoU={summary['mIoU']:.2f} aAcc={summary['aAcc']:.2f}"
    if summary.get("gflops") is not None:
        line += f" gflops={summary['gflops']:.2f}"
    line += f" tokens_per_image={summary['tokens_per_image']:.1f} reduction={summary['token_stats']['reduction']:.2f}x"
    if summary["exit_stats"]:
        line += f" halted_fraction={summary['exit_stats']['halted_fraction']:.3f}"
    return line


def sample_batch(datamodule, count: int = 4, dataset=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A few validation images (or of ``dataset``; with labels, for an oracle policy) cropped to the model's input
    size, for the per-image GFLOPs count (token counts, hence FLOPs, vary per image)."""
    dataset = datamodule.val_set if dataset is None else dataset
    images, labels = [], []
    for i in range(min(count, len(dataset))):
        sample = dataset[i]
        images.append(sample["image"])
        labels.append(resize_labels(sample["label"], sample["image"].shape[1:]))
    crop = min(datamodule.crop_size, *(img.shape[1] for img in images), *(img.shape[2] for img in images))
    crop -= crop % PATCH_SIZE
    return torch.stack([img[:, :crop, :crop] for img in images]), torch.stack([lab[:crop, :crop] for lab in labels])


def write_summary(summary: dict, path: Path, line: str, label: str = "summary") -> dict:
    """Write ``path`` atomically (rank 0 only), print ``line`` and then ``<label>: <path>`` last."""
    if rank_zero_only.rank == 0:
        write_json(path, summary)
        log.info(line)
        log.info(f"{label}: {path}")
    return summary
