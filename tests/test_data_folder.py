"""data=folder: a user's own mmseg-layout dataset configured without code (tiny tmp datasets)."""

import json

import numpy as np
import pytest
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from step_lightning.check_data import check_from_config
from step_lightning.core import ConfigError
from step_lightning.data.folder import FolderDataModule, default_palette
from tests.data_builders import SIZE, make_folder, random_label, write_label
from tests.helpers import CONF_DIR, TINY_RUN, compose_config, run_module, run_train

CROP = 32


def raw(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def folder(root, **kwargs) -> FolderDataModule:
    return FolderDataModule(root, **{"num_classes": 3, "crop_size": CROP, **kwargs})


def test_config_composes_with_the_keys_of_the_other_data_configs(tmp_path):
    root = make_folder(tmp_path)
    cfg = compose_config(["data=folder", f"data.root={root}", "data.num_classes=3", "crop_size=64"])
    ade = OmegaConf.load(CONF_DIR / "data" / "ade20k.yaml")
    assert set(ade.data) <= set(cfg.data) and set(ade.eval) <= set(cfg.eval)
    assert cfg.eval.mode == "slide" and cfg.eval.stride == 42
    dm = instantiate(cfg.data)
    assert type(dm) is FolderDataModule and dm.name == "folder" and dm.num_classes == 3
    assert dm.root == root and dm.crop_size == 64
    assert dm.mean == tuple(cfg.backbone.mean) and dm.seed == cfg.seed and dm.ignore_index == 255
    assert dm.class_names == ("class_0", "class_1", "class_2") and len(dm.palette) == 3


def test_finds_pairs_and_keeps_class_indices(tmp_path):
    root = make_folder(tmp_path, {"training": 4, "validation": 2})
    label = random_label([0, 1, 2, 255], seed=9)
    write_label(root / "annotations" / "validation" / "img_1.png", label)
    dm = folder(root, batch_size=2)
    dm.setup()
    assert [s.name for s in dm.train_set.samples] == ["img_0", "img_1", "img_2", "img_3"]
    assert [s.name for s in dm.val_set.samples] == ["img_0", "img_1"]
    np.testing.assert_array_equal(dm.val_set[1]["label"].numpy(), label)  # 0..2 as they are, 255 ignored
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, CROP, CROP) and set(batch["label"].unique().tolist()) <= {0, 1, 2, 255}


def test_reduce_zero_label(tmp_path):
    root = make_folder(tmp_path, {"training": 1, "validation": 1}, values=(0, 1, 2, 3, 255))
    dm = folder(root, reduce_zero_label=True)
    dm.setup("validate")
    label = raw(dm.val_set.samples[0].label).astype(np.int64)
    expected = np.where((label == 0) | (label == 255), 255, label - 1)
    np.testing.assert_array_equal(dm.val_set[0]["label"].numpy(), expected)
    assert {0, 255} <= set(label.ravel().tolist()) and set(np.unique(expected).tolist()) == {0, 1, 2, 255}


def test_ignore_index_names_the_unlabeled_value(tmp_path):
    root = make_folder(tmp_path, {"training": 1, "validation": 1}, values=(0, 1, 7))
    dm = folder(root, num_classes=2, ignore_index=7)
    dm.setup("validate")
    label = raw(dm.val_set.samples[0].label)
    np.testing.assert_array_equal(dm.val_set[0]["label"].numpy(), np.where(label == 7, 255, label))
    assert dm.ignore_index == 255  # what the model sees, whatever the files use


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"num_classes": 3}, "3"),
        ({"num_classes": 2, "reduce_zero_label": True}, "3"),  # classes 1..2; 0 and 255 are ignored
        ({"num_classes": 4, "ignore_index": 9}, "255"),
    ],
)
def test_label_value_out_of_range_names_the_file(tmp_path, kwargs, bad):
    root = make_folder(tmp_path, {"training": 1, "validation": 1}, values=(0, 1, 2, 3, 255))
    dm = folder(root, **kwargs)
    dm.setup("validate")
    with pytest.raises(
        ConfigError, match=rf"validation/img_0\.png: label values {bad} are outside.*data.num_classes"
    ) as err:
        dm.val_set[0]
    assert "\n" not in str(err.value)


def write_classes(root, kind: str, names: list[str], palette: list | None = None):
    path = root / f"classes.{kind}"
    if kind == "txt":
        path.write_text("\n".join(names) + "\n\n")  # a trailing blank line is not a class
    else:
        content = {"classes": names, **({"palette": palette} if palette else {})}
        path.write_text(json.dumps(content) if kind == "json" else yaml.safe_dump(content))
    return path


