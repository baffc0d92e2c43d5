"""A trained segmenter as a graph other runtimes load: torch.export (``.pt2``) or ONNX (``.onnx``).

The graph maps a normalised float batch [B, 3, S, S] to class scores [B, K, S, S]; the batch size is
dynamic, the side S fixed (the training crop: the windows of the sliding-window protocol). Which models
export:

- segvit and cts: static shapes; both formats. (CTS merges a fixed number of windows: its token count is
  the same for every image.)
- dcts: torch.export only, with a data-dependent token count (the padded store sizes its token tensors from
  the policy's decisions at run time). Converted to ONNX its outputs differ from eager's.
- methods with exit heads (dtop, cts_dtop, step, step_single): no. After every exit the surviving tokens
  are compacted with a host-side read of their count and a Python branch on it (``EarlyExitSegmenter``),
  which torch.export cannot trace into one graph.
- policy=oracle checkpoints: no; they read ground-truth labels.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from step_lightning.core import ConfigError
from step_lightning.models.engine import InferenceOptions

FORMATS = {"torch_export": ".pt2", "onnx": ".onnx"}
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
INPUT_NAME, OUTPUT_NAME = "images", "scores"


# The static-shape store: no bucket ladder (a data-dependent branch), dCTS's token count a symbolic size.
EXPORT_OPTIONS = InferenceOptions(engine="padded")


class ScoresGraph(nn.Module):
    """What is exported: normalised images [B, 3, S, S] -> class scores [B, K, S, S], the model's own
    ``predict`` (one definition of the scores for export and every command)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.predict(images, options=EXPORT_OPTIONS)[0]


def check_exportable(spec: dict, fmt: str) -> None:
    """One-line ConfigError saying why the model of ``spec`` (a ModelSpec dict) cannot go to ``fmt``."""
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt} must be one of {', '.join(FORMATS)} or hub (a model folder).")
    if spec["prune_heads"]:
        raise ConfigError(
            f"a model with exit heads (prune_heads={list(spec['prune_heads'])}) cannot be exported: after every "
            "exit it drops a data-dependent number of tokens, read on the host to size the next layers, which "
            "torch.export cannot trace into one graph; export segvit, cts or dcts, or run it with step_lightning.load."
        )
    if spec["tokenizer"] != "patch" and spec["policy"] == "oracle":
        raise ConfigError(
            "this checkpoint places its supertokens with policy=oracle, from ground-truth labels, so its graph would "
            "need labels as input; export a model trained with a policy network (policy=train)."
        )
    if spec["tokenizer"] == "dcts" and fmt == "onnx":
        raise ConfigError(
            "format=onnx covers segvit and cts, whose token count is fixed: dCTS's data-dependent token count does "
            "not survive the ONNX conversion (its outputs differ from eager); use format=torch_export."
        )
    missing = [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None] if fmt == "onnx" else []
    if missing:
        raise ConfigError(
            f"format=onnx needs {', '.join(ONNX_PACKAGES)} ({', '.join(missing)} missing): "
            "pip install 'step-lightning[export]'."
        )


def random_batch(batch: int, size: int, seed: int) -> torch.Tensor:
    """Normalised-looking inputs (unit normal) of a fixed seed."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def export_model(model: nn.Module, fmt: str, path: Path, size: int) -> Path:
    """Write the ``ScoresGraph`` of ``model`` (eval mode, CPU) for size x size inputs to ``path``."""
    graph = ScoresGraph(model).eval()
    example = (random_batch(2, size, seed=0),)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if fmt == "torch_export":
            torch.export.save(torch.export.export(graph, example, dynamic_shapes=dynamic), path)
        else:
            # One self-contained file (weights inside): below protobuf's 2 GB even for ViT-L.
            torch.onnx.export(graph, example, str(path), dynamo=True, dynamic_shapes=dynamic, external_data=False,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], verbose=False)
    return path


def run_exported(fmt: str, path: Path, images: torch.Tensor) -> torch.Tensor:
    """The scores the exported file computes, loaded back as a user would: torch.export.load or onnxruntime."""
    if fmt == "torch_export":
        with torch.no_grad():
            return torch.export.load(path).module()(images)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0])


def max_difference(model: nn.Module, fmt: str, path: Path, size: int) -> float:
    """Largest |exported - eager| on a fresh batch of another size than the export's example (the batch
    dimension is dynamic)."""
    images = random_batch(3, size, seed=1)
    with torch.no_grad():
        expected = model.eval().predict(images)[0]  # the default (packed) store: what predict and eval run
    return float((run_exported(fmt, path, images) - expected).abs().max())
