"""Named pretrained weights: every source arrives exactly, the position grid is resampled once, errors are one line.

The source is a random ViT-Ti/16 at 384 px (24x24 position grid plus class slot); the encoder is a 2-block vit_t
at 64 px (4x4 grid). Every file is written here; the timm-tag path reads a Hugging Face cache built in tmp_path,
offline.
"""

from __future__ import annotations

import huggingface_hub.constants
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from step_lightning.config.model import model_spec
from step_lightning.core import ConfigError
from step_lightning.models.factory import build_encoder
from step_lightning.models.vit import ViTEncoder
from step_lightning.tokens.policy import PolicyNet

TAG = "vit_tiny_patch16_384.augreg_in21k_ft_in1k"
LITE0_TAG = "efficientnet_lite0.ra_in1k"
SIZE, DEPTH, HEADS = 64, 2, 3
COMMIT = "0123456789abcdef0123456789abcdef01234567"
BLOCK_KEYS = [
    f"blocks.1.{name}"
    for name in (
        "norm1.weight",
        "norm1.bias",
        "attn.qkv.weight",
        "attn.qkv.bias",
        "attn.proj.weight",
        "attn.proj.bias",
        "norm2.weight",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
    )
]


def random_state(model_name: str, **kwargs) -> dict[str, torch.Tensor]:
    """A timm model's state dict with every tensor random (norms too), so equality means the tensor arrived."""
    gen = torch.Generator().manual_seed(0)
    state = timm.create_model(model_name, pretrained=False, **kwargs).state_dict()
    return {k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in state.items()}


@pytest.fixture(scope="module")
def src() -> dict[str, torch.Tensor]:
    return random_state("vit_tiny_patch16_384")


def encoder(pretrained=None, **kwargs) -> ViTEncoder:
    return ViTEncoder("vit_t", img_size=SIZE, drop_path_rate=0.0, depth=DEPTH, pretrained=pretrained, **kwargs)


def grid_resample(pos: torch.Tensor, *sizes: int) -> torch.Tensor:
    """Bicubic resamples of a [1, 1 + 24*24, C] table (class slot dropped) through each size in turn."""
    grid = pos[:, 1:].reshape(1, 24, 24, -1).permute(0, 3, 1, 2)
    for size in sizes:
        grid = F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)
    return grid.flatten(2).transpose(1, 2)