@pytest.mark.parametrize("kind", ["txt", "json", "yaml", "yml"])
def test_class_names_from_a_file(tmp_path, kind):
    root = make_folder(tmp_path)
    path = write_classes(root, kind, ["sky", "road", "car"])
    dm = folder(root, classes_file=str(path))
    assert dm.class_names == ("sky", "road", "car") and dm.palette == default_palette(3)


def test_class_names_inline_and_relative_classes_file_and_count_from_names(tmp_path, monkeypatch):
    root = make_folder(tmp_path)
    assert folder(root, class_names=["sky", "road", "car"]).class_names == ("sky", "road", "car")
    write_classes(root, "txt", ["sky", "road", "car", "tree"])
    monkeypatch.chdir(tmp_path)  # classes.txt is not in the working directory: found in data.root
    dm = FolderDataModule(root, classes_file="classes.txt")
    assert dm.num_classes == 4 and dm.class_names[-1] == "tree" and len(dm.palette) == 4


def test_palette_inline_or_from_the_classes_file(tmp_path):
    root = make_folder(tmp_path)
    colours = [[0, 0, 0], [255, 0, 0], [0, 128, 255]]
    assert folder(root, palette=colours).palette == ((0, 0, 0), (255, 0, 0), (0, 128, 255))
    for kind in ("json", "yaml"):
        path = write_classes(root, kind, ["a", "b", "c"], palette=colours)
        assert folder(root, classes_file=str(path)).palette == ((0, 0, 0), (255, 0, 0), (0, 128, 255))


def test_default_palette_is_deterministic_and_mmseg_s(tmp_path):
    assert default_palette(3) == ((102, 179, 92), (14, 106, 71), (188, 20, 102))  # numpy seed 42, as mmseg
    assert default_palette(40)[:3] == default_palette(3) and len(default_palette(40)) == 40
    root = make_folder(tmp_path)
    assert folder(root, num_classes=5).palette == folder(root, num_classes=5).palette == default_palette(5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"class_names": ["a", "b"]}, r"data.class_names has 2 class names but data.num_classes=3"),
        ({"class_names": ["a", "b", "a"]}, r"names a more than once"),
        ({"class_names": ["a", "", "c"]}, r"class 1 has an empty name"),
        ({"class_names": "a,b,c"}, r"data.class_names must be a list of class names"),
        ({"class_names": ["a", "b", "c"], "classes_file": "x.txt"}, r"class_names and data.classes_file are both"),
        ({"palette": [[0, 0, 0], [1, 1, 1]]}, r"data.palette has 2 colours but there are 3 classes"),
        ({"palette": [[0, 0, 0], [1, 1], [2, 2, 2]]}, r"data.palette\[1\]=\[1, 1\] is not a colour \[r, g, b\]"),
        ({"palette": [[0, 0, 0], [1, 1, 1], [2, 300, 2]]}, r"data.palette\[2\]=\[2, 300, 2\] is not a colour"),
        ({"num_classes": None}, r"data=folder needs data.num_classes="),
        ({"num_classes": 0}, r"data.num_classes=0 must be a whole number in 1..255"),
        ({"ignore_index": 1}, r"data.ignore_index=1 is the label value of class class_1"),
        ({"ignore_index": 3, "reduce_zero_label": True}, r"data.ignore_index=3 is the label value of class class_2"),
        ({"ignore_index": 256}, r"data.ignore_index=256 must be a label value in 0..255"),
    ],
)
def test_config_mistakes_are_one_line_errors(tmp_path, kwargs, message):
    root = make_folder(tmp_path, {"training": 1})
    with pytest.raises(ConfigError, match=message) as err:
        folder(root, **kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("classes.txt", "a\nb\n", r"classes.txt has 2 class names but data.num_classes=3"),
        ("classes.txt", b"\xff\xfe\x00bad", r"classes.txt cannot be read \(UnicodeDecodeError"),
        ("classes.json", '{"classes": ["a", "b", "c"', r"classes.json is not valid JSON"),
        ("classes.yaml", "classes: [a, b\npalette: x", r"classes.yaml is not valid YAML"),
        ("classes.yaml", "names: [a, b, c]\n", r"must hold a mapping with a 'classes' list"),
        ("classes.json", '["a", "b", "c"]', r"must hold a mapping with a 'classes' list"),
        ("classes.yaml", "classes: [a, b, c]\npallete: []\n", r"unknown keys \['pallete'\]"),
        ("classes.yaml", "classes: [a, b, c]\npalette: [[1, 2, 3]]\n", r"palette has 1 colours but there are 3"),
        ("classes.csv", "a,b,c", r"classes.csv must end in .txt, .json, .yaml, .yml"),
    ],
)
def test_classes_file_mistakes_name_the_file(tmp_path, name, content, message):
    root = make_folder(tmp_path, {"training": 1})
    path = root / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    with pytest.raises(ConfigError, match=message) as err:
        folder(root, classes_file=str(path))
    assert "\n" not in str(err.value)


