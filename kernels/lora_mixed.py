"""Mixed-adapter LoRA / QLoRA linear, forward (inference): one adapter per row, gathered per row
(BGMV-style) or per segment of rows sharing an adapter (SGMV-style).

For x (M x K), frozen W (N x K, dense or NF4), bias b, n adapters stacked as A (n x R x K) and
B (n x N x R) (each padded with zeros to the largest rank R), scalings s (n,) and one adapter index
per row i (M,), -1 for a row that runs the base layer alone:

    S[m] = x[m] A[i_m]^T                 Y[m] = x[m] W^T + b + s[i_m] S[m] B[i_m]^T

1. ``_lora_mixed_shrink_kernel``: one program per row and rank chunk gathers its adapter's A rows
   (a matrix-vector product: rows of one tile may belong to different adapters, so no tl.dot);
   S is stored in x's dtype, as the single-adapter op stores it. Base rows store zeros.
2. ``_lora_mixed_forward_kernel``: the base GEMM tile x W^T (tl.dot, the NF4 weight decoded in
   registers, read once for all adapters), then the expand gathered per row: a (rows x outs x
   ranks) tile of B, each row's from its own adapter, multiplied with S and summed over ranks,
   scaled per row, plus the bias, one store.
   For decode batches (at most ``DECODE_MAX_M`` rows) the base GEMM is split over K instead, as
   the single-adapter decode path splits it (kernels/lora_linear_decode.py), so that a few rows
   still keep the GPU's memory system busy: ``_lora_mixed_partial_kernel`` writes fp32 partial
   sums per K-slice, and ``_lora_mixed_epilogue_kernel`` sums them in a fixed order and adds the
   same gathered expand and bias.

Prefill-sized batches (``segmented``: at least SEGMENT_MIN_ROWS rows per adapter on average) take
segments instead: ``segment_tiles`` sorts the rows by adapter on the device and cuts each
adapter's rows into tiles of at most BLOCK_M; ``_lora_mixed_segment_shrink_kernel`` and
``_lora_mixed_segment_forward_kernel`` then run the single-adapter shrink and forward on each
tile (tl.dot with the tile's adapter's A and B), the rows gathered from x and stored at their own
positions of S and Y.

Padded ranks add exact zeros, so a row's result does not depend on the other adapters of the batch.
Operands in x's dtype accumulate in fp32 (products of the gathered parts in fp32: bf16 operands are
widened before multiplying).
"""

import torch
import triton
import triton.language as tl

from . import _common
from ._common import store_rounded
from ._weight import (decoding_flags, frozen_codes, gemm_operand, load_gemm_tile, precision,
                      weight_args)
from .nf4_dequantize import load_nested_offset
from .lora_linear import BLOCK_R
from .lora_linear_decode import (decode_tile, partial_options, partial_stages, prefetch_words,
                                 split_costs, split_k, store_partial_base_gemm)

# One program per row (and rank block): a decode batch is a few programs, one per SM at most, so
# each takes 16 warps (an SM's schedulers kept issuing while loads are in flight) and a BLOCK_K
# of 512 that gives them all work: H100, 16 rows over 16 adapters, 6.8 -> 2.6 us (static model,
# estimates, was 4 warps and 128).
SHRINK = {"BLOCK_K": 512, "BLOCK_R": 16, "num_warps": 16}
# BLOCK_M 16: decode batches are a few rows, and the gathered B tile is BLOCK_M x BLOCK_N x
# EXPAND_R values in registers (4096: 32 fp32 per thread with 4 warps). BLOCK_N 32, not 64: with
# 64 the NF4-nested tile decode took 254 registers per thread on sm_80 / sm_90 (at the limit;
# compiled on CPU, bench.static), with 32 it takes 128 and leaves four CTAs per SM. Not measured
# on a GPU yet.
FORWARD = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "EXPAND_R": 8, "num_warps": 4,
           "num_stages": 2}
