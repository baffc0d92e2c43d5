"""The real ADE20K / Cityscapes / COCO-Stuff samples of ../shared/realdata through training and evaluation
(read in place, skipped when absent)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from step_lightning.metrics import SegMetrics
from step_lightning.models.inference import infer
from tests.data_builders import REALDATA
from tests.helpers import compose_config

if not REALDATA.is_dir():
    pytest.skip(f"no real samples at {REALDATA}", allow_module_level=True)

TINY_MODEL = ["debug=tiny", "data.batch_size=2"]
REAL_SETS = {
    "ade20k": [f"data.root={REALDATA}/ade20k/ADEChallengeData2016", "data.train_split=validation"],
    "cityscapes": [f"data.root={REALDATA}/cityscapes", "data.val_split=train"],
    "cocostuff164k": [f"data.root={REALDATA}/cocostuff"],
}


class LabelEcho(torch.nn.Module):
    """Stands in for a perfect model: the 'scores' are the one-hot ground truth of the input it is given."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def predict(self, images: torch.Tensor, labels: torch.Tensor, options=None):
        valid = labels.clamp(max=self.num_classes - 1)
        return F.one_hot(valid, self.num_classes).permute(0, 3, 1, 2).float(), None


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_perfect_prediction_scores_100(mode, tmp_path):
    """Labels fed back as scores through whole/slide window assembly and the dataset-level metric: 100 %."""
    cfg = compose_config(["data=ade20k", *REAL_SETS["ade20k"], "crop_size=256"], output_dir=tmp_path)
    from hydra.utils import instantiate

    dm = instantiate(cfg.data)
    dm.setup("validate")
    model = LabelEcho(dm.num_classes)
    # The label resized (nearest) to the model's input is what a perfect model would output; scoring at
    # that resolution is exact (bilinear upsampling of one-hot scores would blur boundaries).
    result = SegMetrics(dm.num_classes)
    for sample in dm.val_set:
        label = sample["label"][None]
        image = sample["image"][None]
        small = F.interpolate(label[:, None].float(), size=image.shape[-2:], mode="nearest")[:, 0].long()
        scores, _ = infer(model, image, tuple(small.shape[-2:]), mode, crop=256, stride=170, labels=small)
        result.update(scores.argmax(1), small)
    assert result.compute()["mIoU"].item() == pytest.approx(100.0)
    assert result.compute()["aAcc"].item() == pytest.approx(100.0)


@pytest.mark.slow
@pytest.mark.parametrize("dataset", sorted(REAL_SETS))
def test_fast_dev_run_on_real_samples(dataset, tmp_path):
    """One training and one validation batch of a tiny STEP model (oracle policy) on each real sample set."""
    from step_lightning.train import train

    overrides = [f"data={dataset}", *REAL_SETS[dataset], *TINY_MODEL, "crop_size=128", "method=step",
                 "policy=oracle", "prune_heads=[1]", "+trainer.fast_dev_run=true", "eval.mode=slide"]
    summary = train(compose_config(overrides, output_dir=tmp_path))
    assert 0.0 <= summary["mIoU"] <= 100.0
    assert summary["token_stats"]["reduction"] >= 1.0
    assert summary["exit_stats"] is not None
