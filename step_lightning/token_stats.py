"""Token statistics of a tokenizer over a dataset split (paper Table 2), without running the ViT.

    python -m step_lightning.token_stats data=cityscapes data.root=../shared/realdata/cityscapes \
        data.split=train resolution=1024 tau=6899 policy=oracle [method=cts]

Inputs are the benchmark's crops (``step_lightning.measure.inputs.sample_crops``): each image resized so its
short side is ``resolution``, label resized to it (nearest), then ``crop=tiles`` (default here: the
non-overlapping window grid, clamped at the border; a 2048x1024 Cityscapes image gives two crops side by
side, so the whole image is counted) or ``crop=center``. Prints a table of tokens per size (mean / max /
min over crops), the total and the reduction vs the 16x16 grid, and ends with
``tokens_mean=<value> reduction=<value>``; writes tokens.json in the run directory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from step_lightning.cli import checked_command_line, run_command
from step_lightning.config.checks import check_config
from step_lightning.config.model import model_spec, policy_network
from step_lightning.core.files import write_json
from step_lightning.measure.inputs import sample_crops
from step_lightning.measure.progress import Progress
from step_lightning.metrics import TokenStats
from step_lightning.models.factory import build_tokenizer
from step_lightning.tokens.layout import TOKEN_SIZES

log = logging.getLogger(__name__)


def format_table(stats: dict, title: str) -> str:
    sizes = [f"size_{s}" for s in TOKEN_SIZES]
    header = ["", *(f"{s}x{s}" for s in TOKEN_SIZES), "total", "reduction"]
    lines = [title, "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for stat in ("mean", "max", "min"):
        values = [f"{stats[k][stat]:.1f}" for k in (*sizes, "total")]
        # reduction: mean grid / mean tokens for the mean row, per-image extremes otherwise
        reduction = stats["reduction"] if stat == "mean" else stats["reduction_per_image"][stat]
        lines.append(f"| {stat} | " + " | ".join(values) + f" | {reduction:.2f}x |")
    return "\n".join(lines)


@torch.no_grad()
def token_stats(cfg: DictConfig) -> dict:
    check_config(cfg)
    images, labels, names, datamodule = sample_crops(cfg)
    spec = model_spec(cfg, datamodule.num_classes, datamodule.ignore_index)
    tokenizer = build_tokenizer(spec, policy_network(cfg, spec)).eval()
    stats = TokenStats()
    with Progress(f"token_stats {cfg.method}", len(images)) as progress:
        for start in range(0, len(images), cfg.batch_size):
            x, y = images[start : start + cfg.batch_size], labels[start : start + cfg.batch_size]
            stats.update(tokenizer.layout(x, y))
            progress.step(f"tokenizer (crops {start + 1}-{start + len(x)} of {len(images)})", len(x))
    result = stats.compute()
    setting = (
        f"{cfg.data.name} {cfg.data.get('split') or ''} {len(names)} crops {cfg.resolution}x{cfg.resolution} "
        f"({cfg.crop}), method={cfg.method} tokenizer={cfg.tokenizer} tau={cfg.tau} policy={cfg.policy}"
    )
    log.info(format_table(result, setting))
    write_json(
        Path(cfg.paths.output_dir) / "tokens.json",
        {"stats": result, "crops": names, "config": OmegaConf.to_container(cfg, resolve=True)},
    )
    log.info(f"tokens_mean={result['total']['mean']:.1f} reduction={result['reduction']:.3f}")
    return result


@checked_command_line()
@hydra.main(version_base="1.3", config_path="conf", config_name="tokens")
def main(cfg: DictConfig) -> None:
    run_command(token_stats, cfg)


if __name__ == "__main__":
    main()
