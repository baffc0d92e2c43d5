"""models.checkpoint: one loader, strict by default, one-line errors for unreadable or foreign files."""

from __future__ import annotations

import pytest
import torch

from step_lightning.core import ConfigError
from step_lightning.models.checkpoint import load_weights, read_checkpoint
from step_lightning.models.factory import ModelSpec, build_model


def tiny(backbone: str = "vit_t", **kw) -> torch.nn.Module:
    return build_model(ModelSpec(backbone, num_classes=4, img_size=32, depth=2, taps=(1, 2), **kw))


def save(model, path):
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


def test_strict_load_restores_every_tensor(tmp_path):
    source, target = tiny(), tiny()
    loaded = load_weights(target, save(source, tmp_path / "a.ckpt"))
    assert loaded.tensors == loaded.total == len(source.state_dict())
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in source.state_dict().items())


def test_another_backbone_is_one_short_line(tmp_path):
    path = save(tiny("vit_s"), tmp_path / "s.ckpt")
    with pytest.raises(ConfigError) as info:
        load_weights(tiny("vit_t"), path)
    message = str(info.value)
    assert "does not fit this model" in message and "another backbone" in message
    assert len(message) < 500 and "\\n" not in message


def test_matching_load_keeps_new_tensors(tmp_path):
    path = save(tiny(), tmp_path / "plain.ckpt")
    target = tiny(prune_heads=(1,))  # new exit heads
    before = {k: v.clone() for k, v in target.state_dict().items()}
    loaded = load_weights(target, path, strict=False)
    assert 0 < loaded.tensors < loaded.total
    assert torch.equal(target.state_dict()["heads.0.queries.weight"], before["heads.0.queries.weight"])


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\\x03\\x04truncated"])
def test_corrupt_files_are_one_line(tmp_path, content):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="truncated or corrupt") as info:
        read_checkpoint(path)
    assert "weights_only" not in str(info.value)
