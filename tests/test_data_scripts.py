"""scripts/prepare_cocostuff10k.py and scripts/cityscapes_trainids.py on tiny fake inputs."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from step_lightning.data.cocostuff import CocoStuff10kDataModule
from tests.data_builders import make_cityscapes, random_label, write_image

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prepare = load_script("prepare_cocostuff10k")
trainids = load_script("cityscapes_trainids")


def fake_release(base: Path, train: list[str], test: list[str]) -> Path:
    """cocostuff-10k-v1.1 layout: images/*.jpg, annotations/*.mat (key S), imageLists/{train,test}.txt."""
    release = base / "cocostuff-10k-v1.1"
    (release / "annotations").mkdir(parents=True)
    (release / "imageLists").mkdir()
    for key, names in (("train", train), ("test", test)):
        (release / "imageLists" / f"{key}.txt").write_text("".join(f"{n}\n" for n in names))
        for i, name in enumerate(names):
            write_image(release / "images" / f"{name}.jpg", (6, 8), seed=i)
            savemat(release / "annotations" / f"{name}.mat", {"S": random_label(np.arange(183), i, (6, 8))})
    return release


def test_prepare_cocostuff10k_writes_mmseg_layout(tmp_path, capsys):
    release = fake_release(tmp_path, ["COCO_train2014_000000000077", "COCO_train2014_000000000078"], ["COCO_x"])
    hand = np.array([[0, 1, 11, 13, 92, 182, 12, 66]], np.uint8).repeat(6, 0)
    savemat(release / "annotations" / "COCO_x.mat", {"S": hand})
    out = tmp_path / "coco_stuff10k"
    assert prepare.main([str(release), str(out)]) == 0
    assert "wrote 2 pairs to" in capsys.readouterr().out
    label = np.asarray(Image.open(out / "annotations" / "test2014" / "COCO_x_labelTrainIds.png"))
    # mmseg: 0->0, 1->1, 11->11, 13->12, 92->81, 182->171; unused ids 12, 66 carry no class (0)
    assert label[0].tolist() == [0, 1, 11, 12, 81, 171, 0, 0]
    assert (out / "images" / "train2014" / "COCO_train2014_000000000077.jpg").is_file()
    dm = CocoStuff10kDataModule(out, crop_size=16)
    dm.setup()
    assert len(dm.train_set) == 2 and dm.val_set[0]["label"][0].tolist() == [255, 0, 10, 11, 80, 170, 255, 255]


def test_prepare_cocostuff10k_refuses_wrong_folders(tmp_path, capsys):
    assert prepare.main([str(tmp_path), str(tmp_path / "out")]) == 2
    assert "is not the cocostuff-10k-v1.1 release: missing" in capsys.readouterr().err
    release = fake_release(tmp_path, ["a"], ["b"])
    assert prepare.main([str(tmp_path), str(tmp_path / "out")]) == 2
    assert f"The release seems to be in {release}" in capsys.readouterr().err
    (release / "annotations" / "b.mat").unlink()
    assert prepare.main([str(release), str(tmp_path / "out")]) == 2
    assert "1 file(s) listed in" in capsys.readouterr().err
    (tmp_path / "done" / "images" / "train2014").mkdir(parents=True)
    assert prepare.main([str(tmp_path / "done"), str(tmp_path / "out")]) == 2
    assert "already in the converted layout" in capsys.readouterr().err


def test_prepare_cocostuff10k_rejects_bad_mat(tmp_path, capsys):
    release = fake_release(tmp_path, ["a"], ["b"])
    savemat(release / "annotations" / "b.mat", {"T": np.zeros((6, 8), np.uint8)})
    assert prepare.main([str(release), str(tmp_path / "out")]) == 2
    assert "no label map under key 'S'" in capsys.readouterr().err
    savemat(release / "annotations" / "b.mat", {"S": np.full((6, 8), 200, np.uint8)})
    assert prepare.main([str(release), str(tmp_path / "out")]) == 2
    assert "label values 200 are outside" in capsys.readouterr().err


def test_cityscapes_trainids_script(tmp_path, capsys):
    root = make_cityscapes(tmp_path, kinds=("labelIds",))
    assert trainids.main([str(root)]) == 0
    assert "wrote 6 *_gtFine_labelTrainIds.png" in capsys.readouterr().out
    gt = root / "gtFine" / "train" / "aachen"
    ids = np.asarray(Image.open(gt / "aachen_000000_000019_gtFine_labelIds.png"))
    out = np.asarray(Image.open(gt / "aachen_000000_000019_gtFine_labelTrainIds.png"))
    assert out[ids == 7].tolist() == [0] * int((ids == 7).sum()) and (out[ids == 26] == 13).all()
    assert (out[ids == 0] == 255).all() and (out[ids == 9] == 255).all()
    assert trainids.main([str(root)]) == 0
    assert "wrote 0" in (text := capsys.readouterr().out) and "kept 6 existing" in text


@pytest.mark.parametrize("where", ["above", "missing"])
def test_cityscapes_trainids_script_refuses_wrong_root(tmp_path, capsys, where):
    root = make_cityscapes(tmp_path / "data", kinds=("labelIds",))
    target = tmp_path / "data" if where == "above" else tmp_path / "nope"
    assert trainids.main([str(target)]) == 2
    err = capsys.readouterr().err
    assert "has no gtFine folder" in err
    if where == "above":
        assert f"Found it at {root}" in err
