"""A trained segmenter ready to segment images: ``step_lightning.load(path)``.

    model = step_lightning.load("outputs/<run>/checkpoints/last.ckpt")   # device="auto": CUDA when present
    model = step_lightning.load("org/name")              # a model folder on the Hugging Face Hub (or a local one)
    labels = model.predict("photo.jpg")                  # int64 [H, W] class ids at the photo's resolution
    out = model.predict(images, return_scores=True)      # Prediction(labels, scores, ...)

Everything comes from the checkpoint (or model folder): the model, the class names and palette, the
normalisation and the dataset's evaluation protocol, which ``predict`` follows like ``step_lightning.eval``
does: the image is resized so that its short side is the training crop (bilinear), segmented whole or by
sliding windows (the mode, crop and stride it was evaluated with), and the class scores are resized back to
the input's resolution (bilinear) before the arg-max.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from step_lightning.api.images import as_rgb, same_size_batches
from step_lightning.config.checks import check_slide
from step_lightning.core import ConfigError
from step_lightning.core.hub import download_snapshot
from step_lightning.core.resize import resize_labels
from step_lightning.data.transforms import protocol_scale, rescale_size
from step_lightning.lit.checkpoint import load_module
from step_lightning.lit.module import SegmentationModule
from step_lightning.measure.render import token_maps
from step_lightning.measure.timing import DTYPES, resolve_device
from step_lightning.models.engine import InferenceOptions
from step_lightning.models.inference import infer
from step_lightning.models.model_folder import FILES

MODES = ("whole", "slide")
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")


@dataclass
class Prediction:
    """One image's (or, for a tensor input, a batch's) results at the input's resolution.

    labels: int64 class ids [H, W]; scores: the class scores [K, H, W] (``return_scores``); token_map:
    the index of the token that covered each pixel [H, W] (``return_tokens``: the superpatch layout);
    halt_map: the exit head that halted each pixel's token [H, W], 0-based, -1 = the final head
    (``return_halting``). Tensor inputs give the same with a batch dimension first."""

    labels: torch.Tensor
    scores: torch.Tensor | None = None
    token_map: torch.Tensor | None = None
    halt_map: torch.Tensor | None = None

    def split(self) -> list[Prediction]:
        """Per image of a batch."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return [Prediction(**{k: None if v is None else v[i] for k, v in values.items()})
                for i in range(self.labels.shape[0])]

    def to(self, device: torch.device | str) -> Prediction:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Prediction(**{k: None if v is None else v.to(device) for k, v in values.items()})


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of ``precision`` on ``device`` (``auto``: bf16 or fp16 on a GPU, fp32 elsewhere)."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision not in DTYPES:
        raise ConfigError(f"precision={precision} must be auto, {', '.join(DTYPES)}.")
    return DTYPES[precision]


def dataset_metadata(module: SegmentationModule) -> dict:
    """The checkpoint's dataset metadata; checkpoints written before it was kept get numbered classes, a
    fixed random palette and the model's own normalisation and crop."""
    hparams = module.hparams
    if hparams.get("dataset"):
        return dict(hparams.dataset)
    spec = hparams.model
    classes = spec["num_classes"]
    palette = torch.randint(0, 256, (classes, 3), generator=torch.Generator().manual_seed(0)).tolist()
    return {"name": "unknown", "class_names": [f"class {k}" for k in range(classes)], "palette": palette,
            "mean": list(spec["mean"]), "std": list(spec["std"]), "ignore_index": spec["ignore_index"],
            "eval_scale": list(protocol_scale(spec["img_size"]))}


