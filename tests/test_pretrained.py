"""Model folders: ``step_lightning.save_pretrained`` / ``step-export format=hub`` write model.safetensors, config.json
and a model card; ``step_lightning.load`` reads the folder, a Hub repo id (from a Hugging Face cache written here,
offline) and the checkpoint alike; pushing goes through huggingface_hub's HfApi, faked here: nothing is sent."""

from __future__ import annotations

import json

import huggingface_hub
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file

import step_lightning
from step_lightning.api.pretrained import backbone_weights, model_card, save_pretrained
from step_lightning.core import ConfigError
from step_lightning.export import export
from step_lightning.lit.checkpoint import load_module
from step_lightning.models.model_folder import CONFIG_FILE, WEIGHTS_FILE
from step_lightning.predict import predict
from tests.data_builders import write_image
from tests.helpers import compose_config

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (50, 70, 3), dtype=np.uint8)


def predictions(model) -> list:
    return [model.predict(image(s), return_scores=True, return_tokens=True) for s in range(2)]


def assert_same(got: list, expected: list) -> None:
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a.labels, b.labels) and torch.equal(a.scores, b.scores)
        assert torch.equal(a.token_map, b.token_map)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache in tmp_path; ``hf_cache(repo_id, folder)`` stores a model folder as the Hub's
    snapshot of ``repo_id`` (the layout snapshot_download fills)."""
    cache = tmp_path / "hf_hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    def add(repo_id: str, folder) -> None:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        (repo / "snapshots" / COMMIT).mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(COMMIT)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            (repo / "snapshots" / COMMIT / name).write_bytes((folder / name).read_bytes())

    return add


def test_checkpoint_folder_and_hub_repo_id_predict_identically(tiny_checkpoint, tmp_path, hf_cache):
    """A STEP model (dCTS policy network, an exit head): labels, scores and token maps are equal bit for bit."""
    checkpoint = tiny_checkpoint("step")
    folder = save_pretrained(checkpoint, tmp_path / "step-tiny", summary=False)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in folder.iterdir())  # readable by whoever it is shared with
    expected = predictions(step_lightning.load(checkpoint, device="cpu"))
    assert_same(predictions(step_lightning.load(folder, device="cpu")), expected)
    hf_cache("step-org/step-tiny", folder)
    from_hub = step_lightning.load("step-org/step-tiny", device="cpu")
    assert from_hub.class_names == step_lightning.load(checkpoint).class_names
    assert_same(predictions(from_hub), expected)
    write_image(tmp_path / "photos" / "a.png", (50, 70))  # the command line takes the repo id too
    predict(compose_config(["ckpt_path=step-org/step-tiny", f"input={tmp_path / 'photos'}", "device=cpu",
                            f"output={tmp_path / 'out'}"], "predict"))
    labels = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    assert np.array_equal(labels, step_lightning.load(checkpoint).predict(tmp_path / "photos" / "a.png").numpy())


def test_the_folder_holds_every_weight_and_what_rebuilds_the_model(tiny_checkpoint, tmp_path):
    checkpoint = tiny_checkpoint("step")
    folder = save_pretrained(checkpoint, tmp_path / "model", summary=False)
    module = load_module(checkpoint)
    tensors = load_file(str(folder / WEIGHTS_FILE))
    assert tensors.keys() == module.model.state_dict().keys()
    assert any(k.startswith("tokenizer.policy.") for k in tensors)  # the policy network's weights
    assert all(torch.equal(tensors[k], v) for k, v in module.model.state_dict().items())
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert set(config) == {"step_lightning", "model", "inference", "dataset", "evaluation"}
    assert config["inference"] == {"tau": 5555} and "tau" not in config["model"]
    assert config["model"]["prune_heads"] == [1] and config["model"]["policy"] == "net"
    assert config["dataset"]["class_names"][0] == "sky" and config["evaluation"] == {"mode": "whole", "crop": 64,
                                                                                       "stride": 42}


def test_inference_options_change_without_retraining(tiny_checkpoint, tmp_path):
    folder = save_pretrained(tiny_checkpoint("dcts"), tmp_path / "dcts", summary=False)
    assert step_lightning.load(folder).model.tokenizer.thresholds == (0.5, 0.5, 0.5, 0.5)
    model = step_lightning.load(folder, tau=4999)
    assert model.model.tokenizer.thresholds == (0.4, 0.9, 0.9, 0.9) and model.spec["tau"] == 4999
    with pytest.raises(ConfigError, match="prune_threshold cannot change in a trained model; what can: tau"):
        step_lightning.load(folder, prune_threshold=0.5)
    with pytest.raises(ConfigError, match="tokenizer is patch"):
        step_lightning.load(tiny_checkpoint("segvit"), tau=6899)


def test_a_repo_id_neither_cached_nor_reachable_is_one_line(tmp_path, hf_cache):
    with pytest.raises(ConfigError, match="not a local file or folder, nor in the Hugging Face cache") as info:
        step_lightning.load("step-org/absent")
    assert "\n" not in str(info.value)


def test_folders_that_are_no_model_folders_are_refused(tiny_checkpoint, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / CONFIG_FILE).write_text('{"architectures": ["BertModel"]}')
    (tmp_path / "other" / WEIGHTS_FILE).write_bytes(b"")
    with pytest.raises(ConfigError, match="another library's config.json"):
        step_lightning.load(tmp_path / "other")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"holds other files than a model folder's \(todo.txt\)"):
        save_pretrained(tiny_checkpoint("segvit"), tmp_path / "notes", summary=False)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_an_existing_model_folder_is_replaced_whole(tiny_checkpoint, tmp_path):
    folder = save_pretrained(tiny_checkpoint("segvit"), tmp_path / "model", summary=False)
    save_pretrained(tiny_checkpoint("dcts"), folder, summary=False)
    assert json.loads((folder / CONFIG_FILE).read_text())["model"]["tokenizer"] == "dcts"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no partial or previous copy left


# --- the model card -------------------------------------------------------------------------------------------------


def test_the_card_reports_the_run_from_its_summary(tiny_run, tmp_path):
    """The run folder exports the checkpoint its summary.json measured; the card holds its figures."""
    summary = tiny_run["summary"]
    folder = save_pretrained(tiny_run["output_dir"], tmp_path / "segvit-tiny", repo_id="step-org/segvit-tiny")
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "step-lightning" and card.data.pipeline_tag == "image-segmentation"
    (result,) = card.data.eval_results
    assert result.metric_type == "mean_iou" and result.metric_value == round(summary["mIoU"], 2)
    text = card.text
    assert "# SegViT vit_t on synthetic" in text
    assert f"| mIoU | {summary['mIoU']:.2f} (aAcc {summary['aAcc']:.2f}) |" in text
    assert f"| GFLOPs | {summary['gflops']:.4g} per forward" in text
    assert f"| Tokens per image | {summary['tokens_per_image']:.1f} " in text
    assert f"| Training steps | {summary['steps']} |" in text
    assert "initialised from nothing (trained from scratch)" in text and "Halted fraction" not in text
    assert 'step_lightning.load("step-org/segvit-tiny")' in text and "doi       = {10.5220/0013132800003912}" in text


def test_a_summary_of_another_checkpoint_is_refused(tiny_run, tmp_path):
    """summary.json measures the final weights (last.ckpt); the best checkpoint's figures are not those."""
    assert tiny_run["summary"]["checkpoint"].endswith("last.ckpt")
    (best,) = (tiny_run["output_dir"] / "checkpoints").glob("step*.ckpt")
    with pytest.raises(ConfigError, match=f"measures last.ckpt, not {best.name}"):
        save_pretrained(best, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    assert "No run summary" in (save_pretrained(best, tmp_path / "m", summary=False) / "README.md").read_text()


def test_the_card_tables_accuracy_against_cost_over_phases_and_names_the_backbone_license(tiny_checkpoint):
    """DToP's recipe (halting off, then fine-tuned with halting) gives a run two points of accuracy and cost."""
    config = {"model": {"backbone": "vit_b", "depth": None, "img_size": 512, "tokenizer": "patch",
                        "prune_heads": [6, 8], "prune_threshold": 0.9},
              "inference": {"tau": None}, "evaluation": {"mode": "slide", "crop": 512, "stride": 341},
              "dataset": {"name": "ade20k", "class_names": ["wall"] * 150, "eval_scale": [2048, 512]}}

    def figures(miou, gflops, halted):
        return {"mIoU": miou, "gflops": gflops, "tokens_per_image": 1024.0,
                "exit_stats": {"halted_fraction": halted}, "token_stats": {"reduction": 1.0}}

    summary = {**figures(48.2, 88.5, 0.31), "method": "dtop", "steps": 160000,
               "phases": {"no_halting": figures(49.0, 105.3, 0.0)},
               "config": {"model": {"pretrained": "vit_base_patch16_384.augreg_in21k_ft_in1k"}}}
    text = model_card(config, summary, "step-org/dtop")
    assert "# DToP vit_b on ADE20K" in text and "sliding windows of 512 px, stride 341" in text
    assert "| no_halting | 49.00 | 105.3 | 1024.0 | 0.000 |" in text
    assert "| final | 48.20 | 88.5 | 1024.0 | 0.310 |" in text
    assert "license: apache-2.0" in text and "| Halted fraction | 0.310 |" in text
    assert "initialised from timm's `vit_base_patch16_384.augreg_in21k_ft_in1k`, released under apache-2.0" in text
    assert backbone_weights(summary) == ("timm's `vit_base_patch16_384.augreg_in21k_ft_in1k`", "apache-2.0")
    assert backbone_weights({"config": {"model": {"pretrained": "/data/vit.pth"}}}) == (
        "`vit.pth` (a local file; its license is not recorded)", "unknown")


# --- the command and the push -----------------------------------------------------------------------------------------


def test_export_format_hub_writes_the_folder_beside_the_checkpoint(tiny_checkpoint, capsys):
    checkpoint = tiny_checkpoint("cts")
    folder = export(compose_config([f"ckpt_path={checkpoint}", "format=hub", "summary=false"], "export"))
    assert folder == checkpoint.with_suffix("") and (folder / WEIGHTS_FILE).is_file()
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2:] == ["export: the model folder computes the checkpoint's class scores exactly (random batch)",
                          f"export: {folder}"]


