import pytest
import torch
import torch.nn.functional as F

from step_lightning.tokens.embed import embed_pyramid, feature_index
from step_lightning.tokens.layout import TOKEN_SIZES, dcts_layout, identity_layout
from step_lightning.tokens.tau import WINDOW_SIZES


def all_sizes_layout(b, hp, wp, seed):
    """Random layout in which every image holds tokens of every size 1..16 (first seed that gives one)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(100):
        scores = {s: torch.rand(b, hp // s, wp // s, generator=g) for s in WINDOW_SIZES}
        layout = dcts_layout(scores, (hp, wp), (0.5, 0.6, 0.6, 0.5))
        if (layout.counts_per_size > 0).all():
            return layout
    raise AssertionError("no layout with all sizes found")


def embed(images, layout, proj, pos_grid):
    """Tokens [B, N, C] of a padded layout read from the pyramid (as the forward's rows do), padding zeroed."""
    feats = embed_pyramid(images, layout.grid, proj, pos_grid)
    row, col = layout.token_pos.unbind(-1)
    index = feature_index(layout.token_size, row, col, layout.grid)
    tokens = feats.gather(1, index.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
    return tokens * layout.valid.unsqueeze(-1)


def reference_tokens(images, layout, proj, pos_grid):
    """Literal STEP: crop each superpatch, resize it to 16x16 px, embed; pos = mean over covered cells."""
    out = torch.zeros(*layout.valid.shape, proj.out_channels, dtype=images.dtype)
    for b in range(images.shape[0]):
        for t in range(int(layout.num_tokens[b])):
            s = int(layout.token_size[b, t])
            r, c = layout.token_pos[b, t].tolist()
            crop = images[b : b + 1, :, 16 * r : 16 * (r + s), 16 * c : 16 * (c + s)]
            patch = F.interpolate(crop, size=(16, 16), mode="bilinear", align_corners=False, antialias=False)
            out[b, t] = proj(patch)[0, :, 0, 0] + pos_grid[0, :, r : r + s, c : c + s].mean((1, 2))
    return out


@pytest.mark.parametrize(("grid", "dtype", "tol"), [((33, 18), torch.float64, 1e-10), ((18, 34), torch.float32, 1e-4)])
def test_pyramid_equals_per_superpatch_resize(grid, dtype, tol):
    hp, wp = grid
    torch.manual_seed(0)
    layout = all_sizes_layout(2, hp, wp, seed=1)
    proj = torch.nn.Conv2d(3, 6, 16, 16).to(dtype)
    images = torch.randn(2, 3, 16 * hp, 16 * wp, dtype=dtype)
    pos_grid = torch.randn(1, 6, hp, wp, dtype=dtype)
    tokens = embed(images, layout, proj, pos_grid)
    assert tokens.shape == (*layout.valid.shape, 6)
    torch.testing.assert_close(tokens, reference_tokens(images, layout, proj, pos_grid), atol=tol, rtol=tol)
    assert (tokens[~layout.valid] == 0).all()


@pytest.mark.parametrize("s", TOKEN_SIZES)
def test_downsample_reads_only_pixels_inside_each_window(s):
    """The claim behind the equivalence, for every s: changing pixels outside an aligned 16s-px window
    leaves the 16x16 px its bilinear downsample produces for that window unchanged."""
    torch.manual_seed(s)
    size = 16 * s * 3
    image = torch.randn(1, 1, size, size, dtype=torch.float64)
    other = torch.randn_like(image)
    window = (slice(None), slice(None), slice(16 * s, 32 * s), slice(16 * s, 32 * s))
    other[window] = image[window]

    def down(x):
        return F.interpolate(x, size=(size // s, size // s), mode="bilinear", align_corners=False, antialias=False)

    inside = (slice(None), slice(None), slice(16, 32), slice(16, 32))
    assert torch.equal(down(image)[inside], down(other)[inside])
    assert not torch.equal(down(image), down(other))


def test_identity_layout_is_the_plain_patch_embedding():
    hp, wp = 3, 5
    proj = torch.nn.Conv2d(3, 4, 16, 16)
    images = torch.randn(2, 3, 16 * hp, 16 * wp)
    pos_grid = torch.randn(1, 4, hp, wp)
    tokens = embed(images, identity_layout(2, hp, wp), proj, pos_grid)
    torch.testing.assert_close(tokens, (proj(images) + pos_grid).flatten(2).transpose(1, 2))


def test_gradients_reach_the_patch_embedding_and_position_grid():
    layout = all_sizes_layout(1, 32, 16, seed=2)
    proj = torch.nn.Conv2d(3, 4, 16, 16)
    pos_grid = torch.randn(1, 4, 32, 16, requires_grad=True)
    embed(torch.randn(1, 3, 512, 256), layout, proj, pos_grid).sum().backward()
    assert proj.weight.grad is not None and pos_grid.grad.abs().sum() > 0


def test_image_size_must_match_grid():
    with pytest.raises(ValueError, match="layout grid"):
        embed_pyramid(torch.randn(1, 3, 64, 64), (3, 4), torch.nn.Conv2d(3, 4, 16, 16), torch.zeros(1, 4, 3, 4))