# Decode: all rows in one M block of 16; the split-K partial GEMM takes the single-adapter decode
# path's tile (kernels/lora_linear_decode.py's ``decode_tile``), the epilogue the forward's
# expand tile.
DECODE_MAX_M = 16
PARTIAL_WARPS = 4  # its stages: lora_linear_decode.partial_stages
EPILOGUE = {"BLOCK_M": 16, "BLOCK_N": 32, "EXPAND_R": 8, "num_warps": 4}
# PROVISIONAL, not yet measured: average rows per stacked adapter from which a batch (of more
# than DECODE_MAX_M rows) takes the segmented path. A segment fills tiles of BLOCK_M rows (64):
# below ~16 rows per adapter most of a tile would be masked rows, while the per-row path's tiles
# of 16 rows stay full. The crossover is for bench/lora_mixed.py's segment cases to measure.
SEGMENT_MIN_ROWS = 16


# The segmented path's tiles, per target and x's dtype: one config (the tile table is built for
# its BLOCK_M, so it is not autotuned). The forward is the single-adapter forward's GEMM with its
# rows gathered by segment, on its 64 x 128 x 64 tile (each step's fixed work amortized over
# more decoded elements; instructions per NF4 / nested element: sm_90 at 64 x 64 12.3 nested;
# sm_89 at 64 x 64 x 32 9.7 / 11.1, at 64 x 128 x 64 6.9 / 7.4; both tensor-bound on RTX 4090,
# 3696 us at 4096 x 4096 x 14336, model). The shrink takes the same BLOCK_M.

def segment_forward_config(target, dtype):
    if target.arch in (80, 86, 89, 90) and dtype.itemsize == 2:
        return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}


def segment_shrink_config(target, dtype):
    return {"BLOCK_K": 64, "num_warps": 4, "num_stages": 2}


@triton.jit
def _lora_mixed_shrink_kernel(x_ptr, a_ptr, index_ptr, s_ptr, K, R, stride_xm, stride_xk,
                              stride_aa, stride_ar, stride_ak, BLOCK_K: tl.constexpr,
                              BLOCK_R: tl.constexpr):
    """S[m, ranks] = x[m] A[i_m, ranks]^T (zeros for a base row), in x's dtype."""
    row = tl.program_id(0)
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    adapter = tl.load(index_ptr + row).to(tl.int64)
    # A base row (-1) reads no rank of adapter 0 and so stores zeros.
    ranks_used = tl.where(adapter >= 0, R, 0)
    adapter = tl.maximum(adapter, 0)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + cols * stride_xk, mask=cols < K, other=0.0)
        a = tl.load(a_ptr + adapter * stride_aa + ranks[:, None] * stride_ar + cols[None, :] * stride_ak,
                    mask=(ranks[:, None] < ranks_used) & (cols[None, :] < K), other=0.0)
        acc += tl.sum(a.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    store_rounded(s_ptr + row * R + ranks, acc, ranks < R)


@triton.jit
def _lora_mixed_forward_kernel(x_ptr, w_ptr, s_ptr, b_ptr, index_ptr, scaling_ptr, bias_ptr, y_ptr,
                               absmax_ptr, pairs_ptr, nested_code_ptr, nested_absmax_ptr,
                               offset_ptr, M, N, K, R, stride_xm, stride_xk, stride_wn, stride_wk,
                               stride_ba, stride_bn, stride_br, block_shift, nested_shift,
                               HAS_BIAS: tl.constexpr, NF4: tl.constexpr, NESTED: tl.constexpr,
                               SCALE_GROUP: tl.constexpr, INLINE_PTX: tl.constexpr,
                               NIBBLE_LOOKUP: tl.constexpr,
                               PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               EXPAND_R: tl.constexpr):
    """Y = x W^T + b + s[i] S B[i]^T per row, one store per output tile."""
    dtype = x_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    outs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    codes = frozen_codes(pairs_ptr, NF4, SCALE_GROUP, NIBBLE_LOOKUP, INLINE_PTX)
    nested_offset = load_nested_offset(offset_ptr, NESTED)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0)
        w = load_gemm_tile(w_ptr, tl.program_id(1) * BLOCK_N, k0, N, K, stride_wn, stride_wk,
                           absmax_ptr, codes, nested_code_ptr, nested_absmax_ptr, nested_offset,
                           block_shift, nested_shift, NF4, NESTED, SCALE_GROUP, INLINE_PTX,
                           NIBBLE_LOOKUP, BLOCK_N, BLOCK_K)
        w = gemm_operand(w, dtype, NF4, INLINE_PTX)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    _add_expand_bias_and_store(acc, rows, outs, s_ptr, b_ptr, index_ptr, scaling_ptr, bias_ptr,
                               y_ptr, M, N, R, stride_ba, stride_bn, stride_br, HAS_BIAS, BLOCK_M,
                               BLOCK_N, EXPAND_R)


