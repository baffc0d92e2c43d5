"""A trained segmenter as a graph other runtimes load: torch.export (``.pt2``) or ONNX (``.onnx``).

The graph maps a normalised float batch [B, 3, S, S] to class scores [B, K, S, S]; the batch size is
dynamic, the side S fixed (the training crop: the windows of the sliding-window protocol). Which models
export:

- segvit and cts: static shapes; both formats. (CTS merges a fixed number of windows: its token count is
  the same for every image.)
- dcts: torch.export only, with a data-dependent token count (the padded store sizes its token tensors from
  the policy's decisions at run time). Converted to ONNX its outputs differ from eager's.
- methods with exit heads (dtop, cts_dtop, step, step_single): with compute budgets (``halt_budget``, and
  ``budget`` for dCTS tokenizers) every shape is known from the input's, no host read: torch.export, and ONNX
  for patch and CTS tokenizers (dtop, cts_dtop).
  Without, no: after every exit the surviving tokens are compacted with a host-side read of their count.
- dcts with a ``budget``: torch.export with a static token count. Converted to ONNX, dCTS layouts (with or
  without a budget) differ from eager, so ONNX is refused for dCTS tokenizers.
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


def export_options(budget: float | None = None, halt_budget: float | None = None) -> InferenceOptions:
    """How the exported forward runs: with budgets the packed store, static without a read; without, the padded
    store (no bucket ladder, a data-dependent branch; dCTS's token count a symbolic size)."""
    static = budget is not None or halt_budget is not None
    return InferenceOptions(engine="packed" if static else "padded", budget=budget, halt_budget=halt_budget)


class ScoresGraph(nn.Module):
    """What is exported: normalised images [B, 3, S, S] -> class scores [B, K, S, S], the model's own
    ``predict`` (one definition of the scores for export and every command) with ``options``."""

    def __init__(self, model: nn.Module, options: InferenceOptions):
        super().__init__()
        self.model = model
        self.options = options

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.predict(images, options=self.options)[0]


def check_exportable(spec: dict, fmt: str, options: InferenceOptions) -> None:
    """One-line ConfigError saying why the model of ``spec`` (a ModelSpec dict) cannot go to ``fmt`` with
    ``options`` (its budgets)."""
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt} must be one of {', '.join(FORMATS)} or hub (a model folder).")
    token_budget = options.budget if options.budget is not None else spec.get("budget")
    halt_budget = options.halt_budget if options.halt_budget is not None else spec.get("halt_budget")
    if spec["prune_heads"] and (halt_budget is None or (spec["tokenizer"] == "dcts" and token_budget is None)):
        needs = "halt_budget=<fraction>" + (" and budget=<fraction>" if spec["tokenizer"] == "dcts" else "")
        raise ConfigError(
            f"a model with exit heads (prune_heads={list(spec['prune_heads'])}) exports with compute budgets only: "
            "without them it drops a data-dependent number of tokens after every exit, read on the host; "
            f"give {needs} (e.g. halt_budget=0.3 budget=0.4), or run it with step_lightning.load."
        )
    if spec["tokenizer"] != "patch" and spec["policy"] == "oracle":
        raise ConfigError(
            "this checkpoint places its supertokens with policy=oracle, from ground-truth labels, so its graph would "
            "need labels as input; export a model trained with a policy network (policy=train)."
        )
    if spec["tokenizer"] == "dcts" and fmt == "onnx":
        raise ConfigError(
            "format=onnx does not cover dCTS tokenizers: converted to ONNX their layouts differ from eager (also with "
            "a budget); use format=torch_export (with budget= and halt_budget= for one static graph)."
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


def export_model(model: nn.Module, fmt: str, path: Path, size: int, options: InferenceOptions | None = None) -> Path:
    """Write the ``ScoresGraph`` of ``model`` (eval mode, CPU) for size x size inputs to ``path``; ``options``:
    ``export_options`` (budgets)."""
    graph = ScoresGraph(model, options or export_options()).eval()
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


def max_difference(model: nn.Module, fmt: str, path: Path, size: int, options: InferenceOptions | None = None) -> float:
    """Largest |exported - eager| on a fresh batch of another size than the export's example (the batch
    dimension is dynamic); eager = ``predict`` with the same budgets on the packed store, what predict runs."""
    images = random_batch(3, size, seed=1)
    options = options or export_options()
    with torch.no_grad():
        expected = model.eval().predict(images, options=InferenceOptions(budget=options.budget,
                                                                         halt_budget=options.halt_budget))[0]
    return float((run_exported(fmt, path, images) - expected).abs().max())
