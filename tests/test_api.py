"""The Python API: ``step_lightning.load(path).predict(...)`` on every kind of input, at any size, following the
evaluation protocol saved in the checkpoint."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import step_lightning
from step_lightning.core import ConfigError
from step_lightning.data.transforms import EvalTransform
from step_lightning.lit.checkpoint import load_module
from step_lightning.models.engine import InferenceOptions
from step_lightning.models.inference import infer


def rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_import_stays_light():
    code = "import sys, step_lightning; print('torch' in sys.modules, callable(step_lightning.load))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]


def test_loaded_model_carries_its_dataset_and_protocol(tiny_checkpoint):
    model = step_lightning.load(tiny_checkpoint("segvit"), device="cpu")
    assert not model.model.training and model.device == torch.device("cpu")
    assert model.dataset == "synthetic" and model.num_classes == 8
    assert model.class_names[:2] == ["sky", "ground"] and model.palette[0] == [128, 180, 235]
    assert model.mean == (123.675, 116.28, 103.53) and model.eval_scale == (2048, 64)
    assert (model.mode, model.crop, model.stride) == ("whole", 64, 42)
    assert step_lightning.load(tiny_checkpoint("segvit_slide")).mode == "slide"


def test_every_input_kind_gives_the_same_labels_at_the_input_size(tiny_checkpoint, tmp_path):
    model = step_lightning.load(tiny_checkpoint("dcts"))
    image = rgb(50, 70)  # not multiples of 16
    path = tmp_path / "image.png"
    Image.fromarray(image).save(path)
    expected = model.predict(image)
    assert expected.shape == (50, 70) and expected.dtype == torch.int64
    assert int(expected.max()) < model.num_classes
    assert torch.equal(model.predict(str(path)), expected)
    assert torch.equal(model.predict(path), expected)
    assert torch.equal(model.predict(Image.open(path)), expected)
    batch = model.predict([image, rgb(40, 40, seed=1), image], batch_size=2)
    assert [tuple(b.shape) for b in batch] == [(50, 70), (40, 40), (50, 70)]
    assert torch.equal(batch[0], expected) and torch.equal(batch[2], expected)
    tensor = model.normalise(np.stack([image, image]))
    assert torch.equal(model.predict(tensor), torch.stack([expected, expected]))


def test_resize_follows_the_evaluation_transform(tiny_checkpoint):
    """The model input is the eval transform's size (short side = training crop, long side at most 2048) and,
    where no resize is needed, predict is exactly eval's inference."""
    model = step_lightning.load(tiny_checkpoint("segvit"))
    for height, width in [(50, 70), (120, 64), (33, 200), (20, 1000)]:  # 20x1000: the 2048 px long side binds
        resized, _ = EvalTransform(64, model.mean, model.std)(rgb(height, width), np.zeros((height, width)))
        assert model.model_size(height, width) == resized.shape[:2]
    image = rgb(64, 96)
    x = model.normalise(image[None])
    scores, _ = infer(model.model, x, (64, 96), "whole")
    assert torch.equal(model.predict(image), scores.argmax(1)[0])
    assert model.predict(rgb(48, 80), resize=False).shape == (48, 80)


def test_slide_mode_and_options(tiny_checkpoint):
    model = step_lightning.load(tiny_checkpoint("segvit_slide"))
    image = rgb(64, 160)
    x = model.normalise(image[None])
    scores, _ = infer(model.model, x, (64, 160), "slide", crop=64, stride=42)
    assert torch.equal(model.predict(image), scores.argmax(1)[0])
    out = model.predict(image, mode="whole", return_scores=True)
    assert out.scores.shape == (8, 64, 160) and torch.equal(out.scores.argmax(0), out.labels)
    with pytest.raises(ConfigError, match="mode='whole'"):
        model.predict(image, return_tokens=True)
    with pytest.raises(ConfigError, match="mode=tiles must be"):
        model.predict(image, mode="tiles")


