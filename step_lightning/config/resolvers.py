"""OmegaConf resolvers the configs use (``${eval_stride:...}``, ``${run_tags:...}``)."""

from __future__ import annotations

from omegaconf import ListConfig, OmegaConf

# mmseg's Cityscapes test strides where they are not two thirds of the crop: 768 for 1024 windows
# (configs/segformer/segformer_mit-b*_8xb1-160k_cityscapes-1024x1024.py). Its 768 windows slide at 512
# (configs/setr/setr_vit-l_*_8xb1-80k_cityscapes-768x768.py), two thirds as elsewhere.
CITYSCAPES_STRIDES = {1024: 768}


def default_eval_stride(crop: int, dataset: str = "") -> int:
    """``${eval_stride:<crop>[,<dataset>]}``: the sliding-window stride of the SegViT/mmseg test configs, two
    thirds of the crop (512 -> 341, 768 -> 512), mmseg's own value for Cityscapes at 1024 (768)."""
    if dataset == "cityscapes" and int(crop) in CITYSCAPES_STRIDES:
        return CITYSCAPES_STRIDES[int(crop)]
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