@triton.jit
def _add_expand_bias_and_store(acc, rows, outs, s_ptr, b_ptr, index_ptr, scaling_ptr, bias_ptr,
                               y_ptr, M, N, R, stride_ba, stride_bn, stride_br,
                               HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, EXPAND_R: tl.constexpr):
    """Store acc (x W^T of the tile) + s[i] S B[i]^T + b: B gathered per row from its adapter."""
    adapters = tl.load(index_ptr + rows, mask=rows < M, other=-1).to(tl.int64)
    used = adapters >= 0
    adapters = tl.maximum(adapters, 0)
    lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, EXPAND_R):
        ranks = r0 + tl.arange(0, EXPAND_R)
        s = tl.load(s_ptr + rows[:, None] * R + ranks[None, :],
                    mask=used[:, None] & (ranks[None, :] < R), other=0.0)
        b = tl.load(b_ptr + adapters[:, None, None] * stride_ba + outs[None, :, None] * stride_bn
                    + ranks[None, None, :] * stride_br,
                    mask=used[:, None, None] & (outs[None, :, None] < N)
                    & (ranks[None, None, :] < R), other=0.0)
        lora += tl.sum(s.to(tl.float32)[:, None, :] * b.to(tl.float32), axis=2)
    scaling = tl.load(scaling_ptr + adapters, mask=used, other=0.0)
    acc += scaling[:, None] * lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + outs, mask=outs < N, other=0.0).to(tl.float32)[None, :]
    store_rounded(y_ptr + rows[:, None] * N + outs[None, :], acc,
                  (rows[:, None] < M) & (outs[None, :] < N))


@triton.jit
def _lora_mixed_partial_kernel(x_ptr, w_ptr, partial_ptr, absmax_ptr, pairs_ptr, nested_code_ptr,
                               nested_absmax_ptr, offset_ptr, M, N, K, k_per_split, stride_xm,
                               stride_xk, stride_wn, stride_wk, block_shift, nested_shift,
                               NF4: tl.constexpr, NESTED: tl.constexpr, SCALE_GROUP: tl.constexpr,
                               INLINE_PTX: tl.constexpr, NIBBLE_LOOKUP: tl.constexpr,
                               PRECISION: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               EVEN_K: tl.constexpr, PREFETCH_WORDS: tl.constexpr):
    """Partial x W^T (fp32) of every row over one K-slice: (splits, M, N). The single-adapter
    decode kernel's base-GEMM step, without its shrink (each row's is gathered here instead)."""
    store_partial_base_gemm(x_ptr, w_ptr, partial_ptr, absmax_ptr, pairs_ptr, nested_code_ptr,
                            nested_absmax_ptr, offset_ptr, M, N, K, k_per_split, stride_xm,
                            stride_xk, stride_wn, stride_wk, block_shift, nested_shift, NF4, NESTED,
                            SCALE_GROUP, INLINE_PTX, NIBBLE_LOOKUP, PRECISION, BLOCK_M, BLOCK_N,
                            BLOCK_K, EVEN_K, PREFETCH_WORDS)


