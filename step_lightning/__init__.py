"""STEP (SuperToken and Early-Pruning) for semantic segmentation with plain ViTs.

    import step_lightning
    model = step_lightning.load("outputs/<run>/checkpoints/last.ckpt")
    labels = model.predict("photo.jpg")        # int64 [H, W] class ids; model.class_names names them
"""

from __future__ import annotations

__version__ = "0.1.0"


def load(path, device="auto", options=None, precision="auto"):
    """A trained segmenter ready to segment images (``step_lightning.api.Predictor``), rebuilt from a
    ``step_lightning.train`` checkpoint alone, in eval mode on ``device`` (``auto``: CUDA when available);
    ``options``: ``step_lightning.models.engine.InferenceOptions`` (store, CUDA graphs, ...); ``precision``: ``auto``
    (bf16 autocast on a GPU, fp32 on the CPU), ``fp32``, ``bf16`` or ``fp16``."""
    from step_lightning.api.predictor import load as load_predictor  # here: `import step_lightning` stays light

    return load_predictor(path, device, options, precision)