@pytest.fixture
def fake_hub(monkeypatch):
    """Online mode with HfApi's create_repo / upload_folder replaced: the calls are recorded, nothing is sent."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/{COMMIT}",
                                          commit_message=kwargs["commit_message"], commit_description="",
                                          oid=COMMIT)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def test_push_creates_the_repo_and_uploads_the_folder_in_one_commit(tiny_checkpoint, tmp_path, fake_hub, capsys):
    output = tmp_path / "segvit-tiny"
    export(compose_config([f"ckpt_path={tiny_checkpoint('segvit')}", "format=hub", "summary=false",
                           f"output={output}", "push_to=step-org/segvit-tiny", "private=true"], "export"))
    assert [(name, repo) for name, repo, _ in fake_hub] == [("create_repo", "step-org/segvit-tiny"),
                                                            ("upload_folder", "step-org/segvit-tiny")]
    assert fake_hub[0][2] == {"repo_type": "model", "private": True, "exist_ok": True}
    upload = fake_hub[1][2]
    assert upload["folder_path"] == str(output) and upload["repo_type"] == "model"
    assert capsys.readouterr().out.strip().splitlines()[-2] == (
        f"export: pushed to https://huggingface.co/step-org/segvit-tiny/commit/{COMMIT}")
    assert 'step_lightning.load("step-org/segvit-tiny")' in (output / "README.md").read_text()


def test_push_offline_is_one_line_and_keeps_the_folder(tiny_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE=1 forbids uploads"):
        export(compose_config([f"ckpt_path={tiny_checkpoint('segvit')}", "format=hub", "summary=false",
                               f"output={tmp_path / 'm'}", "push_to=step-org/m"], "export"))
    assert (tmp_path / "m" / WEIGHTS_FILE).is_file()