def test_classes_file_missing_and_palette_given_twice(tmp_path):
    root = make_folder(tmp_path, {"training": 1})
    with pytest.raises(ConfigError, match=r"data.classes_file=nope.txt not found \(looked for nope.txt and .*mydata"):
        folder(root, classes_file="nope.txt")
    path = write_classes(root, "json", ["a", "b", "c"], palette=[[0, 0, 0]] * 3)
    with pytest.raises(ConfigError, match=r"data.palette and data.classes_file both give a palette"):
        folder(root, classes_file=str(path), palette=[[1, 1, 1]] * 3)


def test_root_and_layout_mistakes(tmp_path):
    with pytest.raises(ConfigError, match=r"data=folder needs data.root"):
        FolderDataModule(None, num_classes=3)
    with pytest.raises(ConfigError, match=r"data.root=.*nowhere does not exist"):
        folder(tmp_path / "nowhere").setup("fit")
    root = make_folder(tmp_path, label_dir="ann_dir")
    with pytest.raises(
        ConfigError, match=r"does not hold the data=folder layout.*\(missing: annotations\).*data.label_dir"
    ):
        folder(root).setup("fit")
    dm = folder(root, label_dir="ann_dir", train_split="train")
    with pytest.raises(
        ConfigError, match=r"split 'train' not found.*\['training', 'validation'\]; set data.train_split"
    ):
        dm.setup("fit")


def test_a_root_one_level_too_high_is_found(tmp_path):
    make_folder(tmp_path)
    with pytest.raises(ConfigError, match=r"Found it at .*mydata: set data.root="):
        folder(tmp_path).setup("fit")


def test_checker_passes_a_good_folder_and_fails_a_bad_label(tmp_path, capsys):
    root = make_folder(tmp_path)
    args = ["data=folder", f"data.root={root}", "data.num_classes=3", "data.class_names=[sky,road,car]", "threads=2"]
    assert check_from_config(compose_config(args, "check")) == 0
    out = capsys.readouterr().out
    assert "classes present (3/3): sky, road, car" in out and out.strip().endswith("ok images=6")
    write_label(root / "annotations" / "training" / "img_2.png", np.full(SIZE, 5, np.uint8))
    assert check_from_config(compose_config(args, "check")) == 1
    captured = capsys.readouterr()
    assert "img_2.png: label values 5 are outside" in captured.out and "FAILED: 1 problem(s)" in captured.err
    assert check_from_config(compose_config(["data=folder", f"data.root={root}"], "check")) == 2
    assert "data=folder needs data.num_classes" in capsys.readouterr().err


@pytest.mark.slow
def test_checker_command_line(tmp_path):
    root = make_folder(tmp_path)
    ok = run_module("step_lightning.check_data", ["data=folder", f"data.root={root}", "data.num_classes=3"], tmp_path)
    assert ok.returncode == 0 and ok.stdout.strip().endswith("ok images=6"), ok.stderr
    write_label(root / "annotations" / "validation" / "img_0.png", np.full(SIZE, 3, np.uint8))
    bad = run_module("step_lightning.check_data", ["data=folder", f"data.root={root}", "data.num_classes=3"], tmp_path)
    assert bad.returncode == 1 and "img_0.png: label values 3 are outside" in bad.stdout


def test_tiny_training_run(tmp_path):
    root = make_folder(tmp_path, {"training": 8, "validation": 2})
    run = [o for o in TINY_RUN if not o.startswith(("data.num_train=", "data.num_val="))]
    summary = run_train(
        run
        + [
            "data=folder",
            f"data.root={root}",
            "data.num_classes=3",
            "data.class_names=[sky,road,car]",
            "data.num_workers=0",
            "data.base_scale=[128,64]",
        ],
        tmp_path,
    )
    assert set(summary["per_class_IoU"]) == {"sky", "road", "car"} and 0 <= summary["mIoU"] <= 100
