import pytest
import skimage.data
import timm
import torch
import torch.nn.functional as F

from step_lightning.measure.gflops import count_gflops
from step_lightning.tokens.layout import dcts_layout
from step_lightning.tokens.policy import (
    OraclePolicy,
    PolicyNet,
    fused_policy,
    homogeneity_targets,
    lite0_imagenet_state_dict,
)
from step_lightning.tokens.tau import WINDOW_SIZES, parse_tau

IGN = 255


def classify(model, image):
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None]
    x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        return int(model((x - 127.5) / 127.5).argmax())


def test_mapped_imagenet_weights_classify_real_photos():
    model = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    model.load_state_dict(lite0_imagenet_state_dict())  # strict: every tensor mapped
    assert classify(model, skimage.data.chelsea()) in range(281, 286)  # cat classes
    assert classify(model, skimage.data.coffee()) == 967  # espresso


def test_pretrained_policy_uses_the_mapped_weights():
    weights = lite0_imagenet_state_dict()
    policy = PolicyNet(pretrained=True)
    for key, value in policy.backbone.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert not torch.equal(PolicyNet(pretrained=False).backbone.conv_stem.weight, weights["conv_stem.weight"])


@pytest.mark.parametrize(("h", "w"), [(64, 64), (48, 80), (272, 208), (16, 32)])
def test_policy_score_shapes_for_16px_multiples(h, w):
    torch.manual_seed(0)
    policy = PolicyNet(pretrained=False).eval()
    with torch.no_grad():
        scores = policy(torch.randn(2, 3, h, w))
    assert sorted(scores) == list(WINDOW_SIZES)
    for s, score in scores.items():
        assert score.shape == (2, h // 16 // s, w // 16 // s)
        assert ((score > 0) & (score < 1)).all()
    with pytest.raises(ValueError, match="multiples of 16"):
        policy(torch.randn(1, 3, 40, 64))


def test_policy_undoes_the_segmenter_normalisation():
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    raw_policy = PolicyNet(pretrained=False).eval()
    seg_policy = PolicyNet(pretrained=False, input_mean=mean, input_std=std).eval()
    seg_policy.load_state_dict(raw_policy.state_dict())
    raw = torch.rand(1, 3, 64, 96) * 255
    normalised = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        a, b = raw_policy(raw), seg_policy(normalised)
    for s in a:
        torch.testing.assert_close(a[s], b[s], atol=1e-5, rtol=1e-4)


def test_policy_gflops_match_the_spec():
    # EfficientNet-Lite0 is ~0.4 GFLOPs at 224 and ~8 at 1024; the heads add little. At 512: ~2.
    assert 1.9 < count_gflops(PolicyNet(pretrained=False), torch.zeros(1, 3, 512, 512))["gflops"] < 2.1


def patches_to_pixels(patch_labels, p):
    return patch_labels.repeat_interleave(p, -2).repeat_interleave(p, -1)


def test_targets_hand_made_2x2():
    # 6x6 patches of 4x4 px -> 3x3 windows of 2x2 patches; each window below is one case.
    p = 4
    lab = torch.zeros(6, 6, dtype=torch.long)
    px = patches_to_pixels(lab, p)

    def window(i, j):
        return px[8 * i : 8 * i + 8, 8 * j : 8 * j + 8]

    window(0, 0)[:] = 3  # one class -> 1
    window(0, 1)[:] = IGN  # all ignore -> 1
    window(0, 2)[:] = 5  # one class + ignore on the border -> 255
    window(0, 2)[0, 0] = IGN
    window(1, 1)[:] = 7  # one class + ignore inside -> 0
    window(1, 1)[3, 4] = IGN
    window(1, 0)[:] = 1  # two classes -> 0
    window(1, 0)[:, :3] = 2
    window(1, 2)[:] = 1  # two classes + ignore on the border -> 0
    window(1, 2)[:2] = 2
    window(1, 2)[7] = IGN
    window(2, 0)[:] = 0  # class 0 is an ordinary class -> 1
    window(2, 1)[:] = 4  # one odd pixel -> 0
    window(2, 1)[7, 7] = 6
    window(2, 2)[:] = 254  # largest class id -> 1
    targets = homogeneity_targets(px[None], (6, 6), sizes=(2, 4, 8))
    assert targets[2][0].tolist() == [[1, 1, 255], [0, 0, 0], [1, 0, 1]]
    assert targets[4][0].tolist() == [[0]]  # mixed
    assert targets[8].shape == (1, 0, 0)


def test_targets_border_rule_for_larger_windows():
    # 12x12 patches, 4x4 windows (3x3 of them): one class plus ignore is excluded on the border only.
    px = torch.full((1, 24, 24), 9)  # 2 px per patch
    px[0, 0, 0] = IGN  # corner window
    px[0, 10, 10] = IGN  # centre window
    px[0, 10, 23] = IGN  # right-edge window
    t = homogeneity_targets(px, (12, 12), sizes=(4,))[4][0]
    assert t.tolist() == [[255, 1, 1], [1, 0, 255], [1, 1, 1]]
    t2 = homogeneity_targets(px, (12, 12), sizes=(2,))[2][0]
    assert t2[0, 0] == 255 and t2[2, 2] == 0 and t2[2, 5] == 255  # 2x2: (2,5) is on the right edge
    # CTS's Cityscapes crops: no exclusion, one class plus ignore is not homogeneous anywhere.
    kept = homogeneity_targets(px, (12, 12), sizes=(4,), exclude_border=False)[4][0]
    assert kept.tolist() == [[0, 1, 1], [1, 0, 0], [1, 1, 1]]


def naive_targets(labels, hp, wp, s, p):
    out = torch.zeros(labels.shape[0], hp // s, wp // s)
    nh, nw = hp // s, wp // s
    for b in range(labels.shape[0]):
        for i in range(nh):
            for j in range(nw):
                win = labels[b, i * s * p : (i + 1) * s * p, j * s * p : (j + 1) * s * p]
                classes = set(win[win != IGN].tolist())
                has_ign = bool((win == IGN).any())
                if not classes or (len(classes) == 1 and not has_ign):
                    out[b, i, j] = 1
                elif len(classes) == 1 and (i in (0, nh - 1) or j in (0, nw - 1)):
                    out[b, i, j] = 255
    return out


@pytest.mark.parametrize("grid", [(20, 13), (16, 16), (9, 34)])
def test_targets_match_literal_rule_on_random_maps(grid):
    hp, wp = grid
    g = torch.Generator().manual_seed(hp)
    p = 4
    # Blocky labels so that homogeneous windows of every size occur, plus sprinkled ignore.
    coarse = torch.randint(0, 3, (3, hp // 4 + 1, wp // 4 + 1), generator=g)
    labels = patches_to_pixels(coarse, 4 * p)[:, : hp * p, : wp * p].clone()
    labels[torch.rand(labels.shape, generator=g) < 0.002] = IGN
    labels[0, : 8 * p, : 8 * p] = IGN
    targets = homogeneity_targets(labels, grid)
    for s in WINDOW_SIZES:
        assert torch.equal(targets[s], naive_targets(labels, hp, wp, s, p)), s


def test_labels_must_tile_the_grid():
    with pytest.raises(ValueError, match="do not tile"):
        homogeneity_targets(torch.zeros(1, 30, 32, dtype=torch.long), (2, 2))


def test_oracle_on_one_class_gives_minimal_tokens():
    labels = torch.full((2, 128, 128), 4)  # 64x64 patches of 2 px
    scores = OraclePolicy()(labels, (64, 64))
    layout = dcts_layout(scores, (64, 64), parse_tau(6899))
    assert layout.num_tokens.tolist() == [16, 16]
    assert layout.counts_per_size[:, 4].tolist() == [16, 16]


def test_oracle_tokens_are_homogeneous_and_excluded_windows_score_zero():
    g = torch.Generator().manual_seed(0)
    hp, wp, p = 24, 40, 2
    coarse = torch.randint(0, 4, (2, 6, 10), generator=g)
    labels = patches_to_pixels(coarse, 4 * p)
    labels[:, :3, :] = IGN  # crop padding at the top: one class + ignore on the border
    scores = OraclePolicy()(labels, (hp, wp))
    targets = homogeneity_targets(labels, (hp, wp))
    for s in WINDOW_SIZES:
        assert torch.equal(scores[s], (targets[s] == 1).float())
    assert (targets[2] == 255).any()
    layout = dcts_layout(scores, (hp, wp), parse_tau(4499))
    assert (layout.counts_per_size[:, 1:].sum(1) > 0).all()
    for b in range(2):
        for t in range(int(layout.num_tokens[b])):
            s = int(layout.token_size[b, t])
            r, c = layout.token_pos[b, t].tolist()
            win = labels[b, r * p : (r + s) * p, c * p : (c + s) * p]
            assert s == 1 or len(set(win[win != IGN].tolist())) <= 1
            assert s == 1 or not ((win == IGN).any() and (win != IGN).any())


def test_fused_policy_folds_every_batchnorm_and_matches_the_eval_policy():
    torch.manual_seed(0)
    policy = PolicyNet(pretrained=False, input_mean=(120.0, 110.0, 100.0), input_std=(60.0, 60.0, 60.0)).eval()
    for m in policy.modules():  # non-trivial statistics, so folding changes every weight
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    fused = fused_policy(policy)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert fused.channels_last and not fused.training
    assert fused.neck[0].weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        reference, out = policy(images), fused(images)
    for s in WINDOW_SIZES:
        torch.testing.assert_close(out[s], reference[s], atol=1e-5, rtol=0)
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in before.items())  # the original is untouched
