"""Segment your own images with a trained checkpoint.

    python -m step_lightning.predict ckpt_path=outputs/<run>/checkpoints/last.ckpt input=photos/ output=predictions \
        [mode=slide] [device=cpu] [batch_size=4] [panels=true]

``input`` is an image, a folder (searched recursively) or a quoted glob. Per image, at its own resolution:
``<name>.png``, the class ids as a palette PNG (each id shown in its class colour), and ``<name>_overlay.png``,
the image with the class colours blended in; ``panels=true`` adds ``<name>_tokens.png`` (superpatch
boundaries, halted tokens, prediction). Names keep the input's sub-folders. The model follows its dataset's
evaluation protocol (``step_lightning.api.predictor``). An unreadable image is skipped with a warning; the
last line is ``predict: <n> images written to <output>, <m> skipped``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from step_lightning.api.images import find_images, label_image, output_stems, overlay, same_size_batches
from step_lightning.api.predictor import load
from step_lightning.cli import checked_command_line, run_command
from step_lightning.core import ConfigError
from step_lightning.data.io import read_image
from step_lightning.measure.render import render_panels, save_png


def required(cfg: DictConfig, key: str, example: str) -> str:
    value = cfg.get(key)
    if value in (None, ""):
        raise ConfigError(f"{key} is required, e.g. {key}={example}")
    return str(value)


def destination(output: Path, stem: Path, ending: str) -> Path:
    """An output file of the image whose output stem is ``stem`` (its relative path without suffix)."""
    return output / stem.parent / f"{stem.name}{ending}"


def readable(files: list[tuple[Path, Path]], skipped: list[Path], bar: tqdm) -> Iterator[tuple[Path, np.ndarray]]:
    """(output stem, image) of every (file, stem) that decodes; the others are warned about and skipped."""
    for file, stem in files:
        try:
            yield stem, read_image(file)
        except ConfigError as err:
            cause = err.__cause__ or err
            tqdm.write(f"warning: {file} is not a readable image ({type(cause).__name__}); skipped", file=sys.stderr)
            skipped.append(file)
            bar.update(1)


def predict(cfg: DictConfig) -> dict:
    """Segment every image ``cfg.input`` names into ``cfg.output``; returns the counts and the output folder."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ckpt = required(cfg, "ckpt_path", "outputs/<run>/checkpoints/last.ckpt")
    output = Path(required(cfg, "output", "predictions")).expanduser()
    files, root = find_images(required(cfg, "input", "photos/"), exclude=output)
    predictor = load(ckpt, cfg.device)
    stems = output_stems(files, root)
    inputs = {f.resolve() for f in files}
    if any(destination(output, stem, ".png").resolve() in inputs for stem in stems):
        raise ConfigError(f"output={output} would overwrite input images with their label maps; choose another folder.")
    # The command line's protocol settings replace the checkpoint's defaults.
    predictor.mode, predictor.crop, predictor.stride = (cfg.mode or predictor.mode, cfg.crop or predictor.crop,
                                                        cfg.stride or predictor.stride)
    print(f"predict: {len(files)} images, {predictor}")
    written, skipped = 0, []
    with tqdm(total=len(files), desc="predict", unit="image", file=sys.stderr) as bar:
        for batch in same_size_batches(readable(list(zip(files, stems, strict=True)), skipped, bar), cfg.batch_size):
            images = [image for _, image in batch]
            labels = predictor.predict(images, resize=cfg.resize, batch_size=len(batch))
            figures = [None] * len(batch)
            if cfg.panels:
                x = predictor.prepare(predictor.normalise(np.stack(images)), cfg.resize)
                figures = render_panels(predictor.model, x, None, predictor.palette, predictor.mean, predictor.std,
                                        [str(stem) for stem, _ in batch])
            for (stem, image), label, figure in zip(batch, labels, figures, strict=True):
                label_path = destination(output, stem, ".png")
                label_path.parent.mkdir(parents=True, exist_ok=True)
                label_image(label, predictor.palette).save(label_path)
                save_png(overlay(image, label, predictor.palette, cfg.alpha), destination(output, stem, "_overlay.png"))
                if figure is not None:
                    save_png(figure, destination(output, stem, "_tokens.png"))
                written += 1
            bar.update(len(batch))
    print(f"predict: {written} images written to {output}, {len(skipped)} skipped")
    return {"written": written, "skipped": [str(f) for f in skipped], "output": str(output)}


@checked_command_line(run_folder=False)
@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    run_command(predict, cfg)


if __name__ == "__main__":
    main()
