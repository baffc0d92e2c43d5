"""ATM loss on hand-made cases: class targets and weights, ignore pixels, empty images, 2-way heads."""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from step_lightning.models.loss import ATMLoss, present_classes

K = 4


def manual_weighted_ce(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted-mean CE written out: sum_i w[t_i] * -log softmax(x_i)[t_i] / sum_i w[t_i]."""
    logp = logits.log_softmax(-1).flatten(0, 1)
    t = targets.flatten()
    w = weight[t]
    return (w * -logp[torch.arange(len(t)), t]).sum() / w.sum()


def out(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> dict:
    return {"class_logits": class_logits, "mask_logits": mask_logits}


def test_present_classes_excludes_ignore():
    labels = torch.tensor([[[0, 2], [255, 2]], [[255, 255], [255, 255]], [[3, 3], [1, 0]]])
    assert present_classes(labels, K).tolist() == [
        [True, False, True, False],
        [False, False, False, False],
        [True, True, False, True],
    ]


def test_class_targets_and_no_object_weight():
    torch.manual_seed(0)
    labels = torch.tensor([[[0, 2], [255, 2]], [[3, 3], [3, 255]]])
    class_logits = torch.randn(2, K, K + 1)
    loss = ATMLoss(K, focal_weight=0.0, dice_weight=0.0)
    got = loss([out(class_logits, torch.randn(2, K, 2, 2))], labels)
    # query c targets class c where c is present, "no object" (index K) otherwise
    targets = torch.tensor([[0, K, 2, K], [K, K, K, 3]])
    weight = torch.tensor([1.0] * K + [0.1])
    expected = F.cross_entropy(class_logits.flatten(0, 1), targets.flatten(), weight=weight)
    torch.testing.assert_close(got["loss_ce"], expected)
    torch.testing.assert_close(got["loss_ce"], manual_weighted_ce(class_logits, targets, weight))
    torch.testing.assert_close(got["loss"], expected)
    # the no-object weight really is 0.1: with weight 1 the value differs
    unweighted = F.cross_entropy(class_logits.flatten(0, 1), targets.flatten())
    assert not torch.allclose(got["loss_ce"], unweighted)


def test_presence_only_two_way_variant():
    torch.manual_seed(1)
    labels = torch.tensor([[[1, 1], [255, 0]]])
    class_logits = torch.randn(1, K, 2)
    got = ATMLoss(K, focal_weight=0.0, dice_weight=0.0)([out(class_logits, torch.randn(1, K, 2, 2))], labels)
    targets = torch.tensor([[0, 0, 1, 1]])  # 0 = present, 1 = no object
    expected = manual_weighted_ce(class_logits, targets, torch.tensor([1.0, 0.1]))
    torch.testing.assert_close(got["loss_ce"], expected)


def test_weights_and_sum_over_outputs():
    torch.manual_seed(2)
    labels = torch.randint(0, K, (2, 8, 8))
    outputs = [out(torch.randn(2, K, K + 1), torch.randn(2, K, 8, 8)) for _ in range(3)]
    base = ATMLoss(K, focal_weight=1.0, dice_weight=1.0)
    per_output = [base([o], labels) for o in outputs]
    total = ATMLoss(K)(outputs, labels)  # defaults: CE 1, focal 20, dice 1, summed over the three outputs
    for name, w in (("loss_ce", 1.0), ("loss_focal", 20.0), ("loss_dice", 1.0)):
        torch.testing.assert_close(total[name], w * sum(p[name] for p in per_output))
    torch.testing.assert_close(total["loss"], total["loss_ce"] + total["loss_focal"] + total["loss_dice"])


def test_mask_losses_match_manual_formula():
    """focal (alpha .25, gamma 2) mean over valid pixels and dice with +1 smoothing, per (image, present class),
    summed and divided by the number of such pairs."""
    torch.manual_seed(3)
    labels = torch.tensor([[[0, 0, 1], [1, 255, 1]], [[2, 2, 2], [2, 2, 255]]])  # pairs: (0,0) (0,1) (1,2)
    mask_logits = torch.randn(2, K, 2, 3)
    got = ATMLoss(K, focal_weight=1.0, dice_weight=1.0)([out(torch.randn(2, K, K + 1), mask_logits)], labels)
    focal_sum = dice_sum = 0.0
    for b, c in ((0, 0), (0, 1), (1, 2)):
        valid = labels[b] != 255
        x, t = mask_logits[b, c][valid], (labels[b][valid] == c).float()
        p = x.sigmoid()
        ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
        p_t = p * t + (1 - p) * (1 - t)
        alpha_t = 0.25 * t + 0.75 * (1 - t)
        focal_sum += (alpha_t * (1 - p_t) ** 2 * ce).mean()
        dice_sum += 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    torch.testing.assert_close(got["loss_focal"], focal_sum / 3)
    torch.testing.assert_close(got["loss_dice"], dice_sum / 3)


def test_ignore_pixels_do_not_change_the_loss():
    torch.manual_seed(4)
    labels = torch.randint(0, K, (2, 8, 8))
    ignore = torch.rand(2, 8, 8) < 0.3
    labels[ignore] = 255
    class_logits = torch.randn(2, K, K + 1)
    mask_logits = torch.randn(2, K, 8, 8)  # label resolution = mask resolution: upsampling is the identity
    loss = ATMLoss(K)
    ref = loss([out(class_logits, mask_logits)], labels)
    changed = mask_logits.clone()
    changed[ignore[:, None].expand_as(changed)] = 50.0 * torch.randn(int(ignore.sum()) * K)
    new = loss([out(class_logits, changed)], labels)
    for name in ("loss_ce", "loss_focal", "loss_dice", "loss"):
        torch.testing.assert_close(new[name], ref[name])
    # control: a change on a labelled pixel does move the mask losses
    labelled = changed.clone()
    b, y, x = (~ignore).nonzero()[0].tolist()
    labelled[b, :, y, x] += 5.0
    moved = loss([out(class_logits, labelled)], labels)
    assert not torch.allclose(moved["loss_focal"], ref["loss_focal"])


def test_all_ignore_image_and_batch():
    torch.manual_seed(5)
    class_logits = torch.randn(2, K, K + 1, requires_grad=True)
    mask_logits = torch.randn(2, K, 4, 4, requires_grad=True)
    labels = torch.full((2, 4, 4), 255)
    labels[0, :2] = 1  # image 0 has class 1; image 1 is entirely ignore
    loss = ATMLoss(K)
    mixed = loss([out(class_logits, mask_logits)], labels)
    alone = loss([out(class_logits[:1], mask_logits[:1])], labels[:1])
    # the ignore-only image adds no masks: mask losses equal those of image 0 alone (1 pair in both cases)
    torch.testing.assert_close(mixed["loss_focal"], alone["loss_focal"])
    torch.testing.assert_close(mixed["loss_dice"], alone["loss_dice"])
    # all its queries target "no object"
    targets = torch.tensor([[K, 1, K, K], [K, K, K, K]])
    weight = torch.tensor([1.0] * K + [0.1])
    torch.testing.assert_close(mixed["loss_ce"], manual_weighted_ce(class_logits, targets, weight))

    empty = loss([out(class_logits[1:], mask_logits[1:])], labels[1:])
    assert empty["loss_focal"] == 0 and empty["loss_dice"] == 0
    assert torch.isfinite(empty["loss"])
    empty["loss"].backward()
    assert torch.isfinite(class_logits.grad).all() and torch.isfinite(mask_logits.grad).all()


def test_perfect_prediction_has_near_zero_mask_losses():
    labels = torch.randint(0, K, (2, 8, 8))
    labels[0, 0, :4] = 255
    onehot = F.one_hot(labels.clamp(max=K - 1), K).permute(0, 3, 1, 2).float()
    mask_logits = 30.0 * (2 * onehot - 1)
    present = present_classes(labels, K)
    target = torch.where(present, torch.arange(K), K)
    class_logits = 30.0 * F.one_hot(target, K + 1).float()
    got = ATMLoss(K)([out(class_logits, mask_logits)], labels)
    assert got["loss_dice"] < 1e-6
    assert got["loss_focal"] < 1e-6
    assert got["loss_ce"] < 1e-6


@pytest.mark.parametrize("scale", [2, 4])
def test_mask_logits_upsampled_to_label_resolution(scale):
    """Logits constant per mask are unchanged by bilinear upsampling: the focal mean is the native-size one and
    dice's sums grow by scale**2 (its +1 smoothing does not)."""
    torch.manual_seed(6)
    labels = torch.randint(0, K, (1, 4, 4))
    mask_logits = torch.randn(1, K, 1, 1).expand(1, K, 4, 4)
    big_labels = labels.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    loss = ATMLoss(K)
    small = loss([out(torch.zeros(1, K, K + 1), mask_logits)], labels)
    big = loss([out(torch.zeros(1, K, K + 1), mask_logits)], big_labels)
    torch.testing.assert_close(small["loss_focal"], big["loss_focal"])
    torch.testing.assert_close(small["loss_ce"], big["loss_ce"])
    present = present_classes(labels, K)[0].nonzero()[:, 0].tolist()
    dice = 0.0
    for c in present:
        p, t = mask_logits[0, c].sigmoid(), (labels[0] == c).float()
        dice += 1 - (2 * scale**2 * (p * t).sum() + 1) / (scale**2 * (p.sum() + t.sum()) + 1)
    torch.testing.assert_close(big["loss_dice"], dice / len(present))


@functools.cache
def bench_loss():
    """scripts/bench_loss.py, which keeps the autograd formulation of the mask losses (the oracle here) to time
    the loss against it."""
    from tests.helpers import REPO

    spec = importlib.util.spec_from_file_location("bench_loss", REPO / "scripts" / "bench_loss.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def autograd_mask_losses(*args, **kwargs):
    return bench_loss().autograd_mask_losses(*args, **kwargs)


@pytest.mark.parametrize(("alpha", "gamma", "grid", "size"), [
    (0.25, 2.0, (5, 7), (37, 53)), (0.25, 2.0, (4, 4), (64, 64)), (-1.0, 0.0, (6, 3), (11, 20)),
    (0.6, 1.5, (8, 8), (8, 8)),
])
def test_mask_losses_and_gradients_equal_the_autograd_formulation(alpha, gamma, grid, size):
    """The closed-form backward and the matrix upsampling give the values and gradients of F.interpolate +
    torchvision's sigmoid_focal_loss + dice, per output, at upsampling factors integer or not (and 1)."""
    torch.manual_seed(7)
    labels = torch.randint(0, K, (3, *size))
    labels[torch.rand(3, *size) < 0.2] = 255
    labels[2] = 255  # an image without any pair
    outputs = [out(torch.randn(3, K, K + 1), 3 * torch.randn(3, K, *grid, dtype=torch.float64).float().requires_grad_())
               for _ in range(3)]
    loss = ATMLoss(K, class_weight=0.0, focal_weight=1.0, dice_weight=1.0, focal_alpha=alpha, focal_gamma=gamma)
    got = loss(outputs, labels)
    pairs = present_classes(labels, K).nonzero()
    weights = torch.randn(2)
    grads = torch.autograd.grad(weights[0] * got["loss_focal"] + weights[1] * got["loss_dice"],
                                [o["mask_logits"] for o in outputs])
    for o, grad in zip(outputs, grads, strict=True):
        logits = o["mask_logits"].detach().double().requires_grad_()
        focal, dice = autograd_mask_losses(logits, labels, pairs, alpha, gamma)
        (expected,) = torch.autograd.grad(weights[0] * focal / len(pairs) + weights[1] * dice / len(pairs), logits)
        torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-6)
    expected = [autograd_mask_losses(o["mask_logits"].detach().double(), labels, pairs, alpha, gamma) for o in outputs]
    torch.testing.assert_close(got["loss_focal"].double(), sum(f for f, _ in expected) / len(pairs), rtol=1e-5, atol=0)
    torch.testing.assert_close(got["loss_dice"].double(), sum(d for _, d in expected) / len(pairs), rtol=1e-5, atol=0)


def test_mask_loss_gradients_stay_fp32_when_backward_runs_under_autocast():
    """A backward called inside an autocast block (some training loops do) computes the same fp32 gradients."""
    torch.manual_seed(8)
    labels = torch.randint(0, K, (2, 48, 48))
    logits = torch.randn(2, K, 3, 3, requires_grad=True)
    loss = ATMLoss(K)
    (plain,) = torch.autograd.grad(loss([out(torch.randn(2, K, K + 1), logits)], labels)["loss_focal"], logits)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss([out(torch.randn(2, K, K + 1), logits)], labels)["loss_focal"]
        (mixed,) = torch.autograd.grad(value, logits)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain)


@pytest.mark.parametrize(("grid", "size"), [((5, 7), (37, 53)), ((64, 64), (1024, 1024)), ((33, 17), (512, 300)),
                                            ((8, 8), (8, 8))])
def test_the_upsampling_matrices_are_bilinear_interpolation(grid, size):
    from step_lightning.models.loss import bilinear_matrix

    torch.manual_seed(9)
    x = torch.randn(3, *grid)
    expected = F.interpolate(x[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    got = bilinear_matrix(size[0], grid[0], x.device) @ x @ bilinear_matrix(size[1], grid[1], x.device).T
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