@triton.jit
def _lora_mixed_epilogue_kernel(partial_ptr, s_ptr, b_ptr, index_ptr, scaling_ptr, bias_ptr, y_ptr,
                                M, N, R, splits, stride_ba, stride_bn, stride_br,
                                HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, EXPAND_R: tl.constexpr):
    """Y = the partials summed in a fixed order (deterministic) + s[i] S B[i]^T + b."""
    rows = tl.arange(0, BLOCK_M)
    outs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for split in range(0, splits):
        acc += tl.load(partial_ptr + (split * M + rows[:, None]) * N + outs[None, :],
                       mask=(rows[:, None] < M) & (outs[None, :] < N), other=0.0)
    _add_expand_bias_and_store(acc, rows, outs, s_ptr, b_ptr, index_ptr, scaling_ptr, bias_ptr,
                               y_ptr, M, N, R, stride_ba, stride_bn, stride_br, HAS_BIAS, BLOCK_M,
                               BLOCK_N, EXPAND_R)


# Prefill: rows grouped by adapter (SGMV-style segments). Each program takes one tile of at most
# BLOCK_M rows of one segment (one adapter, or the base rows), named by a row of the tile table
# ``segment_tiles`` builds: (adapter, first, end) positions in the rows sorted by adapter, whose
# row ids ``order`` holds. A segment's rows share A and B, so the shrink and the expand are
# tl.dot tiles of that adapter's weights, read once per tile instead of once per row.

@triton.jit
def _segment_rows(tiles_ptr, order_ptr, BLOCK_M: tl.constexpr, REREAD: tl.constexpr = False):
    """(adapter, row ids, row mask, whether the tile has rows) of this program's tile
    (program_id(0)); an empty tile (a spare row of the table) masks every row out. REREAD: read
    again after a first call, the row ids loaded as volatile so that the compiler does not merge
    the two loads (and hold the ids in registers from the first to where these are used)."""
    tile = tl.program_id(0)
    adapter = tl.load(tiles_ptr + tile * 3).to(tl.int64)
    first = tl.load(tiles_ptr + tile * 3 + 1)
    end = tl.load(tiles_ptr + tile * 3 + 2)
    positions = first + tl.arange(0, BLOCK_M)
    valid = positions < end
    rows = tl.load(order_ptr + positions, mask=valid, other=0, volatile=REREAD).to(tl.int64)
    return adapter, rows, valid, first < end


@triton.jit
def _lora_mixed_segment_shrink_kernel(x_ptr, a_ptr, s_ptr, order_ptr, tiles_ptr, K, R, stride_xm,
                                      stride_xk, stride_aa, stride_ar, stride_ak,
                                      PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                                      BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """S[rows, ranks] = x[rows] A[adapter, ranks]^T for one segment tile (zeros for base rows),
    stored in x's dtype at the rows' own positions."""
    adapter, rows, valid, nonempty = _segment_rows(tiles_ptr, order_ptr, BLOCK_M)
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    # Base rows (adapter -1) and empty tiles skip the product: S is zeros there.
    k_end = tl.where(nonempty & (adapter >= 0), K, 0)
    adapter = tl.maximum(adapter, 0)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=valid[:, None] & (cols[None, :] < K), other=0.0)
        a = tl.load(a_ptr + adapter * stride_aa + ranks[:, None] * stride_ar + cols[None, :] * stride_ak,
                    mask=(ranks[:, None] < R) & (cols[None, :] < K), other=0.0)
        acc = tl.dot(x, tl.trans(a), acc, input_precision=PRECISION)
    store_rounded(s_ptr + rows[:, None] * R + ranks[None, :], acc,
                  valid[:, None] & (ranks[None, :] < R))