def assert_arrived(enc: ViTEncoder, src: dict[str, torch.Tensor]) -> None:
    state = enc.state_dict()
    assert len(enc.blocks) == DEPTH
    for key in ["patch_embed.proj.weight", "patch_embed.proj.bias", *BLOCK_KEYS]:
        assert torch.equal(state[key], src[key]), key
    assert torch.equal(enc.pos_embed, grid_resample(src["pos_embed"], SIZE // 16))
    # the old loader went through timm's 224 px model first: 24 -> 14 -> 4
    assert not torch.allclose(enc.pos_embed, grid_resample(src["pos_embed"], 14, SIZE // 16), atol=1e-3)


def one_line_error(match: str, make) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        make()
    assert "\n" not in str(info.value)
    return str(info.value)


# --- writers of the foreign formats -------------------------------------------------------------------------------


def write_npz(path, src, big_vision: bool = False) -> None:
    """Inverse of timm's ``_load_weights``: the AugReg layout (``Transformer/encoderblock_<i>/...``) or big_vision's
    (``params/`` prefix, blocks stacked along a leading axis, other module indices)."""
    width = src["patch_embed.proj.weight"].shape[0]
    pre = "params/" if big_vision else ""
    mha, mlp, ln2 = ("MultiHeadDotProductAttention_0", "MlpBlock_0", "LayerNorm_1") if big_vision else (
        "MultiHeadDotProductAttention_1", "MlpBlock_3", "LayerNorm_2")  # fmt: skip
    out = {
        f"{pre}embedding/kernel": src["patch_embed.proj.weight"].permute(2, 3, 1, 0),
        f"{pre}embedding/bias": src["patch_embed.proj.bias"],
        f"{pre}cls": src["cls_token"],
        f"{pre}pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding": src["pos_embed"],
        f"{pre}Transformer/encoder_norm/scale": src["norm.weight"],
        f"{pre}Transformer/encoder_norm/bias": src["norm.bias"],
    }
    blocks = []
    for i in range(1 + max(int(k.split(".")[1]) for k in src if k.startswith("blocks."))):
        b = f"blocks.{i}."
        qkv_w, qkv_b = src[b + "attn.qkv.weight"].chunk(3), src[b + "attn.qkv.bias"].chunk(3)
        block = {
            "LayerNorm_0/scale": src[b + "norm1.weight"],
            "LayerNorm_0/bias": src[b + "norm1.bias"],
            f"{ln2}/scale": src[b + "norm2.weight"],
            f"{ln2}/bias": src[b + "norm2.bias"],
            f"{mha}/out/kernel": src[b + "attn.proj.weight"].reshape(width, HEADS, -1).permute(1, 2, 0),
            f"{mha}/out/bias": src[b + "attn.proj.bias"],
            f"{mlp}/Dense_0/kernel": src[b + "mlp.fc1.weight"].T,
            f"{mlp}/Dense_0/bias": src[b + "mlp.fc1.bias"],
            f"{mlp}/Dense_1/kernel": src[b + "mlp.fc2.weight"].T,
            f"{mlp}/Dense_1/bias": src[b + "mlp.fc2.bias"],
        }
        for name, w, bias in zip(("query", "key", "value"), qkv_w, qkv_b, strict=True):
            block[f"{mha}/{name}/kernel"] = w.T.reshape(width, HEADS, -1)
            block[f"{mha}/{name}/bias"] = bias.reshape(HEADS, -1)
        blocks.append(block)
    if big_vision:
        out.update({f"{pre}Transformer/encoderblock/{k}": torch.stack([b[k] for b in blocks]) for k in blocks[0]})
    else:
        out.update({f"Transformer/encoderblock_{i}/{k}": v for i, b in enumerate(blocks) for k, v in b.items()})
    np.savez(path, **{k: np.ascontiguousarray(v.numpy()) for k, v in out.items()})


def to_mmseg(src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmseg's tools/model_converters/vit2mmseg.py renaming (timm -> mmseg), which SegViT / DToP checkpoints carry."""
    out = {}
    for key, value in src.items():
        if key.startswith("head"):
            continue
        if key.startswith("norm"):
            key = key.replace("norm.", "ln1.")
        elif key.startswith("patch_embed"):
            key = key.replace("proj", "projection")
        elif key.startswith("blocks"):
            for old, new in (("norm", "ln"), ("mlp.fc1", "ffn.layers.0.0"), ("mlp.fc2", "ffn.layers.1"),
                             ("attn.qkv.", "attn.attn.in_proj_"), ("attn.proj", "attn.attn.out_proj")):  # fmt: skip
                key = key.replace(old, new)
            key = key.replace("blocks.", "layers.")
        out[key] = value
    return out


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty offline Hugging Face cache; ``hub(tag, state)`` stores a model.safetensors for timm's repo of the tag.

    huggingface_hub copies HF_HUB_CACHE / HF_HUB_OFFLINE into ``huggingface_hub.constants`` at import time and reads
    them from there at call time, so those are patched together with the environment.
    """
    cache = tmp_path / "hf_hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def add(tag: str, state: dict[str, torch.Tensor]) -> None:
        repo = cache / f"models--timm--{tag}"
        (repo / "snapshots" / COMMIT).mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(COMMIT)
        save_file({k: v.contiguous() for k, v in state.items()}, str(repo / "snapshots" / COMMIT / "model.safetensors"))

    return add


# --- every source arrives exactly ---------------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", ["plain.pth", "state_dict.bin", "model.pth", "file.safetensors"])
def test_timm_checkpoint_files(tmp_path, src, wrap):
    path = tmp_path / wrap
    if path.suffix == ".safetensors":
        save_file(src, str(path))
    else:
        torch.save(src if wrap.startswith("plain") else {path.stem: src, "epoch": 3}, path)
    assert_arrived(encoder(str(path)), src)


@pytest.mark.parametrize("big_vision", [False, True], ids=["augreg", "big_vision"])
def test_npz(tmp_path, src, big_vision):
    write_npz(tmp_path / "vit.npz", src, big_vision)
    assert_arrived(encoder(str(tmp_path / "vit.npz")), src)


def test_npz_writer_matches_timm(tmp_path, src):
    """The writer is timm's reader inverted: timm itself reads the file back to the source."""
    write_npz(tmp_path / "vit.npz", src)
    model = timm.create_model("vit_tiny_patch16_384", pretrained=False)
    model.load_pretrained(str(tmp_path / "vit.npz"))
    got = model.state_dict()
    assert all(torch.equal(got[k], src[k]) for k in src if not k.startswith("head")), "npz writer"


@pytest.mark.parametrize("segmentor", [False, True], ids=["pretrain_file", "segmentor_checkpoint"])
def test_mmseg_checkpoint(tmp_path, src, segmentor):
    state = to_mmseg(src)
    assert "layers.1.attn.attn.in_proj_weight" in state and "patch_embed.projection.weight" in state
    if segmentor:  # a SegViT / DToP training checkpoint: backbone prefix, heads, meta
        state = {f"backbone.{k}": v for k, v in state.items()} | {"decode_head.conv_seg.weight": torch.zeros(2)}
        state = {"meta": {"mmseg_version": "0.24.0", "iter": 160000}, "state_dict": state}
    torch.save(state, tmp_path / "mmseg.pth")
    assert_arrived(encoder(str(tmp_path / "mmseg.pth")), src)


def test_timm_tag_from_offline_hub_cache(hub, src):
    hub(TAG, src)
    assert_arrived(encoder(TAG), src)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_timm_tag_with_pretrained_file(hub, tmp_path, src, suffix):
    """The hub cache is empty: the weights can only come from the file, through timm's pretrained_cfg_overlay."""
    path = tmp_path / f"by_hand{suffix}"
    if suffix == ".npz":
        write_npz(path, src)
    else:
        save_file(src, str(path))
    assert_arrived(encoder(TAG, pretrained_file=str(path)), src)


def test_config_options_reach_the_encoder(compose_cfg, hub, tmp_path, src):
    save_file(src, str(tmp_path / "by_hand.safetensors"))
    overrides = ["method=segvit", "backbone=vit_t", f"backbone.depth={DEPTH}", f"crop_size={SIZE}",
                 f"backbone.pretrained={TAG}"]
    cfg = compose_cfg([*overrides, f"backbone.pretrained_file={tmp_path / 'by_hand.safetensors'}"])
    assert_arrived(build_encoder(model_spec(cfg, num_classes=3, ignore_index=255)), src)


@pytest.mark.parametrize("none", [None, "none", "None"])
def test_no_weights(none):
    torch.manual_seed(0)
    reference = encoder(None).state_dict()
    torch.manual_seed(0)
    state = encoder(none).state_dict()
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_policy_from_timm_tag(hub):
    weights = random_state("efficientnet_lite0")
    hub(LITE0_TAG, weights)
    backbone = PolicyNet(pretrained=LITE0_TAG).backbone.state_dict()
    assert len(backbone) > 200
    for key, value in backbone.items():
        assert torch.equal(value, weights[key]), key


# --- errors -------------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    message = one_line_error("does not exist", lambda: encoder(str(tmp_path / "vit.pth")))
    assert "timm tag" in message and "null" in message


def test_unknown_tag(hub):
    one_line_error(r"no timm pretrained tag; list them with timm.list_pretrained\('vit_tiny_patch16\*'\)",
                   lambda: encoder("vit_tiny_patch16_384.no_such_weights"))  # fmt: skip


def test_tag_not_cached_offline(hub):
    message = one_line_error("not in the Hugging Face cache", lambda: encoder(TAG))
    assert "backbone.pretrained_file=" in message


def test_tag_of_another_architecture_fails_before_downloading(hub):
    message = one_line_error("holds vit_small_patch16_384 weights, this model needs vit_tiny_patch16",
                             lambda: encoder("vit_small_patch16_384.augreg_in21k_ft_in1k"))  # fmt: skip
    assert "not in the Hugging Face cache" not in message
    one_line_error("needs efficientnet_lite0", lambda: PolicyNet(pretrained=TAG))


@pytest.mark.parametrize("fmt", [".pth", ".npz", "mmseg.pth"])
def test_checkpoint_of_another_architecture(tmp_path, fmt):
    small = random_state("vit_small_patch16_224", depth=3)  # width 384, depth 3
    path = tmp_path / f"vit_s{fmt}"
    if fmt == ".npz":
        write_npz(path, small)
    else:
        torch.save(to_mmseg(small) if fmt.startswith("mmseg") else small, path)
    one_line_error("ViT/16 of width 384 and depth 3, backbone=vit_t is a ViT/16 of width 192 and depth 12",
                   lambda: encoder(str(path)))  # fmt: skip


class Meta:
    """Stands for the objects training checkpoints pickle besides tensors (weights_only refuses them)."""


def test_unreadable_files(tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "cnn.pth")
    one_line_error("holds no ViT patch and position embedding", lambda: encoder(str(tmp_path / "cnn.pth")))
    torch.save({"state_dict": {}, "meta": Meta()}, tmp_path / "pickled.pth")
    one_line_error(r"weights_only=True\) \(objects besides tensors", lambda: encoder(str(tmp_path / "pickled.pth")))


def test_pretrained_file_errors(hub, tmp_path, src):
    one_line_error("does not exist", lambda: encoder(TAG, pretrained_file=str(tmp_path / "missing.safetensors")))
    small = str(tmp_path / "vit_s.safetensors")
    save_file(random_state("vit_small_patch16_384", depth=1), small)
    one_line_error(f"pretrained_file={small} does not hold {TAG} weights", lambda: encoder(TAG, pretrained_file=small))
    file = str(tmp_path / "w.safetensors")
    save_file(src, file)
    one_line_error("set backbone.pretrained=<that tag>", lambda: encoder(None, pretrained_file=file))
    one_line_error("set backbone.pretrained=<that tag>", lambda: encoder(file, pretrained_file=file))


# --- before a run: every weight source located, the Hub contacted once ---------------------------------------------


@pytest.fixture
def unreachable_hub(hub, monkeypatch):
    """Online mode (no HF_HUB_OFFLINE) with a Hub that does not answer; returns the list of contacts made."""
    import os

    from step_lightning.core import hub as hub_mod

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # restored after the test, whatever the code sets
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    contacts = []

    class NoAnswer:
        def head(self, url, timeout):
            contacts.append((url, timeout))
            raise ConnectionError(f"cannot resolve {url}")

    monkeypatch.setattr(hub_mod, "get_session", NoAnswer)
    yield contacts
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # offline for the processes this one starts (DDP ranks, workers)


def test_a_failed_first_contact_switches_to_offline_mode(unreachable_hub, hub, src):
    import time

    started = time.monotonic()
    one_line_error("not in the Hugging Face cache and cannot be downloaded", lambda: encoder(TAG))
    assert huggingface_hub.constants.HF_HUB_OFFLINE and len(unreachable_hub) == 1
    assert unreachable_hub[0][1] <= 5  # seconds: one short try
    hub(TAG, src)  # cached: read from the cache at once, without the minute of download retries
    assert_arrived(encoder(TAG), src)
    assert len(unreachable_hub) == 1 and time.monotonic() - started < 15


@pytest.mark.parametrize("missing", ["backbone", "policy"])
def test_missing_weights_stop_a_training_before_its_first_step(hub, tmp_path, monkeypatch, missing):
    """Offline with an empty cache: a run that would train its policy first, then need the backbone's weights,
    stops before any data or model is built, in seconds, naming the setting."""
    import time

    from step_lightning import train as train_mod
    from tests.helpers import TINY_STEP_RUN, compose_config

    monkeypatch.setattr(train_mod.hydra.utils, "instantiate", pytest.fail)
    weights = [f"backbone.pretrained={TAG}"] if missing == "backbone" else [f"policy_train.pretrained={LITE0_TAG}"]
    cfg = compose_config([*TINY_STEP_RUN, *weights], output_dir=tmp_path)
    started = time.monotonic()
    option = "backbone.pretrained" if missing == "backbone" else "policy_train.pretrained"
    one_line_error(f"{option}=.*: the weights are not in the Hugging Face cache", lambda: train_mod.train(cfg))
    assert time.monotonic() - started < 10


def test_a_pretrained_file_of_another_width_stops_a_training_before_its_first_step(tmp_path, monkeypatch):
    from step_lightning import train as train_mod
    from tests.helpers import TINY_STEP_RUN, compose_config

    torch.save(random_state("vit_small_patch16_224", depth=2), tmp_path / "vit_s.pth")
    monkeypatch.setattr(train_mod.hydra.utils, "instantiate", pytest.fail)
    cfg = compose_config([*TINY_STEP_RUN, f"backbone.pretrained={tmp_path / 'vit_s.pth'}"], output_dir=tmp_path)
    one_line_error("is a ViT/16 of width 384 and depth 2", lambda: train_mod.train(cfg))
