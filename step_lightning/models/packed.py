"""Token rows: the bucket ladder, the row bookkeeping, the attention kernels and a ViT block over rows.

The tokens of a whole batch live in one [T, C] buffer described by ``Packing``: cumulative sequence lengths
``cu_seqlens`` int32 [B+1], each row's image and position, and a dense view [B, L] (L >= the longest image)
for the few operations that need one image per row of a matrix (per-image top-k of the halting rule, the ATM
mask-logit GEMM, the dense attention kernel). Two row arrangements:

* packed (``from_counts``, ``regular``): image-major, no padding between images (training and inference);
* padded (``padded``): image b owns rows b * L .. b * L + L - 1, a key mask marks its real tokens (static
  shapes for torch.export, and the masked-store oracle of the tests).

Packed T and L are exact counts or buckets (``bucket``): with captured graphs the engine rounds both up the
ladder, so every shape between two reads is one of a few per input size. Rows past the real total are
dummies: they belong to no image, no real row attends to them, and nothing reads their values back, so
results do not depend on the bucket.

Attention is a swapped-in kernel, chosen from the packing and the device: ``varlen_attn`` (flash, with a
backward) on CUDA in fp16/bf16 for packed rows; elsewhere scaled_dot_product_attention on the dense view
with a key mask (a plain reshape, no mask, when every image has exactly L tokens and there are no dummies).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import _pytree as pytree

LADDER_QUANTUM = 64  # buckets are multiples of 64 rows (tensor-core and kernel tile friendly)
LADDER_LINEAR_UNTIL = 1024  # every multiple of 64 up to here (steps <= 12.5 % above 512), then ~12.5 % steps
LADDER_RATIO = 1.125


def bucket(n: int, cap: int | None = None) -> int:
    """The smallest ladder size >= n (64, 128, ..., 1024, then ~12.5 % steps rounded to 64), at most ``cap``
    (the static upper bound of the quantity, itself a valid size). Wasted rows: < 64 up to 1024, < 12.5 %
    above, so padding never costs more than a bucket step."""
    size = max(LADDER_QUANTUM, -(-n // LADDER_QUANTUM) * LADDER_QUANTUM)
    if size > LADDER_LINEAR_UNTIL:
        size = LADDER_LINEAR_UNTIL
        while size < n:
            size = max(size + LADDER_QUANTUM, round(size * LADDER_RATIO / LADDER_QUANTUM) * LADDER_QUANTUM)
    return size if cap is None else min(size, cap)


def ladder(cap: int) -> list[int]:
    """Every size ``bucket`` can return below ``cap`` (and ``cap``): the shapes to warm up or capture."""
    sizes, n = [], 1
    while True:
        size = bucket(n, cap)
        sizes.append(size)
        if size >= cap:
            return sizes
        n = size + 1


@dataclass
class Packing:
    """Where each of ``rows`` packed rows belongs (see the module doc). Ints and flags are static per bucket.

    counts:     int64 [B]       rows per image (real tokens).
    cu_seqlens: int32 [B+1]     cumulative counts (flash varlen's layout).
    row_image:  int64 [rows]    image of each row, B on dummy rows (None: no dummy rows).
    row_dense:  int64 [rows]    the row's slot b * L + position in the dense view [B * L]; 0 on dummy rows
                                (None when ``aligned``).
    dense_row:  int64 [B * L]   the row of each dense slot; 0 on padding slots (None when ``aligned``).
    key_mask:   bool [B, L]     real slots of the dense view (None when ``uniform``).
    uniform:    every image has exactly L rows and rows == B * L (plain patches, CTS): no dummies, no mask.
    aligned:    row r is dense slot r (uniform, padded, or one image padded to rows == L): the dense view is
                a view.
    contiguous: an image's rows are rows cu_seqlens[b] .. cu_seqlens[b+1] - 1 (packed, not padded): what
                variable-length kernels read.
    """

    batch: int
    rows: int
    max_len: int
    counts: Tensor
    cu_seqlens: Tensor
    row_image: Tensor | None
    row_dense: Tensor | None
    dense_row: Tensor | None
    key_mask: Tensor | None
    uniform: bool
    aligned: bool
    contiguous: bool = True
    bias: Tensor | None = field(default=None, repr=False)  # cached additive key mask (attn_mask)
    real_rows: Tensor | None = field(default=None, repr=False)  # cached ``real``

    @staticmethod
    def regular(batch: int, length: int, device) -> Packing:
        """Every image ``length`` rows, no dummies (plain patches, CTS): no index tensors needed."""
        counts = torch.full((batch,), length, dtype=torch.long, device=device)
        cu = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)
        return Packing(batch, batch * length, length, counts, cu, None, None, None, None, True, True)

    @staticmethod
    def padded(counts: Tensor, length) -> Packing:
        """Image b in rows b * L .. b * L + L - 1, its first ``counts[b]`` real, the rest masked out as keys.
        ``length`` may be a symbolic size (torch.export of a data-dependent token count)."""
        batch = counts.shape[0]
        key_mask = torch.arange(length, device=counts.device) < counts[:, None]
        cu = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
        return Packing(batch, batch * length, length, counts, cu, None, None, None, key_mask, False, True,
                       contiguous=False)

    def with_key_mask(self, key_mask: Tensor) -> Packing:
        """The same aligned rows (padded, or regular) as padded rows with another key mask [B, L] (masked
        halting: halted tokens stop being keys)."""
        return replace(self, counts=key_mask.sum(1), row_image=None, key_mask=key_mask, uniform=False,
                       contiguous=False, bias=None, real_rows=None)

    def row_images(self) -> Tensor:
        """int64 [rows]: the image of each row (B on dummy rows)."""
        if self.row_image is not None:
            return self.row_image
        return torch.arange(self.rows, device=self.counts.device) // self.max_len

    @staticmethod
    def from_counts(counts: Tensor, rows: int, max_len: int) -> Packing:
        """Rows of images with ``counts`` tokens (image-major) padded to ``rows``; dense view [B, max_len].
        Static shapes for given (B, rows, max_len); no host sync."""
        batch = counts.shape[0]
        device = counts.device
        cu = F.pad(counts.cumsum(0), (1, 0))
        index = torch.arange(rows, device=device)
        # the row's image: how many images end at or before it (B past the real total); a comparison, not
        # searchsorted, which ONNX has no operator for
        image = (index[:, None] >= cu[1:]).sum(1)
        real = image < batch
        slots = torch.arange(max_len, device=device)
        key_mask = slots < counts[:, None]
        aligned = batch == 1 and rows == max_len
        row_dense = dense_row = None
        if not aligned:
            position = index - cu.index_select(0, image)
            row_dense = torch.where(real, image * max_len + position, 0)
            dense_row = torch.where(key_mask, cu[:-1, None] + slots, 0).flatten()
        return Packing(batch, rows, max_len, counts, cu.to(torch.int32), image, row_dense, dense_row, key_mask,
                       False, aligned, real_rows=real)

    @property
    def real(self) -> Tensor:
        """bool [rows]: rows that belong to an image."""
        if self.real_rows is None:
            if not self.contiguous:
                self.real_rows = self.key_mask.flatten()
            elif self.row_image is None:
                self.real_rows = torch.ones(self.rows, dtype=torch.bool, device=self.counts.device)
            else:
                self.real_rows = self.row_image < self.batch
        return self.real_rows

    def to_dense(self, values: Tensor) -> Tensor:
        """[rows, ...] -> [B, L, ...]; padding slots hold some row's values (mask them with key_mask)."""
        if self.aligned:
            return values.view(self.batch, self.max_len, *values.shape[1:])
        return values.index_select(0, self.dense_row).view(self.batch, self.max_len, *values.shape[1:])

    def from_dense(self, values: Tensor) -> Tensor:
        """[B, L, ...] -> [rows, ...]; dummy rows get some slot's values."""
        flat = values.reshape(self.batch * self.max_len, *values.shape[2:])
        return flat if self.aligned else flat.index_select(0, self.row_dense)

    def attn_mask(self, dtype: torch.dtype) -> Tensor | None:
        """[B, 1, 1, L] additive key mask (0 / -inf) for scaled_dot_product_attention on the dense view, built
        once per packing (a boolean mask would be converted at every call); None: nothing to mask."""
        if self.key_mask is None:
            return None
        if self.bias is None or self.bias.dtype != dtype:
            zero = torch.zeros((), dtype=dtype, device=self.key_mask.device)
            self.bias = torch.where(self.key_mask, zero, float("-inf"))[:, None, None, :]
        return self.bias


pytree.register_pytree_node(
    Packing,
    lambda p: (
        [p.counts, p.cu_seqlens, p.row_image, p.row_dense, p.dense_row, p.key_mask],
        (p.batch, p.rows, p.max_len, p.uniform, p.aligned, p.contiguous),
    ),
    lambda children, ctx: Packing(*ctx[:3], *children, *ctx[3:]),
    serialized_type_name="step_lightning.models.packed.Packing",
)


try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch without variable-length attention: the dense kernel serves every device
    varlen_attn = None


def use_flash_varlen(x: Tensor, packing: Packing) -> bool:
    """Flash varlen attention serves packed rows on CUDA in fp16/bf16; everything else takes the dense kernel."""
    return varlen_attn is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and packing.contiguous


def _varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale)