@triton.jit
def _lora_mixed_segment_forward_kernel(x_ptr, w_ptr, s_ptr, b_ptr, order_ptr, tiles_ptr,
                                       scaling_ptr, bias_ptr, y_ptr, absmax_ptr, pairs_ptr,
                                       nested_code_ptr, nested_absmax_ptr, offset_ptr, N, K, R,
                                       stride_xm, stride_xk, stride_wn, stride_wk, stride_ba,
                                       stride_bn, stride_br, block_shift, nested_shift,
                                       HAS_BIAS: tl.constexpr, NF4: tl.constexpr,
                                       NESTED: tl.constexpr, SCALE_GROUP: tl.constexpr,
                                       INLINE_PTX: tl.constexpr, NIBBLE_LOOKUP: tl.constexpr,
                                       PRECISION: tl.constexpr,
                                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                       BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """Y[rows] = x[rows] W^T + b + s[adapter] S[rows] B[adapter]^T for one segment tile."""
    dtype = x_ptr.dtype.element_ty
    adapter, rows, valid, nonempty = _segment_rows(tiles_ptr, order_ptr, BLOCK_M)
    outs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    # The expand first, in the accumulator itself, as kernels/lora_linear.py's forward: summed
    # apart into a second accumulator after the base GEMM, sm_89's 64 x 128 tiles spilled.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    used = nonempty & (adapter >= 0)
    adapter = tl.maximum(adapter, 0)
    for r0 in range(0, tl.where(used, R, 0), BLOCK_R):  # base rows: no expand
        ranks = r0 + tl.arange(0, BLOCK_R)
        s = tl.load(s_ptr + rows[:, None] * R + ranks[None, :],
                    mask=valid[:, None] & (ranks[None, :] < R), other=0.0)
        b = tl.load(b_ptr + adapter * stride_ba + outs[:, None] * stride_bn + ranks[None, :] * stride_br,
                    mask=(outs[:, None] < N) & (ranks[None, :] < R), other=0.0)
        acc = tl.dot(s, tl.trans(b), acc, input_precision=PRECISION)
    acc *= tl.load(scaling_ptr + adapter, mask=used, other=0.0)
    # Positions past the segment's end read row 0 (``_segment_rows``' other) and are never
    # stored, so x's loads need no row mask; the rows' bases are computed once, not per step.
    x_rows = x_ptr + rows[:, None] * stride_xm
    codes = frozen_codes(pairs_ptr, NF4, SCALE_GROUP, NIBBLE_LOOKUP, INLINE_PTX)
    nested_offset = load_nested_offset(offset_ptr, NESTED)
    for k0 in range(0, tl.where(nonempty, K, 0), BLOCK_K):  # an empty tile reads no weight
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + cols[None, :] * stride_xk, mask=cols[None, :] < K, other=0.0)
        w = load_gemm_tile(w_ptr, tl.program_id(1) * BLOCK_N, k0, N, K, stride_wn, stride_wk,
                           absmax_ptr, codes, nested_code_ptr, nested_absmax_ptr, nested_offset,
                           block_shift, nested_shift, NF4, NESTED, SCALE_GROUP, INLINE_PTX,
                           NIBBLE_LOOKUP, BLOCK_N, BLOCK_K)
        w = gemm_operand(w, dtype, NF4, INLINE_PTX)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + outs, mask=outs < N, other=0.0).to(tl.float32)[None, :]
    # The row ids read again for the store: held from the first read across the K loop, they
    # took registers its decode needed (sm_89, nested NF4: 8 bytes of stack).
    _, rows, valid, _ = _segment_rows(tiles_ptr, order_ptr, BLOCK_M, REREAD=True)
    store_rounded(y_ptr + rows[:, None] * N + outs[None, :], acc,
                  valid[:, None] & (outs[None, :] < N))


