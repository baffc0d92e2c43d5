"""Dataset-level mIoU/aAcc against numpy, and whole vs sliding-window inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from step_lightning.metrics import SegMetrics
from step_lightning.models.inference import infer, slide_inference, window_starts
from step_lightning.models.segmenter import Segmenter
from step_lightning.models.vit import ViTEncoder


def numpy_dataset_miou(preds, labels, num_classes, ignore=255):
    """mmseg's definition: per-class intersection/union summed over all images, nanmean over classes whose
    union is non-empty; ignore pixels dropped. Returns (mIoU, aAcc, IoU) in percent."""
    inter = np.zeros(num_classes)
    union = np.zeros(num_classes)
    correct = labelled = 0
    for p, t in zip(preds, labels, strict=True):
        keep = t != ignore
        p, t = p[keep], t[keep]
        for c in range(num_classes):
            inter[c] += np.sum((p == c) & (t == c))
            union[c] += np.sum((p == c) | (t == c))
        correct += np.sum(p == t)
        labelled += t.size
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    return 100 * np.nanmean(iou), 100 * correct / labelled, 100 * iou


def random_dataset(seed, num_images=5, num_classes=6, absent=(4,)):
    rng = np.random.default_rng(seed)
    preds, labels = [], []
    for i in range(num_images):
        h, w = rng.integers(5, 12, 2)  # images of different sizes, as at original resolution
        t = rng.integers(0, num_classes, (h, w))
        p = np.where(rng.random((h, w)) < 0.6, t, rng.integers(0, num_classes, (h, w)))
        for c in absent:  # classes absent from both GT and predictions
            t[t == c] = 0
            p[p == c] = 1
        t[rng.random((h, w)) < 0.2] = 255
        if i == 0:
            p[t == 255] = 3  # predictions under ignore pixels must not count
        preds.append(p)
        labels.append(t)
    return preds, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_segmetrics_matches_numpy_dataset_definition(seed):
    k = 6
    preds, labels = random_dataset(seed, num_classes=k)
    metric = SegMetrics(k)
    for p, t in zip(preds, labels, strict=True):
        metric.update(torch.from_numpy(p)[None], torch.from_numpy(t)[None])
    got = metric.compute()
    miou, aacc, iou = numpy_dataset_miou(preds, labels, k)
    assert np.isnan(iou[4]) and torch.isnan(got["IoU"][4])  # absent everywhere: skipped, not 0
    np.testing.assert_allclose(got["mIoU"].item(), miou, rtol=1e-9)
    np.testing.assert_allclose(got["aAcc"].item(), aacc, rtol=1e-9)
    np.testing.assert_allclose(got["IoU"].numpy(), iou, rtol=1e-9)
    # dataset-level accumulation differs from averaging per-image mIoUs
    per_image = np.mean([numpy_dataset_miou([p], [t], k)[0] for p, t in zip(preds, labels, strict=True)])
    assert abs(per_image - miou) > 1e-6


def test_segmetrics_reset_and_ignore_only():
    metric = SegMetrics(3)
    metric.update(torch.tensor([[0, 1]]), torch.tensor([[255, 255]]))
    out = metric.compute()
    assert torch.isnan(out["IoU"]).all() and out["aAcc"] == 0
    metric.reset()
    metric.update(torch.tensor([[0, 1, 2]]), torch.tensor([[0, 1, 1]]))
    out = metric.compute()
    np.testing.assert_allclose(out["IoU"].numpy(), [100, 50, 0])
    np.testing.assert_allclose(out["mIoU"].item(), 50)


def test_torchmetrics_jaccard_macro_averaging_of_empty_classes():
    """torchmetrics' macro average also skips empty-union classes, but its per-class output reports them as 0;
    SegMetrics reports NaN there so per-class tables do not show a fake 0."""
    k = 6
    preds, labels = random_dataset(7, num_classes=k)
    jaccard_macro = MulticlassJaccardIndex(k, ignore_index=255, average="macro")
    jaccard_none = MulticlassJaccardIndex(k, ignore_index=255, average="none")
    ours = SegMetrics(k)
    for p, t in zip(preds, labels, strict=True):
        for m in (jaccard_macro, jaccard_none, ours):
            m.update(torch.from_numpy(p).flatten()[None], torch.from_numpy(t).flatten()[None])
    got = ours.compute()
    np.testing.assert_allclose(100 * jaccard_macro.compute().item(), got["mIoU"].item(), rtol=1e-5)
    per_class = 100 * jaccard_none.compute()
    assert per_class[4] == 0 and torch.isnan(got["IoU"][4])


# ---- inference -------------------------------------------------------------------------------------------


def mmseg_window_starts(size: int, crop: int, stride: int) -> list[int]:
    """mmseg EncoderDecoder.slide_inference along one axis."""
    starts = []
    for i in range(max(size - crop + stride - 1, 0) // stride + 1):
        y1 = i * stride
        y2 = min(y1 + crop, size)
        starts.append(max(y2 - crop, 0))
    return starts


@pytest.mark.parametrize(("crop", "stride"), [(512, 341), (640, 608), (768, 512), (32, 16), (64, 64), (48, 1)])
def test_window_grid_matches_mmseg(crop, stride):
    for size in [1, 31, crop - 1, crop, crop + 1, 2 * crop, 683, 1024, 2048]:
        assert window_starts(size, crop, stride) == mmseg_window_starts(size, crop, stride), (size, crop, stride)
    # ADE20K ViT-L at 640 / stride 608 on a 640 x 853 image: 1 x 2 windows
    assert len(window_starts(853, 640, 608)) == 2 and len(window_starts(640, 640, 608)) == 1


class IdentityModel:
    """Stand-in whose class scores are the image channels themselves: every overlap average is exact."""

    def predict(self, images, labels=None, options=None):
        return images.clone(), type("Out", (), {"tokens": torch.ones(images.shape[0])})()


@pytest.mark.parametrize(("size", "crop", "stride"), [((50, 77), 32, 20), ((64, 64), 32, 32), ((40, 90), 48, 7)])
def test_slide_averages_overlaps_exactly(size, crop, stride):
    images = torch.randn(2, 3, *size)
    scores, outs = slide_inference(IdentityModel(), images, crop, stride)
    torch.testing.assert_close(scores, images)
    windows = len(window_starts(size[0], crop, stride)) * len(window_starts(size[1], crop, stride))
    assert sum(o.tokens.numel() for o in outs) == windows * 2


@pytest.fixture(scope="module")
def tiny_segmenter():
    torch.manual_seed(0)
    return Segmenter(ViTEncoder("vit_t", img_size=64, drop_path_rate=0.0, depth=2), 5, (1, 2)).eval()


@pytest.mark.parametrize("size", [(64, 64), (48, 80), (40, 56)])
def test_slide_equals_whole_when_one_window_covers_the_image(tiny_segmenter, size):
    images = torch.randn(2, 3, *size)
    out_size = (size[0] * 2, size[1] * 2)  # scores are resized to the label's resolution in both modes
    whole, _ = infer(tiny_segmenter, images, out_size, "whole")
    crop = max(size)
    slide, outs = infer(tiny_segmenter, images, out_size, "slide", crop=crop, stride=crop * 2 // 3)
    assert len(outs) == 1 and whole.shape == (2, 5, *out_size)
    torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-6)


def test_slide_differs_from_whole_with_several_windows(tiny_segmenter):
    images = torch.randn(1, 3, 64, 96)
    whole, _ = infer(tiny_segmenter, images, (64, 96), "whole")
    slide, _ = infer(tiny_segmenter, images, (64, 96), "slide", crop=64, stride=32)
    assert slide.shape == whole.shape and not torch.allclose(slide, whole)


def test_infer_rejects_bad_mode_and_stride(tiny_segmenter):
    images = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="whole.*slide"):
        infer(tiny_segmenter, images, (32, 32), "sliding")
    with pytest.raises(ValueError, match="stride"):
        infer(tiny_segmenter, images, (32, 32), "slide", crop=32, stride=0)