def self_attention(qkv: Tensor, packing: Packing, scale: float) -> Tensor:
    """Attention of every row over the rows of its own image: qkv [rows, 3, H, D] -> [rows, H, D].
    Dummy and padding rows come back zero (CUDA) or with arbitrary finite values (dense kernel)."""
    if use_flash_varlen(qkv, packing):
        # one copy to [3, rows, H, D]: q, k, v each packed token-major ([rows, H, D] contiguous), the layout
        # every varlen backend (flash, cuDNN ragged offsets) reads without stride assumptions
        q, k, v = qkv.transpose(0, 1).contiguous().unbind(0)
        if not packing.uniform and qkv.requires_grad:
            q, k, v = (without_dummy_gradients(t, packing) for t in (q, k, v))
        out = _varlen_attn(q, k, v, packing.cu_seqlens, packing.cu_seqlens, packing.max_len, packing.max_len, scale)
        # flash leaves rows past cu_seqlens[-1] unwritten: zero them so dummies stay finite
        return out if packing.uniform else torch.where(packing.real[:, None, None], out, 0)
    q, k, v = packing.to_dense(qkv).permute(2, 0, 3, 1, 4).unbind(0)  # one gather for the three
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=packing.attn_mask(q.dtype), scale=scale)
    return packing.from_dense(out.transpose(1, 2))