def segmented(rows, adapters):
    """Whether a batch of ``rows`` over ``adapters`` stacked adapters takes the segmented path: more
    than a decode batch, and on average at least SEGMENT_MIN_ROWS rows per adapter. Decided from
    the shapes alone (the rows' actual spread is on the device: reading it would sync)."""
    return rows > DECODE_MAX_M and rows >= SEGMENT_MIN_ROWS * adapters


def lora_mixed_forward(x, w, lora_a, lora_b, scalings, index, bias, s, y, nf4=None):
    """Y (M x N, contiguous) and S (M x R, contiguous) for contiguous x (M x K); ``lora_a``
    (n x R x K) and ``lora_b`` (n x N x R) in x's dtype, any strides; ``scalings`` fp32 (n,);
    ``index`` int32 or int64 (M,), in [-1, n), -1 for base rows; ``nf4`` as in
    ``_weight.weight_args``. Segments for prefill-sized batches (``segmented``), else per-row
    gathers (split over K for decode batches)."""
    forward = segmented_forward if segmented(x.shape[0], lora_a.shape[0]) else gathered_forward
    forward(x, w, lora_a, lora_b, scalings, index, bias, s, y, nf4)


def segment_tiles(index, adapters, block_m):
    """(order, tiles) for the segmented kernels, computed on the device (no sync: the grid is
    the table's length whatever the spread). ``order``: the row ids sorted by adapter (stable,
    base rows first). ``tiles``: int32 (T x 3), per tile its adapter (-1: base rows) and its
    first and end positions in ``order``, at most ``block_m`` rows of one segment. Each segment
    (the base's and each adapter's) leaves at most one partial tile, so T = cdiv(M, block_m) +
    adapters + 1 tiles cover any spread; the spare ones are empty (first == end == 0)."""
    device = index.device
    sorted_index, order = torch.sort(index.long(), stable=True)
    segment = torch.arange(-1, adapters, device=device)
    starts = torch.searchsorted(sorted_index, segment)
    ends = torch.searchsorted(sorted_index, segment, right=True)
    segment_tiles = (ends - starts + block_m - 1) // block_m
    tiles_before = torch.cumsum(segment_tiles, 0)  # tiles of the segments up to and with each
    tile = torch.arange(triton.cdiv(index.shape[0], block_m) + adapters + 1, device=device)
    owner = torch.searchsorted(tiles_before, tile, right=True).clamp(max=adapters)
    spare = tile >= tiles_before[-1]
    first = starts[owner] + (tile - tiles_before[owner] + segment_tiles[owner]) * block_m
    end = torch.minimum(ends[owner], first + block_m)
    table = torch.stack((owner - 1, torch.where(spare, 0, first), torch.where(spare, 0, end)), 1)
    return order, table.to(torch.int32)


def segmented_forward(x, w, lora_a, lora_b, scalings, index, bias, s, y, nf4=None):
    """``lora_mixed_forward`` with the rows grouped by adapter: the segmented shrink, then the
    base GEMM and expand per segment tile (rows gathered from x and scattered to S and Y)."""
    M, K = x.shape
    N, R = lora_b.shape[1], lora_b.shape[2]
    target = _common.target(x.device)
    config = segment_forward_config(target, x.dtype)
    shrink = segment_shrink_config(target, x.dtype)
    order, tiles = segment_tiles(index, lora_a.shape[0], config["BLOCK_M"])
    prec = precision(x.dtype)
    _lora_mixed_segment_shrink_kernel[(tiles.shape[0], triton.cdiv(R, BLOCK_R))](
        x, lora_a, s, order, tiles, K, R, x.stride(0), x.stride(1), *lora_a.stride(),
        PRECISION=prec, BLOCK_M=config["BLOCK_M"], BLOCK_R=BLOCK_R, **shrink)
    flags, (absmax, pairs, nested_code, nested_absmax, offset, shift, nested_shift), \
        (stride_wn, stride_wk) = weight_args(w, nf4)
    _lora_mixed_segment_forward_kernel[(tiles.shape[0], triton.cdiv(N, config["BLOCK_N"]))](
        x, w, s, lora_b, order, tiles, scalings, y if bias is None else bias, y, absmax, pairs,
        nested_code, nested_absmax, offset, N, K, R, x.stride(0), x.stride(1), stride_wn,
        stride_wk, *lora_b.stride(), shift, nested_shift, HAS_BIAS=bias is not None, **flags,
        **decoding_flags(nf4, K, config["BLOCK_K"], target), PRECISION=prec, BLOCK_R=BLOCK_R,
        **config, enable_fp_fusion=False)


