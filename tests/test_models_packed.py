"""Token rows: the bucket ladder, row bookkeeping (packed and padded), the attention kernels, the ViT block and
the ATM heads over rows, each against the dense computation per image (tests/reference.py)."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import Block

from step_lightning.models.atm import ATMHead
from step_lightning.models.packed import Packing, bucket, cross_attention, ladder, self_attention
from step_lightning.models.vit import ViTEncoder
from tests.reference import dense_atm

COUNTS = [5, 17, 1, 9]


def test_bucket_ladder():
    assert [bucket(n) for n in (0, 1, 64, 65, 500, 1024, 1025)] == [64, 64, 64, 128, 512, 1024, 1152]
    sizes = ladder(10_000)
    assert sizes[:16] == [64 * i for i in range(1, 17)] and sizes[-1] == 10_000
    for small, large in zip(sizes[15:-2], sizes[16:-1], strict=True):  # ~12 % steps, multiples of 64
        assert large % 64 == 0 and 1.0 < large / small <= 1.125 + 32 / small
    for n in range(1, 3000, 7):
        assert n <= bucket(n) in sizes or bucket(n) == n  # every bucket is on the ladder
        assert bucket(n, cap=100) == min(bucket(n), 100)


def packed_rows(values: torch.Tensor, counts: list[int], rows: int) -> torch.Tensor:
    """Padded [B, N, ...] -> the packed [rows, ...] buffer (dummies random) the engine would hold."""
    real = torch.cat([values[b, :n] for b, n in enumerate(counts)])
    return torch.cat((real, torch.randn(rows - len(real), *values.shape[2:])))


@pytest.mark.parametrize(("counts", "rows", "length"), [(COUNTS, 40, 20), (COUNTS, 32, 17), ([6], 10, 10)])
def test_packing_views(counts, rows, length):
    packing = Packing.from_counts(torch.tensor(counts), rows, length)
    values = torch.randn(len(counts), length, 3)
    flat = packed_rows(values, counts, rows)
    dense = packing.to_dense(flat)
    assert torch.equal(packing.key_mask, torch.arange(length) < torch.tensor(counts)[:, None])
    assert torch.equal(dense[packing.key_mask], values[packing.key_mask])
    assert torch.equal(packing.from_dense(values)[packing.real], flat[packing.real])
    assert packing.real.sum() == sum(counts) and packing.cu_seqlens.tolist() == [0, *torch.tensor(counts).cumsum(0)]
    assert packing.aligned == (len(counts) == 1)


def test_padded_packing_views():
    counts = torch.tensor(COUNTS)
    packing = Packing.padded(counts, 17)
    values = torch.randn(len(COUNTS), 17, 3)
    assert packing.rows == len(COUNTS) * 17 and packing.aligned and not packing.contiguous
    assert torch.equal(packing.to_dense(values.flatten(0, 1)), values)
    assert torch.equal(packing.real, (torch.arange(17) < counts[:, None]).flatten())
    assert torch.equal(packing.row_images(), torch.arange(len(COUNTS)).repeat_interleave(17))
    halted = packing.key_mask.clone()
    halted[1, :4] = False
    masked = packing.with_key_mask(halted)
    assert masked.counts.tolist() == [5, 13, 1, 9] and torch.equal(masked.real, halted.flatten())


def test_self_and_cross_attention_equal_per_image_attention():
    torch.manual_seed(0)
    b, heads, dim, length = len(COUNTS), 2, 8, 17
    packing = Packing.from_counts(torch.tensor(COUNTS), 64, length)
    qkv = torch.randn(b, length, 3, heads, dim)
    out = self_attention(packed_rows(qkv, COUNTS, 64), packing, dim**-0.5)
    queries = torch.randn(b, 6, heads, dim)
    cross = cross_attention(queries, packed_rows(qkv[:, :, 1], COUNTS, 64), packed_rows(qkv[:, :, 2], COUNTS, 64),
                            packing, dim**-0.5)
    start = 0
    for i, n in enumerate(COUNTS):
        q, k, v = qkv[i, :n].permute(1, 2, 0, 3)  # [H, n, D] each
        expected = torch.softmax(q @ k.transpose(1, 2) * dim**-0.5, -1) @ v
        torch.testing.assert_close(out[start : start + n], expected.transpose(0, 1), atol=1e-6, rtol=0)
        expected = torch.softmax(queries[i].transpose(0, 1) @ k.transpose(1, 2) * dim**-0.5, -1) @ v
        torch.testing.assert_close(cross[i], expected.transpose(0, 1), atol=1e-6, rtol=0)
        start += n


def test_row_block_equals_the_timm_block_per_image():
    torch.manual_seed(0)
    block = ViTEncoder("vit_t", img_size=64, depth=1, drop_path_rate=0.0).blocks[0].eval()
    x = torch.randn(len(COUNTS), 17, 192)
    packing = Packing.from_counts(torch.tensor(COUNTS), 40, 17)
    with torch.no_grad():
        out = block(packed_rows(x, COUNTS, 40), packing)
        padded = block(x.flatten(0, 1), Packing.padded(torch.tensor(COUNTS), 17)).view(len(COUNTS), 17, 192)
        start = 0
        for i, n in enumerate(COUNTS):
            expected = Block.forward(block, x[i : i + 1, :n])[0]  # timm's own forward
            torch.testing.assert_close(out[start : start + n], expected, atol=1e-5, rtol=0)
            torch.testing.assert_close(padded[i, :n], expected, atol=1e-5, rtol=0)
            start += n
        regular = Packing.regular(2, 17, "cpu")  # uniform rows: a reshape of the padded batch, no mask
        torch.testing.assert_close(block(x[:2].reshape(34, 192), regular).view(2, 17, 192),
                                   Block.forward(block, x[:2]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("presence_only", [False, True])
def test_atm_head_over_rows_equals_the_dense_head(presence_only):
    torch.manual_seed(0)
    num_inputs = 1 if presence_only else 2
    head = ATMHead(64, 5, num_inputs=num_inputs, num_layers=2, presence_only=presence_only).eval()
    feats = [torch.randn(len(COUNTS), 17, 64) for _ in range(num_inputs)]
    mask = torch.arange(17) < torch.tensor(COUNTS)[:, None]
    packing = Packing.from_counts(torch.tensor(COUNTS), 48, 20)
    with torch.no_grad():
        reference = dense_atm(head, feats, mask)
        outputs = head([packed_rows(f, COUNTS, 48) for f in feats], packing)
    assert len(outputs) == len(reference) == num_inputs
    for out, ref in zip(outputs, reference, strict=True):
        torch.testing.assert_close(out["class_logits"], ref["class_logits"], atol=1e-5, rtol=0)
        masks = out["mask_logits"].transpose(1, 2)  # token-major dense [B, L, K] -> [B, K, L]
        for i, n in enumerate(COUNTS):
            torch.testing.assert_close(masks[i, :, :n], ref["mask_logits"][i, :, :n], atol=1e-5, rtol=0)
