"""Token visualisations (paper Figs 3, 7, 8): superpatch boundaries over the image, the tokens each exit head
halted blacked out, prediction and ground truth in the dataset's palette, side by side.

    python -m step_lightning.visualize method=step_single backbone=vit_b resolution=1024 \
        data=cityscapes data.root=../shared/realdata/cityscapes data.split=train num_images=2 \
        [ckpt_path=outputs/<run>/checkpoints/last.ckpt]   # without it: random weights (use force_halt=0.4)

Inputs are the benchmark's crops (``crop=center`` by default). With ``ckpt_path`` the model is rebuilt from
the checkpoint alone; without, the command line's config describes it. One PNG per crop under
``<run dir>/vis``; the last line printed is ``visualize: <that folder>``. The drawing
(``step_lightning.measure.render``) is shared with the validation callback.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from step_lightning.cli import checked_command_line, run_command
from step_lightning.config.checks import check_config
from step_lightning.lit.checkpoint import load_module
from step_lightning.measure.inputs import sample_crops
from step_lightning.measure.presets import build_models
from step_lightning.measure.render import render_panels, save_png
from step_lightning.models.engine import InferenceOptions

log = logging.getLogger(__name__)


def visualize(cfg: DictConfig) -> list[Path]:
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    images, labels, names, datamodule = sample_crops(cfg)
    if cfg.get("ckpt_path"):
        model = load_module(cfg.ckpt_path).model
    else:
        model = build_models({cfg.method: cfg}, datamodule.num_classes, datamodule.ignore_index)[cfg.method]
    out_dir = Path(cfg.paths.output_dir) / "vis"
    paths = []
    for start in range(0, len(images), cfg.batch_size):
        chunk = slice(start, start + cfg.batch_size)
        figures = render_panels(
            model,
            images[chunk],
            labels[chunk],
            datamodule.palette,
            datamodule.mean,
            datamodule.std,
            [f"{cfg.method}: {n}" for n in names[chunk]],
            InferenceOptions.from_config(cfg),
        )
        for figure, name in zip(figures, names[chunk], strict=True):
            paths.append(save_png(figure, out_dir / f"{cfg.method}_{name.replace('/', '_').replace('@', '_')}.png"))
    for path in paths:
        log.info(path)
    log.info(f"visualize: {out_dir}")
    return paths


@checked_command_line()
@hydra.main(version_base="1.3", config_path="conf", config_name="visualize")
def main(cfg: DictConfig) -> None:
    run_command(visualize, cfg)


if __name__ == "__main__":
    main()