class Predictor:
    """A trained segmenter in eval mode on ``device`` with what it needs to segment new images; ``options``: how
    its forwards run (``InferenceOptions``: store, CUDA graphs, ...); ``precision``: ``auto`` = bf16 autocast on a
    GPU (fp16 where bf16 is unsupported; the packed store then runs variable-length flash attention), fp32 on
    the CPU; or ``fp32`` / ``bf16`` / ``fp16``."""

    def __init__(self, module: SegmentationModule, device: str | torch.device | None = "auto",
                 options: InferenceOptions | None = None, precision: str = "auto"):
        spec = module.hparams.model
        if spec["tokenizer"] != "patch" and spec["policy"] == "oracle":
            raise ConfigError(
                "this checkpoint places its supertokens with policy=oracle, from ground-truth labels, so it cannot "
                "segment new images; use a checkpoint trained with a policy network (policy=train or "
                "policy=<policy checkpoint>)."
            )
        self.device = resolve_device(device)
        self.module = module.eval().to(self.device)
        self.model = self.module.model
        self.options = options or InferenceOptions()
        self.dtype = autocast_dtype(precision, self.device)
        self.spec = dict(spec)
        dataset = dataset_metadata(module)
        self.dataset = dataset["name"]
        self.class_names: list[str] = list(dataset["class_names"])
        self.palette: list[list[int]] = [list(c) for c in dataset["palette"]]
        self.mean: tuple[float, ...] = tuple(dataset["mean"])
        self.std: tuple[float, ...] = tuple(dataset["std"])
        self.ignore_index: int = dataset["ignore_index"]
        # Checkpoints written before the scale was kept hold the short side of the (2048, crop) scale.
        self.eval_scale: tuple[int, int] = tuple(dataset.get("eval_scale") or protocol_scale(dataset["short_side"]))
        self.mode: str = module.hparams.eval_mode
        self.crop: int = module.hparams.eval_crop
        self.stride: int = module.hparams.eval_stride

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __repr__(self) -> str:
        return (
            f"Predictor({self.spec['backbone']}, tokenizer={self.spec['tokenizer']}, "
            f"exits={list(self.spec['prune_heads'])}, {self.num_classes} classes of {self.dataset}, mode={self.mode}, "
            f"crop={self.crop}, stride={self.stride}, eval_scale={self.eval_scale}, device={self.device})"
        )

    def normalise(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> the model's float input [B, 3, H, W] on the device."""
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).float()
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def model_size(self, height: int, width: int) -> tuple[int, int]:
        """The evaluation protocol's input size (``EvalTransform``'s): resized, ratio kept, to fit ``eval_scale``
        (long, short)."""
        width, height = rescale_size(width, height, self.eval_scale)
        return height, width

    def prepare(self, images: torch.Tensor, resize: bool = True) -> torch.Tensor:
        """A normalised batch [B, 3, H, W] as the model sees it (resized per the protocol unless ``resize``
        is False)."""
        size = self.model_size(*images.shape[-2:])
        if not resize or size == tuple(images.shape[-2:]):
            return images
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False)

    @torch.no_grad()
    def predict(
        self,
        images,
        *,
        mode: str | None = None,
        crop: int | None = None,
        stride: int | None = None,
        resize: bool = True,
        batch_size: int = 8,
        return_scores: bool = False,
        return_tokens: bool = False,
        return_halting: bool = False,
    ):
        """Segment ``images``: an image path, a PIL image, an HxWx3 uint8 RGB array, a list of those, or a
        float tensor [B, 3, H, W] already normalised with ``mean``/``std``. Any size.

        Returns int64 label maps at each input's resolution: [H, W] per image (a list for a list), [B, H, W]
        for a tensor; with any ``return_*`` option a ``Prediction`` (or a list of them) instead. Images run
        in batches of up to ``batch_size`` consecutive images of equal size. ``mode``/``crop``/``stride``
        default to the checkpoint's evaluation protocol; ``resize=False`` feeds the image at its own size.
        The token and halting maps come from a whole-image forward (``mode="whole"``)."""
        mode = mode or self.mode
        if mode not in MODES:
            raise ConfigError(f"mode={mode} must be 'whole' or 'slide'.")
        if (return_tokens or return_halting) and mode != "whole":
            raise ConfigError("return_tokens/return_halting need mode='whole': each sliding window has its own tokens.")
        if return_halting and not self.model.exit_layers:
            raise ConfigError("return_halting needs a model with exit heads (dtop, cts_dtop, step, step_single).")
        if mode == "slide":
            check_slide(crop or self.crop, stride or self.stride, option="")
        options = {"mode": mode, "crop": crop or self.crop, "stride": stride or self.stride, "resize": resize,
                   "scores": return_scores, "tokens": return_tokens, "halting": return_halting}
        detailed = return_scores or return_tokens or return_halting
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
                raise ConfigError(
                    f"a tensor input must be a normalised float batch [B, 3, H, W], not {images.dtype} "
                    f"{tuple(images.shape)}; pass images as HxWx3 uint8 arrays otherwise."
                )
            result = self._segment(images.to(self.device, torch.float32), **options).to(images.device)
            return result if detailed else result.labels
        single = not isinstance(images, list | tuple)
        arrays = [as_rgb(image) for image in ([images] if single else images)]
        results: list[Prediction] = []
        for batch in same_size_batches(enumerate(arrays), batch_size):
            x = self.normalise(np.stack([image for _, image in batch]))
            results += self._segment(x, **options).to("cpu").split()
        outputs = results if detailed else [r.labels for r in results]
        return outputs[0] if single else outputs

    def _segment(self, images: torch.Tensor, mode, crop, stride, resize, scores, tokens, halting) -> Prediction:
        height, width = images.shape[-2:]
        x = self.prepare(images, resize)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            class_scores, outs = infer(self.model, x, (height, width), mode, crop, stride, options=self.options)
        token_map = halt_map = None
        if tokens or halting:
            ids, halted_at = token_maps(outs[0], *x.shape[-2:])
            token_map = resize_labels(ids, (height, width)) if tokens else None
            halt_map = resize_labels(halted_at, (height, width)) if halting else None
        return Prediction(class_scores.argmax(1), class_scores if scores else None, token_map, halt_map)