def without_dummy_gradients(values: Tensor, packing: Packing) -> Tensor:
    """``values`` with the gradients of dummy rows cut: flash's varlen backward leaves the gradient rows past
    ``cu_seqlens[-1]`` unwritten (whatever the memory held: NaN poisons the weights' gradients)."""
    return torch.where(packing.real[:, None, None], values, 0)


def cross_attention(q: Tensor, k: Tensor, v: Tensor, packing: Packing, scale: float,
                    k_dense: Tensor | None = None, dropout: float = 0.0) -> Tensor:
    """Per-image queries q [B, K, H, D] over that image's rows k, v [rows, H, D] -> [B, K, H, D]
    (varlen with query lengths K and key lengths ``packing.counts``). ``k_dense``: ``packing.to_dense(k)``
    if the caller has it already; ``dropout`` on the attention weights (training: the dense kernel)."""
    b, num_queries = q.shape[:2]
    if use_flash_varlen(q, packing) and dropout == 0.0:
        cu_q = torch.arange(b + 1, device=q.device, dtype=torch.int32) * num_queries
        if not packing.uniform and k.requires_grad:
            k, v = without_dummy_gradients(k, packing), without_dummy_gradients(v, packing)
        out = _varlen_attn(q.reshape(b * num_queries, *q.shape[2:]), k, v, cu_q, packing.cu_seqlens, num_queries,
                           packing.max_len, scale)
        return out.view(q.shape)
    k_dense = packing.to_dense(k) if k_dense is None else k_dense
    v_dense = packing.to_dense(v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k_dense.transpose(1, 2), v_dense.transpose(1, 2),
                                         attn_mask=packing.attn_mask(q.dtype), dropout_p=dropout, scale=scale)
    return out.transpose(1, 2)


def drop_path_rows(module: nn.Module, values: Tensor, packing: Packing) -> Tensor:
    """timm's ``DropPath`` per image on rows: timm's module draws one decision per entry of the first
    dimension, which on rows would drop single tokens instead of an image's whole residual branch."""
    prob = getattr(module, "drop_prob", 0.0)
    if not module.training or prob == 0.0:
        return values
    keep = 1.0 - prob
    decisions = values.new_empty(packing.batch + 1).bernoulli_(keep)  # entry B: dummy rows
    if getattr(module, "scale_by_keep", True):
        decisions = decisions / keep
    return values * decisions.index_select(0, packing.row_images())[:, None]
