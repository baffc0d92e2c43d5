"""OmegaConf resolvers the configs use (``${eval_stride:...}``, ``${run_tags:...}``)."""

from __future__ import annotations

from omegaconf import ListConfig, OmegaConf


def default_eval_stride(crop: int) -> int:
    """Sliding-window stride of the SegViT/mmseg test configs: two thirds of the crop (512 -> 341)."""
    return int(crop) * 2 // 3


def run_tags(*parts) -> list[str]:
    """``${run_tags:${method},${backbone.name},${data.name},${tags}}``: the W&B tags of a run, the user's
    ``tags`` list after method, backbone and dataset."""
    tags = []
    for part in parts:
        tags.extend(str(t) for t in (part if isinstance(part, list | ListConfig) else [part]) if t is not None)
    return list(dict.fromkeys(tags))


def machine_precision() -> str:
    """``${machine_precision:}``: bf16-mixed on GPUs that support it, 16-mixed on older GPUs, 32-true on CPU."""
    import torch

    if not torch.cuda.is_available():
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("eval_stride"):
        OmegaConf.register_new_resolver("eval_stride", default_eval_stride)
    if not OmegaConf.has_resolver("machine_precision"):
        OmegaConf.register_new_resolver("machine_precision", machine_precision)
    if not OmegaConf.has_resolver("run_tags"):
        OmegaConf.register_new_resolver("run_tags", run_tags)