def gathered_forward(x, w, lora_a, lora_b, scalings, index, bias, s, y, nf4=None):
    """``lora_mixed_forward`` with each row's adapter gathered per row (BGMV): the per-row
    shrink, then the tiled base GEMM with the gathered expand, or for decode batches (at most
    DECODE_MAX_M rows) the split-K base GEMM and the epilogue."""
    M, K = x.shape
    N, R = lora_b.shape[1], lora_b.shape[2]
    grid = (M, triton.cdiv(R, SHRINK["BLOCK_R"]))
    _lora_mixed_shrink_kernel[grid](x, lora_a, index, s, K, R, x.stride(0), x.stride(1),
                                    *lora_a.stride(), **SHRINK)
    flags, (absmax, pairs, nested_code, nested_absmax, offset, shift, nested_shift), \
        (stride_wn, stride_wk) = weight_args(w, nf4)
    target = _common.target(x.device)
    bias_arg = y if bias is None else bias
    if M > DECODE_MAX_M:
        grid = (triton.cdiv(M, FORWARD["BLOCK_M"]), triton.cdiv(N, FORWARD["BLOCK_N"]))
        _lora_mixed_forward_kernel[grid](
            x, w, s, lora_b, index, scalings, bias_arg, y, absmax, pairs, nested_code,
            nested_absmax, offset, M, N, K, R, x.stride(0), x.stride(1), stride_wn, stride_wk,
            *lora_b.stride(), shift, nested_shift, HAS_BIAS=bias is not None, **flags,
            **decoding_flags(nf4, K, FORWARD["BLOCK_K"], target), PRECISION=precision(x.dtype),
            **FORWARD, enable_fp_fusion=False)
        return
    tile = decode_tile(target, nf4, x.dtype, K)
    n_tiles = triton.cdiv(N, tile["BLOCK_N"])
    splits, steps_per_split = split_k(n_tiles, triton.cdiv(K, tile["BLOCK_K"]),
                                      target.multiprocessors, split_costs(target, nf4, tile, M))
    partial = torch.empty(splits, M, N, dtype=torch.float32, device=x.device)
    decoding = decoding_flags(nf4, K, tile["BLOCK_K"], target)
    _lora_mixed_partial_kernel[(n_tiles, splits)](
        x, w, partial, absmax, pairs, nested_code, nested_absmax, offset, M, N, K,
        steps_per_split * tile["BLOCK_K"], x.stride(0), x.stride(1), stride_wn, stride_wk, shift,
        nested_shift, **flags, **decoding, PRECISION=precision(x.dtype), **tile,
        EVEN_K=K % tile["BLOCK_K"] == 0, PREFETCH_WORDS=prefetch_words(target, nf4, w),
        num_warps=PARTIAL_WARPS, num_stages=partial_stages(target, nf4, decoding),
        **partial_options(target, nf4), enable_fp_fusion=False)
    _lora_mixed_epilogue_kernel[(triton.cdiv(N, EPILOGUE["BLOCK_N"]),)](
        partial, s, lora_b, index, scalings, bias_arg, y, M, N, R, splits, *lora_b.stride(),
        HAS_BIAS=bias is not None, **EPILOGUE, enable_fp_fusion=False)
