"""STEP (SuperToken and Early-Pruning) for semantic segmentation with plain ViTs.

    import step_lightning
    model = step_lightning.load("outputs/<run>/checkpoints/last.ckpt")   # or a model folder, or "org/name"
    labels = model.predict("photo.jpg")        # int64 [H, W] class ids; model.class_names names them
    step_lightning.save_pretrained("outputs/<run>/checkpoints/last.ckpt", "my-model")   # safetensors + card
"""

from __future__ import annotations

__version__ = "0.1.0"


def load(path, device="auto", options=None, precision="auto", *, trust_checkpoint=False, **inference):
    """A trained segmenter ready to segment images (``step_lightning.api.Predictor``), rebuilt from a
    ``step_lightning.train`` checkpoint, a model folder or a Hugging Face Hub repo id (``org/name``) alone, in eval
    mode on ``device`` (``auto``: CUDA when available); ``options``: ``step_lightning.models.engine.InferenceOptions``
    (store, CUDA graphs, ...); ``precision``: ``auto`` (bf16 autocast on a GPU, fp32 on the CPU), ``fp32``, ``bf16``
    or ``fp16``; ``inference``: other values of the options a trained model may change (``tau=``); checkpoint files
    are read with ``torch.load(weights_only=True)`` unless ``trust_checkpoint``."""
    from step_lightning.api.predictor import load as load_predictor  # here: `import step_lightning` stays light

    return load_predictor(path, device, options, precision, trust_checkpoint=trust_checkpoint, **inference)


def save_pretrained(checkpoint, folder, *, summary=None, repo_id=None, trust_checkpoint=False):
    """Write the model folder of a checkpoint: ``model.safetensors``, ``config.json`` and a model card
    (``README.md``) from the run's ``summary.json``; ``step_lightning.api.pretrained.save_pretrained``."""
    from step_lightning.api.pretrained import save_pretrained as save

    return save(checkpoint, folder, summary=summary, repo_id=repo_id, trust_checkpoint=trust_checkpoint)