def test_token_layout_and_halting_maps(tiny_checkpoint):
    model = step_lightning.load(tiny_checkpoint("step"))
    out = model.predict(rgb(70, 90), return_tokens=True, return_halting=True)
    assert out.token_map.shape == out.halt_map.shape == (70, 90) and out.scores is None
    # the exit halts half of the tokens (an untrained one would halt none)
    model = step_lightning.load(tiny_checkpoint("step"), options=InferenceOptions(force_halt=0.5))
    image = rgb(128, 128, seed=3)  # without resizing, the maps are the model's own
    out = model.predict(image, resize=False, return_tokens=True, return_halting=True)
    forward = model.model(model.normalise(image[None]), options=model.options)
    assert len(out.token_map.unique()) == int(forward.tokens[0])
    assert set(out.halt_map.unique().tolist()) == {-1, 0}  # halted by exit head 0, or reached the final head
    halted_tokens = out.token_map[out.halt_map == 0].unique()
    assert len(halted_tokens) == int(forward.extras["halted"][0, 0]) > 0
    with pytest.raises(ConfigError, match="exit heads"):
        step_lightning.load(tiny_checkpoint("segvit")).predict(image, return_halting=True)


def test_bad_inputs_and_devices(tiny_checkpoint):
    model = step_lightning.load(tiny_checkpoint("segvit"))
    with pytest.raises(ConfigError, match="HxWx3 uint8 array"):
        model.predict(np.zeros((10, 10), dtype=np.float32))
    with pytest.raises(ConfigError, match=r"normalised float batch \[B, 3, H, W\]"):
        model.predict(torch.zeros(3, 10, 10))
    with pytest.raises(ConfigError, match="is not a device"):
        step_lightning.load(tiny_checkpoint("segvit"), device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            step_lightning.load(tiny_checkpoint("segvit"), device="cuda")


def test_oracle_checkpoints_cannot_predict(tiny_checkpoint):
    with pytest.raises(ConfigError, match="policy=oracle"):
        step_lightning.load(tiny_checkpoint("dcts_oracle"))


def test_checkpoint_without_dataset_metadata(tiny_checkpoint, tmp_path):
    """Checkpoints written before the metadata was kept still load, with numbered classes."""
    checkpoint = torch.load(tiny_checkpoint("segvit"), weights_only=False)
    del checkpoint["hyper_parameters"]["dataset"]
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    model = step_lightning.load(old)
    assert model.class_names[0] == "class 0" and len(model.palette) == 8 and model.eval_scale == (2048, 64)
    assert torch.equal(model.predict(rgb(30, 30)), step_lightning.load(tiny_checkpoint("segvit")).predict(rgb(30, 30)))
    assert load_module(old).hparams.dataset is None


def test_precision_follows_the_device(tiny_checkpoint):
    from step_lightning.api.predictor import autocast_dtype

    assert autocast_dtype("auto", torch.device("cpu")) == torch.float32
    assert autocast_dtype("fp16", torch.device("cpu")) == torch.float16
    with pytest.raises(ConfigError, match="precision=half"):
        autocast_dtype("half", torch.device("cpu"))
    model = step_lightning.load(tiny_checkpoint("segvit"), device="cpu", precision="bf16")  # CPU autocast runs too
    image = rgb(64, 64)
    labels = model.predict(image)
    assert labels.shape == (64, 64)
    assert (labels == step_lightning.load(tiny_checkpoint("segvit"), device="cpu").predict(image)).float().mean() > 0.9


def test_checkpoint_with_the_short_side_only(tiny_checkpoint, tmp_path):
    """Checkpoints that kept only the short side of the test resize get mmseg's (2048, short side) scale."""
    checkpoint = torch.load(tiny_checkpoint("segvit"), weights_only=False)
    dataset = checkpoint["hyper_parameters"]["dataset"]
    dataset["short_side"] = dataset.pop("eval_scale")[1]
    old = tmp_path / "short_side.ckpt"
    torch.save(checkpoint, old)
    model = step_lightning.load(old)
    assert model.eval_scale == (2048, 64) and model.model_size(20, 1000) == (41, 2048)
