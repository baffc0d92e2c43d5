"""``python -m step_lightning.predict``: label maps, overlays and panels for a folder, a glob or one image (the
command line itself: tests/test_package_install.py runs the installed step-predict)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import step_lightning
from step_lightning.api.images import label_image, output_stems
from step_lightning.core import ConfigError
from step_lightning.predict import predict
from tests.data_builders import write_image
from tests.helpers import compose_config


def predict_cfg(checkpoint, source, output, *overrides):
    return compose_config([f"ckpt_path={checkpoint}", f"input={source}", f"output={output}", *overrides], "predict")


@pytest.fixture
def photos(tmp_path):
    """Three images of two sizes (one in a sub-folder), a corrupt one and a text file."""
    folder = tmp_path / "photos"
    write_image(folder / "a.jpg", (50, 70), seed=1)
    write_image(folder / "b.png", (50, 70), seed=2)
    write_image(folder / "street" / "c.png", (40, 96), seed=3)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_folder_is_segmented_at_each_image_resolution(tiny_checkpoint, photos, tmp_path, capsys):
    output = tmp_path / "out"
    result = predict(predict_cfg(tiny_checkpoint("dcts"), photos, output, "batch_size=2"))
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == f"predict: 3 images written to {output}, 1 skipped"
    assert f"warning: {photos / 'broken.jpg'} is not a readable image" in captured.err
    assert result["written"] == 3 and result["skipped"] == [str(photos / "broken.jpg")]
    model = step_lightning.load(tiny_checkpoint("dcts"))
    for name, size in [("a", (70, 50)), ("b", (70, 50)), ("street/c", (96, 40))]:
        labels = Image.open(output / f"{name}.png")
        assert labels.mode == "P" and labels.size == size
        assert labels.getpalette()[:6] == [128, 180, 235, 110, 85, 50]  # the dataset's sky, ground colours
        source = photos / (f"{name}.jpg" if name == "a" else f"{name}.png")
        assert torch.equal(torch.from_numpy(np.array(labels)).long(), model.predict(source))
        assert Image.open(output / f"{name}_overlay.png").size == size
    assert not list(output.rglob("*_tokens.png"))


def test_glob_single_image_panels_and_slide(tiny_checkpoint, photos, tmp_path, capsys):
    predict(predict_cfg(tiny_checkpoint("step"), f"'{photos}/**/*.png'", tmp_path / "glob", "panels=true",
                        "mode=slide"))
    assert sorted(p.name for p in (tmp_path / "glob").rglob("*.png")) == [
        "b.png", "b_overlay.png", "b_tokens.png", "c.png", "c_overlay.png", "c_tokens.png"]
    assert (tmp_path / "glob" / "street" / "c_tokens.png").is_file()  # names keep the sub-folders
    predict(predict_cfg(tiny_checkpoint("segvit"), photos / "a.jpg", tmp_path / "one"))
    assert capsys.readouterr().out.strip().endswith(f"1 images written to {tmp_path / 'one'}, 0 skipped")
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["a.png", "a_overlay.png"]


def test_output_inside_the_input_folder_is_not_read_back(tiny_checkpoint, photos):
    for _ in range(2):
        assert predict(predict_cfg(tiny_checkpoint("segvit"), photos, photos / "pred"))["written"] == 3


def test_mistakes_are_one_line_errors(tiny_checkpoint, photos, tmp_path):
    with pytest.raises(ConfigError, match="input is required"):
        predict(compose_config([f"ckpt_path={tiny_checkpoint('segvit')}"], "predict"))
    with pytest.raises(ConfigError, match="ckpt_path is required"):
        predict(compose_config([f"input={photos}"], "predict"))
    with pytest.raises(ConfigError, match="names no image files"):
        predict(predict_cfg(tiny_checkpoint("segvit"), tmp_path / "nothing*.png", tmp_path / "out"))
    with pytest.raises(ConfigError, match="would overwrite input images"):
        predict(predict_cfg(tiny_checkpoint("segvit"), photos / "b.png", photos))
    with pytest.raises(ConfigError, match="policy=oracle"):
        predict(predict_cfg(tiny_checkpoint("dcts_oracle"), photos, tmp_path / "out"))


def test_output_names_and_label_files():
    files = [Path("/p/a.jpg"), Path("/p/a.png"), Path("/p/x/b.jpg")]
    assert output_stems(files, Path("/p")) == [Path("a_jpg"), Path("a_png"), Path("x/b")]
    labels = torch.tensor([[0, 1], [299, 2]])
    wide = label_image(labels, [[k, k, k] for k in range(300)])
    assert wide.mode == "I;16" and np.asarray(wide).tolist() == [[0, 1], [299, 2]]