def load(path: str | Path, device: str | torch.device | None = "auto",
         options: InferenceOptions | None = None, precision: str = "auto", *, trust_checkpoint: bool = False,
         **inference) -> Predictor:
    """The ``Predictor`` of a ``step_lightning.train`` checkpoint, a model folder or a Hugging Face Hub repo id
    (``org/name``: its model folder, through the Hub's cache), on ``device`` (``auto``: CUDA when available),
    rebuilt from it alone; ``options``: ``InferenceOptions``; ``precision``: ``auto`` (bf16 on a GPU), ``fp32``,
    ``bf16`` or ``fp16``. ``inference``: other values of the options a trained model may change (``tau``, the
    dCTS thresholds; config.json's ``inference``; ``budget`` / ``halt_budget``, the compute budgets of
    ``InferenceOptions``). ``trust_checkpoint``: a checkpoint file may hold any pickled object: only for files
    from a trusted source."""
    budgets = {key: inference.pop(key) for key in ("budget", "halt_budget") if key in inference}
    options = dataclasses.replace(options or InferenceOptions(), **budgets)
    module = load_module(local_model(path), trusted=trust_checkpoint, inference=inference)
    return Predictor(module, device, options, precision)


REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def local_model(source: str | Path, option: str = "ckpt_path") -> Path:
    """A local checkpoint file or model folder: ``source`` itself when it exists (or names a checkpoint file),
    else the model folder of the Hub repo id ``source`` in the Hugging Face cache, downloaded when needed."""
    path = Path(str(source)).expanduser()
    if path.exists() or not REPO_ID.fullmatch(str(source)) or path.suffix in CHECKPOINT_SUFFIXES:
        return path  # read_checkpoint names a missing file
    return download_snapshot(str(source), FILES, option)
