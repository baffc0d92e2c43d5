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


# --- safe loading: tensors and plain values only ------------------------------------------------------------------


class WritesMarker:
    """A pickled object whose unpickling runs code: it writes ``marker`` (what a malicious file could do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def malicious_checkpoint(path, marker, tiny_checkpoint):
    """A real segmenter checkpoint with one extra hyper-parameter whose unpickling would write ``marker``."""
    checkpoint = torch.load(tiny_checkpoint("segvit"), weights_only=True)
    checkpoint["hyper_parameters"]["note"] = WritesMarker(marker)
    torch.save(checkpoint, path)
    return path


def test_a_checkpoint_that_would_run_code_is_refused_and_the_code_never_runs(tmp_path, tiny_checkpoint, capsys):
    import step_lightning

    marker = tmp_path / "marker"
    path = malicious_checkpoint(tmp_path / "downloaded.ckpt", marker, tiny_checkpoint)
    for load in (lambda: read_checkpoint(path), lambda: step_lightning.load(path, device="cpu")):
        with pytest.raises(ConfigError) as info:
            load()
        message = str(info.value)
        assert "pickled Python objects besides tensors and plain values (e.g. exec)" in message and "\n" not in message
        assert "STEP_LIGHTNING_TRUST_CHECKPOINTS=1" in message and "trust_checkpoint=True" in message
    print(f"error: {message}")  # shown with -s: the line a user reads
    assert not marker.exists()


def test_the_commands_refuse_it_with_one_line(tmp_path, tiny_checkpoint):
    from tests.data_builders import write_image
    from tests.helpers import run_module

    marker = tmp_path / "marker"
    path = malicious_checkpoint(tmp_path / "downloaded.ckpt", marker, tiny_checkpoint)
    write_image(tmp_path / "photos" / "a.png", (40, 40))
    result = run_module("step_lightning.predict", [f"ckpt_path={path}", f"input={tmp_path / 'photos'}",
                                                   f"output={tmp_path / 'out'}"], tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: ckpt_path={path} holds pickled Python objects")
    assert "Traceback" not in result.stderr and not marker.exists()


def test_a_trusted_file_with_other_objects_loads(tmp_path, tiny_checkpoint, monkeypatch):
    """Checkpoints of older Lightning versions held e.g. an argparse.Namespace: loadable when the user trusts them."""
    import argparse

    import step_lightning

    checkpoint = torch.load(tiny_checkpoint("segvit"), weights_only=True)
    checkpoint["hparams_namespace"] = argparse.Namespace(lr=1e-4)
    torch.save(checkpoint, tmp_path / "old.ckpt")
    with pytest.raises(ConfigError, match="argparse.Namespace"):
        step_lightning.load(tmp_path / "old.ckpt", device="cpu")
    assert step_lightning.load(tmp_path / "old.ckpt", device="cpu", trust_checkpoint=True).num_classes == 8
    monkeypatch.setenv("STEP_LIGHTNING_TRUST_CHECKPOINTS", "1")
    assert read_checkpoint(tmp_path / "old.ckpt")["hparams_namespace"].lr == 1e-4


def test_a_runs_own_checkpoints_hold_only_tensors_and_plain_values(tiny_step_run):
    """Every file a training run writes (policy phase, segmenter, best and last) passes weights_only=True, so
    evaluating, predicting and resuming read them safely."""
    files = sorted(tiny_step_run["output_dir"].rglob("*.ckpt"))
    assert {f.parent.name for f in files} == {"policy", "checkpoints"} and len(files) >= 4
    for file in files:
        assert isinstance(torch.load(file, map_location="cpu", weights_only=True), dict)
