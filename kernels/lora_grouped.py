"""Grouped LoRA GEMM over a mixture-of-experts block's experts, forward and backward, one launch
per step for all experts.

Rows (token, expert) pairs are sorted by expert: rows offsets[e] .. offsets[e + 1] go to expert
e. For x (S x K), frozen W (E x N x K, any strides), adapters A_e (r x K) and B_e (N x r) and
scaling s (every per-expert operand is read through (expert, row, column) strides: A in PEFT's
``target_parameters`` layout as it is, B as ``lowrank.ops.lora_grouped`` lays it out):

    S = x A_e^T          Y = x W_e^T + s S B_e^T
    dS = s dY B_e        dX = dY W_e + dS A_e       dA_e = dS_e^T x_e     dB_e = s dY_e^T S_e

- One program tile of rows never spans two experts: each expert's rows are cut into BLOCK_M
  tiles, listed by ``tile_schedule`` (torch ops on the device, no host sync: the grid is the
  upper bound cdiv(S, BLOCK_M) + E and the tiles past the last do no work).
- The LoRA expand S (s B_e)^T is accumulated into the output tile's accumulator before its one
  store (B_e scaled in fp32, then rounded to x's dtype once); S comes from the grouped shrink,
  or from the GEMM's own K loop (``grouped_forward``: SHRINK) where ``fuses_shrink`` says. dX is the same kernel over W_e
  read transposed, expanding dS with A_e. dA and dB are per-expert reductions over the expert's
  rows, written through strides straight into PEFT's layout.
- dS and dB are one pass over dY (``grouped_output_grad``): each program owns dB_e for a chunk of
  dY's columns and writes that chunk's share of dS as fp32 partials, which the launcher sums in a
  fixed order (no atomics: the sums do not depend on the order programs run in). Separately they
  read dY twice; dY (rows x N) is the largest operand either reads. Or both come from the dX
  GEMM's own pass over dY (``grouped_grad_input``: the GEMM kernel's OUTPUT_GRAD, dB as
  per-row-tile partials summed in tile order), where ``fuses_output_grad`` says it pays.
- The gather of x's rows can be the kernels' (``row_index``): sorted row i reads x's row
  row_index[i], so the forward and dA read the tokens' hidden states where they are (no sorted
  copy of x: one row per token, not one per (token, expert) pair).
- The experts' biases (gpt-oss's, frozen) can be the forward GEMM's: bias_e added to the fp32
  accumulator before the one store (BIAS), instead of a gather and an add over Y in torch.
- Operands in x's dtype, fp32 accumulation; dA and dB in fp32.
"""

import torch
import triton
import triton.language as tl

from . import _common
from ._common import cast_rounded, store_rounded
from ._weight import precision

BLOCK_R = 16  # ranks in chunks of 16 (the smallest tl.dot size): any rank works
GROUP_TILES = 8  # row tiles the GEMM takes over every column tile at once (``_tile_and_column``)


def gemm_configs(target, dtype):
    """The grouped GEMM's configs, which ``_common.launch`` autotunes over on a GPU. All share one
    BLOCK_M: the tile list (``tile_schedule``) is built for it before the launch."""
    if target.arch == 90 and dtype.itemsize == 2:
        # wgmma tiles. A GEMM over ~256 rows per expert is bound by the tiles' loads (the static
        # model: L2); 128 x 256 reads 3/4 of 128 x 128's bytes per flop, and with one
        # accumulator it does not spill (Qwen3-30B-A3B's gate_up fwd+bwd 1050 -> 813 us, model).
        # 128 x 128 keeps small and ragged launches (fewer tiles than SMs) filling the GPU.
        return [{"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
                {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}]
    return [{"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}]


def grad_input_configs(target, dtype):
    """The configs of the dX GEMM that computes dS and dB too (``grouped_grad_input``): the
    GEMM's, but 128 x 128 tiles off sm_90 in 16-bit dtypes, where dS's rank-r product costs r /
    BLOCK_N more MMAs in every column tile (a quarter at the GEMM's 64 wide tiles) and dB's
    partials are N x r per BLOCK_M rows (half as many with 128). BLOCK_K 16: with 32, 174
    registers, one CTA per SM on sm_89; with 16, 126 and two (same model time: DRAM-bound)."""
    if target.arch is not None and target.arch != 90 and dtype.itemsize == 2:
        return [{"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 16, "num_warps": 8, "num_stages": 3}]
    return gemm_configs(target, dtype)


def shrink_config(target, dtype):
    return {"BLOCK_M": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}


def output_grad_config(target, dtype):
    # 256 columns of dY per chunk in 16-bit dtypes: the fp32 dS partials (one per chunk) stay a
    # small fraction of dY's bytes (rank 16: 1/8 of a bf16 dY's).
    block_n = 256 if dtype.itemsize == 2 else 128
    # 4 warps off sm_90 (sm_89, Qwen3-30B-A3B's gate_up: 128 registers, three CTAs per SM, B_e's
    # chunk read from the op's E x N x r copy; from PEFT's layout, strided, 8 warps took 138 and
    # one CTA); sm_90 keeps 8 (a 600-row launch issues faster with them).
    warps = 8 if target is not None and target.arch == 90 else 4
    return {"BLOCK_M": 32, "BLOCK_N": block_n, "num_warps": warps, "num_stages": 3}


def grad_b_sum_config(target, dtype):
    return {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


def weight_grad_config(target, dtype):
    # Three stages: two leave 8 bytes of stack on sm_90 for ragged bf16 (triton 3.9).
    return {"BLOCK_M": 64, "BLOCK_Q": 64, "num_warps": 4, "num_stages": 3}


def tile_schedule(offsets, rows, block_m):
    """(tile_expert, tile_start), int32, cdiv(rows, block_m) + E entries each, for ``offsets``
    (E + 1 row offsets, on the device): tile t covers rows tile_start[t] .. min(tile_start[t] +
    block_m, offsets[e + 1]) of expert e = tile_expert[t]; tiles past the last have expert -1.
    Torch ops on the device, so that no launch waits for the host to read the counts."""
    experts = offsets.numel() - 1
    offsets = offsets.to(torch.int64)
    tiles = (offsets[1:] - offsets[:-1] + block_m - 1) // block_m
    ends = torch.cumsum(tiles, 0)
    index = torch.arange(triton.cdiv(rows, block_m) + experts, device=offsets.device)
    expert = torch.searchsorted(ends, index, right=True)
    used = expert < experts
    expert = expert.clamp(max=experts - 1)
    start = offsets[expert] + (index - (ends[expert] - tiles[expert])) * block_m
    return (torch.where(used, expert, -1).to(torch.int32),
            torch.where(used, start, 0).to(torch.int32))


@triton.jit
def _tile_rows(tile, tile_expert_ptr, tile_start_ptr, offsets_ptr, BLOCK_M: tl.constexpr):
    """(expert, row indices, row mask) of row tile ``tile``; an unused tile has no rows and
    expert 0 (whose pointers are then valid but never dereferenced unmasked)."""
    expert = tl.load(tile_expert_ptr + tile)
    used = expert >= 0
    expert = tl.where(used, expert, 0)
    start = tl.load(tile_start_ptr + tile)
    end = tl.where(used, tl.load(offsets_ptr + expert + 1), 0)
    rows = start + tl.arange(0, BLOCK_M)
    return expert, rows, rows < end


@triton.jit
def _source_rows(index_ptr, rows, row_mask, GATHER: tl.constexpr):
    """x's rows (int64) for sorted ``rows``: row_index[rows] when the kernel gathers, else them."""
    if GATHER:
        return tl.load(index_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    return rows.to(tl.int64)


@triton.jit
def _grouped_shrink_kernel(x_ptr, index_ptr, f_ptr, out_ptr, tile_expert_ptr, tile_start_ptr,
                           offsets_ptr, K, R, stride_xm, stride_xk, stride_fe, stride_fr,
                           stride_fk, PRECISION: tl.constexpr, GATHER: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """out = x F_e^T (S x R, contiguous, in out's dtype) for the rows of expert e; F_e
    (R x K) at f_ptr + e stride_fe; x's rows through index_ptr if GATHER. One rank chunk per
    program (axis 1)."""
    expert, rows, row_mask = _tile_rows(tl.program_id(0), tile_expert_ptr, tile_start_ptr,
                                        offsets_ptr, BLOCK_M)
    x_rows = x_ptr + _source_rows(index_ptr, rows, row_mask, GATHER)[:, None] * stride_xm
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    f_base = f_ptr + expert.to(tl.int64) * stride_fe
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_len = tl.where(tl.max(row_mask.to(tl.int32), 0) > 0, K, 0)  # an unused tile loops no K
    for k0 in range(0, k_len, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + cols[None, :] * stride_xk,
                    mask=row_mask[:, None] & (cols[None, :] < K), other=0.0)
        f = tl.load(f_base + ranks[:, None] * stride_fr + cols[None, :] * stride_fk,
                    mask=(ranks[:, None] < R) & (cols[None, :] < K), other=0.0)
        acc = tl.dot(x, tl.trans(f.to(x.dtype)), acc, input_precision=PRECISION)
    store_rounded(out_ptr + rows[:, None].to(tl.int64) * R + ranks[None, :], acc,
                  row_mask[:, None] & (ranks[None, :] < R))


@triton.jit
def _tile_and_column(GROUP_TILES: tl.constexpr):
    """(row tile, column tile) of this program of a (row tiles, column tiles) grid, taken in
    groups of GROUP_TILES consecutive row tiles (one expert's or a few experts': the tile list
    is sorted by expert), each group over every column tile before the next. Programs start
    roughly in launch order (axis 0 fastest): a group's rows of x and its experts' W_e column
    strips are read from DRAM once and re-read from L2, where axis 0 as the row tile would sweep
    all of x once per column tile (gpt-oss-20b's gate_up: x 94 MB against H100's 50 MB L2)."""
    tiles = tl.num_programs(0)
    per_group = GROUP_TILES * tl.num_programs(1)
    pid = tl.program_id(1) * tiles + tl.program_id(0)
    first = (pid // per_group) * GROUP_TILES
    group_tiles = tl.minimum(tiles - first, GROUP_TILES)
    return first + (pid % per_group) % group_tiles, (pid % per_group) // group_tiles


@triton.jit
def _grouped_gemm_kernel(x_ptr, index_ptr, w_ptr, s_ptr, g_ptr, y_ptr, tile_expert_ptr,
                         tile_start_ptr, offsets_ptr, b_ptr, grad_s_ptr, grad_b_partial_ptr, N, K,
                         R, scaling, stride_xm, stride_xk, stride_we, stride_wn, stride_wk,
                         stride_ge, stride_gn, stride_gr, stride_be, stride_bk, stride_br,
                         PRECISION: tl.constexpr, GATHER: tl.constexpr,
                         SHRINK: tl.constexpr, OUTPUT_GRAD: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                         RANK_PAD: tl.constexpr, bias_ptr, stride_bias_e, stride_bias_n,
                         BIAS: tl.constexpr, GROUP_TILES: tl.constexpr):
    """Y = x W_e^T + scaling S G_e^T for the rows of expert e: W_e (N x K) at w_ptr + e stride_we,
    G_e (N x R) at g_ptr + e stride_ge, S (S x R, contiguous); x's rows through index_ptr if
    GATHER; one store per output tile.
    Forward: W_e, G_e = B_e; dX: W_e read transposed, G_e = A_e^T, S = dS, scaling 1.

    SHRINK (forward only): S = x A_e^T comes from this pass over x instead of the grouped
    shrink's: accumulated in the K loop (A_e^T, K x R, at b_ptr + e stride_be, rank-padded to
    RANK_PAD) by every column tile for itself, rounded to x's dtype, stored by column tile 0 at
    grad_s_ptr (for the backward), then expanded with scaling B_e as above.

    OUTPUT_GRAD (dX only, x = dY, S = the forward's S, ``scaling`` LoRA's): LoRA's products with dY
    come from this pass over dY instead of one of their own (``grouped_grad_input``):

        dS = scaling dY_e B_e     (B_e, K x R, at b_ptr + e stride_be), in the K loop, every
                                  column tile for itself (the expand needs all of it), rank-padded
                                  to RANK_PAD; stored (x's dtype) by column tile 0, for dA
        dX = dY W_e + dS A_e      (G_e = A_e^T, unscaled)
        grad_b_partial[tile][c] = scaling dY_tile[:, c]^T S_tile   (fp32) for the BLOCK_K column
                                  chunks c of dY this column tile owns (every num_programs(1)-th),
                                  summed over an expert's row tiles by ``_grouped_grad_b_sum_kernel``

    BIAS (forward only): Y += bias_e, the expert's bias row (N, at bias_ptr + e stride_bias_e),
    added to the fp32 accumulator before the one rounding and store (transformers' experts add
    it right after each projection, before the gate and the routing weights).
    """
    dtype = x_ptr.dtype.element_ty
    tile, column = _tile_and_column(GROUP_TILES)
    expert, rows, row_mask = _tile_rows(tile, tile_expert_ptr, tile_start_ptr, offsets_ptr, BLOCK_M)
    outs = column * BLOCK_N + tl.arange(0, BLOCK_N)
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    g_base = g_ptr + expert.to(tl.int64) * stride_ge
    x_rows = x_ptr + _source_rows(index_ptr, rows, row_mask, GATHER)[:, None] * stride_xm
    used = tl.max(row_mask.to(tl.int32), 0) > 0
    k_len = tl.where(used, K, 0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SHRINK or OUTPUT_GRAD:
        all_ranks = tl.arange(0, RANK_PAD)
        b_base = b_ptr + expert.to(tl.int64) * stride_be
        grad_s = tl.zeros((BLOCK_M, RANK_PAD), dtype=tl.float32)
    for k0 in range(0, k_len, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + cols[None, :] * stride_xk,
                    mask=row_mask[:, None] & (cols[None, :] < K), other=0.0)
        w = tl.load(w_base + outs[:, None] * stride_wn + cols[None, :] * stride_wk,
                    mask=(outs[:, None] < N) & (cols[None, :] < K), other=0.0)
        acc = tl.dot(x, tl.trans(w.to(dtype)), acc, input_precision=PRECISION)
        if SHRINK or OUTPUT_GRAD:
            b = tl.load(b_base + cols[:, None] * stride_bk + all_ranks[None, :] * stride_br,
                        mask=(cols[:, None] < K) & (all_ranks[None, :] < R), other=0.0)
            grad_s = tl.dot(x, b.to(dtype), grad_s, input_precision=PRECISION)
    if SHRINK or OUTPUT_GRAD:
        rank_mask = row_mask[:, None] & (all_ranks[None, :] < R)
        # Rounded once to x's dtype, as S and dS are stored and as the separate passes' are.
        if OUTPUT_GRAD:
            grad_s = grad_s * scaling
        grad_s = cast_rounded(grad_s, dtype)
        if column == 0:
            tl.store(grad_s_ptr + rows[:, None].to(tl.int64) * R + all_ranks[None, :], grad_s,
                     mask=rank_mask)
        g = tl.load(g_base + outs[:, None] * stride_gn + all_ranks[None, :] * stride_gr,
                    mask=(outs[:, None] < N) & (all_ranks[None, :] < R), other=0.0)
        if SHRINK:
            g = g.to(tl.float32) * scaling
        acc = tl.dot(grad_s, tl.trans(g.to(dtype)), acc, input_precision=PRECISION)
    if OUTPUT_GRAD:
        # dB's share of this column tile: its chunks of dY again (this tile's rows, just read:
        # L2 hits), against S's rows; the chunks dealt round-robin over the column tiles.
        s = tl.load(s_ptr + rows[:, None].to(tl.int64) * R + all_ranks[None, :], mask=rank_mask,
                    other=0.0)
        partial_base = grad_b_partial_ptr + tile.to(tl.int64) * K * R
        for k0 in range(column * BLOCK_K, k_len, tl.num_programs(1) * BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_rows + cols[None, :] * stride_xk,
                        mask=row_mask[:, None] & (cols[None, :] < K), other=0.0)
            part = tl.dot(tl.trans(x), s, input_precision=PRECISION)
            tl.store(partial_base + cols[:, None] * R + all_ranks[None, :], part * scaling,
                     mask=(cols[:, None] < K) & (all_ranks[None, :] < R))
    if not (SHRINK or OUTPUT_GRAD):
        # The expand accumulates into the GEMM's accumulator, G_e scaled in fp32 before its one
        # rounding to x's dtype: a second accumulator of the tile's size would double its
        # registers (128 x 256 tiles spill on sm_90 with two).
        for r0 in range(0, tl.where(used, R, 0), BLOCK_R):
            ranks = r0 + tl.arange(0, BLOCK_R)
            s = tl.load(s_ptr + rows[:, None].to(tl.int64) * R + ranks[None, :],
                        mask=row_mask[:, None] & (ranks[None, :] < R), other=0.0)
            g = tl.load(g_base + outs[:, None] * stride_gn + ranks[None, :] * stride_gr,
                        mask=(outs[:, None] < N) & (ranks[None, :] < R), other=0.0)
            g = (g.to(tl.float32) * scaling).to(dtype)
            acc = tl.dot(s, tl.trans(g), acc, input_precision=PRECISION)
    if BIAS:
        bias = tl.load(bias_ptr + expert.to(tl.int64) * stride_bias_e + outs * stride_bias_n,
                       mask=outs < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    store_rounded(y_ptr + rows[:, None].to(tl.int64) * N + outs[None, :], acc,
                  row_mask[:, None] & (outs[None, :] < N))


@triton.jit
def _grouped_grad_b_sum_kernel(partial_ptr, tile_offsets_ptr, grad_b_ptr, N, R, stride_oe,
                               stride_on, stride_or, BLOCK_N: tl.constexpr,
                               RANK_PAD: tl.constexpr):
    """dB_e[chunk] = the sum of grad_b_partial (tiles x N x R, fp32) over expert e's row tiles
    (tile_offsets[e] .. tile_offsets[e + 1], in that order: the sum does not depend on the order
    programs run in), stored through strides at grad_b_ptr + e stride_oe; e = program 0, the
    chunk of N program 1. An expert without rows gets zeros."""
    expert = tl.program_id(0)
    outs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, RANK_PAD)
    mask = (outs[:, None] < N) & (ranks[None, :] < R)
    first = tl.load(tile_offsets_ptr + expert)
    partials = partial_ptr + first.to(tl.int64) * N * R + outs[:, None] * R + ranks[None, :]
    acc = tl.zeros((BLOCK_N, RANK_PAD), dtype=tl.float32)
    for _ in range(first, tl.load(tile_offsets_ptr + expert + 1)):
        acc += tl.load(partials, mask=mask, other=0.0)
        partials += N * R
    tl.store(grad_b_ptr + expert.to(tl.int64) * stride_oe + outs[:, None] * stride_on
             + ranks[None, :] * stride_or, acc, mask=mask)


@triton.jit
def _grouped_output_grad_kernel(dy_ptr, s_ptr, g_ptr, grad_b_ptr, partial_ptr, offsets_ptr, N, R,
                                rows_total, scaling, stride_dym, stride_dyn, stride_ge, stride_gn,
                                stride_gr, stride_oe, stride_on, stride_or,
                                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """LoRA's two products with dY in one pass over the rows of expert e = program 0, for the
    columns of chunk c = program 1 (and one rank chunk, program 2):

        dB_e[chunk] = scaling dY_e[:, chunk]^T S_e   (fp32, at grad_b_ptr + e stride_oe)
        partial[c]  = scaling dY_e[:, chunk] G_e[chunk]   (fp32, rows_total x R, slice c)

    G_e (N x R) = B_e at g_ptr + e stride_ge; S (rows_total x R, contiguous). The partials summed
    over the chunks are dS. An expert without rows gets a zero dB and writes no partial."""
    expert = tl.program_id(0)
    chunk = tl.program_id(1)
    outs = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    first = tl.load(offsets_ptr + expert)
    end = tl.load(offsets_ptr + expert + 1)
    dtype = dy_ptr.dtype.element_ty
    g = tl.load(g_ptr + expert.to(tl.int64) * stride_ge + outs[:, None] * stride_gn
                + ranks[None, :] * stride_gr,
                mask=(outs[:, None] < N) & (ranks[None, :] < R), other=0.0).to(dtype)
    partial_base = partial_ptr + chunk.to(tl.int64) * rows_total * R
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for m0 in range(first, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < end
        dy = tl.load(dy_ptr + rows[:, None].to(tl.int64) * stride_dym + outs[None, :] * stride_dyn,
                     mask=row_mask[:, None] & (outs[None, :] < N), other=0.0)
        rank_mask = row_mask[:, None] & (ranks[None, :] < R)
        s = tl.load(s_ptr + rows[:, None].to(tl.int64) * R + ranks[None, :], mask=rank_mask,
                    other=0.0)
        acc = tl.dot(tl.trans(dy), s, acc, input_precision=PRECISION)
        part = tl.dot(dy, g, input_precision=PRECISION)
        tl.store(partial_base + rows[:, None].to(tl.int64) * R + ranks[None, :], part * scaling,
                 mask=rank_mask)
    tl.store(grad_b_ptr + expert.to(tl.int64) * stride_oe + outs[:, None] * stride_on
             + ranks[None, :] * stride_or, acc * scaling,
             mask=(outs[:, None] < N) & (ranks[None, :] < R))


@triton.jit
def _grouped_weight_grad_kernel(l_ptr, r_ptr, index_ptr, out_ptr, offsets_ptr, P, Q, scaling,
                                stride_lm, stride_lp, stride_rm, stride_rq, stride_oe, stride_op,
                                stride_oq, PRECISION: tl.constexpr, GATHER: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
                                BLOCK_Q: tl.constexpr):
    """out_e = scaling L_e^T R_e (P x Q, fp32, at out_ptr + e stride_oe) over the rows of expert
    e = program 0; an expert without rows gets zeros; R's rows through index_ptr if GATHER.
    dA: L = dS, R = x."""
    expert = tl.program_id(0)
    ps = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    first = tl.load(offsets_ptr + expert)
    end = tl.load(offsets_ptr + expert + 1)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(first, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < end
        left = tl.load(l_ptr + rows[:, None].to(tl.int64) * stride_lm + ps[None, :] * stride_lp,
                       mask=row_mask[:, None] & (ps[None, :] < P), other=0.0)
        right_rows = _source_rows(index_ptr, rows, row_mask, GATHER)
        right = tl.load(r_ptr + right_rows[:, None] * stride_rm + qs[None, :] * stride_rq,
                        mask=row_mask[:, None] & (qs[None, :] < Q), other=0.0)
        acc = tl.dot(tl.trans(left), right.to(left.dtype), acc, input_precision=PRECISION)
    tl.store(out_ptr + expert.to(tl.int64) * stride_oe + ps[:, None] * stride_op
             + qs[None, :] * stride_oq, acc * scaling, mask=(ps[:, None] < P) & (qs[None, :] < Q))


# Launchers. ``f``, ``w``, ``g`` and ``out`` are passed as (tensor, per-expert strides): views of
# PEFT's 2-D adapter layout or the 3-D expert weight, never copied.

def grouped_shrink(x, f, f_strides, out, offsets, row_index=None):
    """out (S x R) = x F_e^T; ``f_strides`` = (expert, rank, k) strides of F in f; sorted row i
    reads x's row row_index[i] if ``row_index`` (S,) is given, else row i."""
    rows, K = out.shape[0], x.shape[1]
    R = out.shape[1]
    target = _common.target(x.device)
    config = shrink_config(target, x.dtype)
    tile_expert, tile_start = tile_schedule(offsets, rows, config["BLOCK_M"])
    grid = (tile_expert.numel(), triton.cdiv(R, BLOCK_R))
    gather = row_index is not None
    _grouped_shrink_kernel[grid](x, row_index if gather else offsets, f, out, tile_expert,
                                 tile_start, offsets, K, R, x.stride(0), x.stride(1), *f_strides,
                                 PRECISION=precision(x.dtype), GATHER=gather, BLOCK_R=BLOCK_R,
                                 **config)


def grouped_gemm(x, w, w_strides, s, g, g_strides, y, offsets, scaling, row_index=None,
                 bias=None):
    """y (S x N) = x W_e^T + scaling S G_e^T (+ bias_e, the expert's row of ``bias``, E x N, if
    given); ``w_strides`` = (expert, n, k) of W in w, ``g_strides`` = (expert, n, rank) of G in
    g; x's rows through ``row_index`` as in ``grouped_shrink``."""
    rows, K = y.shape[0], x.shape[1]
    N = y.shape[1]
    R = s.shape[1]
    target = _common.target(x.device)
    configs = gemm_configs(target, x.dtype)
    tile_expert, tile_start = tile_schedule(offsets, rows, configs[0]["BLOCK_M"])
    gather = row_index is not None
    # Without OUTPUT_GRAD the dS / dB operands are never read: y and g stand in for them.
    _common.launch(_grouped_gemm_kernel,
                   lambda c: (tile_expert.numel(), triton.cdiv(N, c["BLOCK_N"])), configs,
                   x, row_index if gather else offsets, w, s, g, y, tile_expert, tile_start,
                   offsets, g, y, y, N, K, R, scaling, x.stride(0), x.stride(1), *w_strides,
                   *g_strides, *g_strides, bucket=rows, PRECISION=precision(x.dtype),
                   GATHER=gather, SHRINK=False, OUTPUT_GRAD=False, BLOCK_R=BLOCK_R,
                   RANK_PAD=BLOCK_R, GROUP_TILES=GROUP_TILES, **_bias_arguments(bias, y))


def grouped_forward(x, w, w_strides, a, a_strides, b, b_strides, s, y, offsets, scaling,
                    row_index=None, bias=None):
    """The forward in one launch: y (S x N) = x W_e^T + scaling S B_e^T (+ bias_e as in
    ``grouped_gemm``) with s (S x R, x's dtype)
    = x A_e^T computed in the same pass over x (``_grouped_gemm_kernel``'s SHRINK);
    ``a_strides`` = (expert, k, rank) of A_e^T in a, ``b_strides`` = (expert, n, rank) of B_e in
    b; x's rows through ``row_index`` as in ``grouped_shrink``."""
    rows, K = y.shape[0], x.shape[1]
    N = y.shape[1]
    R = s.shape[1]
    configs = grad_input_configs(_common.target(x.device), x.dtype)
    tile_expert, tile_start = tile_schedule(offsets, rows, configs[0]["BLOCK_M"])
    gather = row_index is not None
    _common.launch(_grouped_gemm_kernel,
                   lambda c: (tile_expert.numel(), triton.cdiv(N, c["BLOCK_N"])), configs,
                   x, row_index if gather else offsets, w, s, b, y, tile_expert, tile_start,
                   offsets, a, s, y, N, K, R, scaling, x.stride(0), x.stride(1), *w_strides,
                   *b_strides, *a_strides, bucket=rows, PRECISION=precision(x.dtype),
                   GATHER=gather, SHRINK=True, OUTPUT_GRAD=False, BLOCK_R=BLOCK_R,
                   RANK_PAD=max(BLOCK_R, triton.next_power_of_2(R)), GROUP_TILES=GROUP_TILES,
                   **_bias_arguments(bias, y))


def _bias_arguments(bias, y):
    """The GEMM kernel's bias arguments: ``bias`` (E x N) and its strides, or none (BIAS off:
    y stands in for the pointer, never read)."""
    if bias is None:
        return {"bias_ptr": y, "stride_bias_e": 0, "stride_bias_n": 0, "BIAS": False}
    return {"bias_ptr": bias, "stride_bias_e": bias.stride(0), "stride_bias_n": bias.stride(1),
            "BIAS": True}


def fuses_output_grad(device, dtype, rank, in_features, out_features):
    """Whether the backward computes dS and dB inside the dX GEMM (``grouped_grad_input``) instead
    of in their own pass over dY (``grouped_output_grad``). The fused GEMM saves that pass (dY
    is rows x N, the largest operand) but pays dS's rank-r product in every column tile (r /
    BLOCK_N more MMAs and B_e's tile bytes) and dB's fp32 partials, N x r per row tile (written,
    then summed). It needs column tiles 8 ranks wide or more (``grad_input_configs``: 128 or
    256; the padded rank up to 32). The static model (estimates), Qwen3-30B-A3B's experts,
    backward with B's E x N x r copy: on H100 faster for both projections (gate_up 434 -> 421
    us, down 285 -> 268); on RTX 4090 faster for down (951 -> 893, its dX DRAM-bound) and not
    for gate_up (dX 2048 wide is tensor-bound there: the extra MMAs cost what the pass saves), so
    on sm_80/86/89 only dX up to FUSED_MAX_IN_FEATURES wide, and only for widths of multiples
    of 16 (ragged widths take 149-156 registers there, one CTA per SM on sm_89, against 126).
    Other GPUs (AMD's, newer NVIDIA ones) keep the pass: the model has not read them."""
    target = _common.target(device)
    block_n = min(c["BLOCK_N"] for c in grad_input_configs(target, dtype))
    if block_n < 8 * max(rank, BLOCK_R):
        return False
    if target.arch == 90:
        return True
    return (target.arch in (80, 86, 89) and in_features <= FUSED_MAX_IN_FEATURES
            and in_features % 16 == 0 and out_features % 16 == 0)


FUSED_MAX_IN_FEATURES = 1024  # off sm_90: between the Qwen3-30B-A3B widths read (768 / 2048)


def fuses_shrink(device, dtype, rank, in_features, out_features, transposed):
    """Whether the forward computes S = x A_e^T inside its GEMM (``grouped_forward``) instead of
    in the grouped shrink's own pass over x. As ``fuses_output_grad`` (the same tiles and the
    same rank product per column tile), but only for x at most FUSED_MAX_IN_FEATURES wide on
    every GPU: the static model (estimates), Qwen3-30B-A3B's experts, forward: down (x 768 wide,
    DRAM-bound) H100 199 + 19 -> 201 us, RTX 4090 663 + 64 -> 703; gate_up (2048 wide) H100
    356 + 30 -> 386 (no gain), RTX 4090 1289 + 40 -> 1406 (tensor-bound). Off sm_90 only for
    the E x N x K layout: with E x K x N (``transposed``, gpt-oss's) the tile takes 168
    registers on sm_89, one CTA per SM."""
    return (fuses_output_grad(device, dtype, rank, in_features, out_features)
            and in_features <= FUSED_MAX_IN_FEATURES
            and (not transposed or _common.target(device).arch == 90))


def grouped_grad_input(grad_y, w, w_strides, s, b, b_strides, a, a_strides, grad_x, grad_s,
                       grad_b, grad_b_strides, offsets, scaling):
    """The LoRA backward's passes over dY in one: grad_x (S x K) = dY W_e + dS A_e, with grad_s
    (S x R, x's dtype) = scaling dY B_e and grad_b_e (N x R, fp32) = scaling dY_e^T S_e computed
    as dY streams through the GEMM (``_grouped_gemm_kernel``'s OUTPUT_GRAD). ``w_strides`` =
    W's (expert, k, n) strides (W_e read transposed, as ``grouped_gemm`` takes it for dX);
    ``b_strides`` = (expert, n, rank) of B_e, ``a_strides`` = (expert, k, rank) of A_e^T,
    ``grad_b_strides`` = (expert, n, rank) of dB in grad_b. dB's fp32 partials (one per row tile)
    are summed by ``_grouped_grad_b_sum_kernel`` in a fixed order."""
    rows, N = grad_y.shape
    K = grad_x.shape[1]
    R = s.shape[1]
    experts = offsets.numel() - 1
    target = _common.target(grad_y.device)
    configs = grad_input_configs(target, grad_y.dtype)
    block_m = configs[0]["BLOCK_M"]
    tile_expert, tile_start = tile_schedule(offsets, rows, block_m)
    counts = (offsets[1:] - offsets[:-1]).to(torch.int64)
    tile_offsets = torch.cat((counts.new_zeros(1), torch.cumsum((counts + block_m - 1) // block_m,
                                                                0))).to(torch.int32)
    partials = torch.empty(tile_expert.numel(), N, R, dtype=torch.float32, device=grad_y.device)
    rank_pad = max(BLOCK_R, triton.next_power_of_2(R))
    _common.launch(_grouped_gemm_kernel,
                   lambda c: (tile_expert.numel(), triton.cdiv(K, c["BLOCK_N"])), configs,
                   grad_y, offsets, w, s, a, grad_x, tile_expert, tile_start, offsets, b, grad_s,
                   partials, K, N, R, scaling, grad_y.stride(0), grad_y.stride(1), *w_strides,
                   *a_strides, *b_strides, bucket=rows, PRECISION=precision(grad_y.dtype),
                   GATHER=False, SHRINK=False, OUTPUT_GRAD=True, BLOCK_R=BLOCK_R,
                   RANK_PAD=rank_pad, GROUP_TILES=GROUP_TILES, **_bias_arguments(None, grad_x))
    config = grad_b_sum_config(target, grad_y.dtype)
    _grouped_grad_b_sum_kernel[(experts, triton.cdiv(N, config["BLOCK_N"]))](
        partials, tile_offsets, grad_b, N, R, *grad_b_strides, RANK_PAD=rank_pad, **config)


def grouped_output_grad(grad_y, s, g, g_strides, grad_b, grad_b_strides, grad_s, offsets,
                        scaling):
    """grad_b_e (N x R, fp32) = scaling dY_e^T S_e and grad_s (S x R) = scaling dY G_e for every
    expert, reading dY once; ``g_strides`` = (expert, n, rank) of G = B in g, ``grad_b_strides``
    = (expert, n, rank) of dB in grad_b. The dS partials (fp32, one per chunk of dY's columns) are
    summed here by torch, in the same order every run."""
    rows, N = grad_y.shape
    R = s.shape[1]
    experts = offsets.numel() - 1
    target = _common.target(grad_y.device)
    config = output_grad_config(target, grad_y.dtype)
    chunks = triton.cdiv(N, config["BLOCK_N"])
    partials = torch.empty(chunks, rows, R, dtype=torch.float32, device=grad_y.device)
    grid = (experts, chunks, triton.cdiv(R, BLOCK_R))
    _grouped_output_grad_kernel[grid](grad_y, s, g, grad_b, partials, offsets, N, R, rows, scaling,
                                      grad_y.stride(0), grad_y.stride(1), *g_strides,
                                      *grad_b_strides, PRECISION=precision(grad_y.dtype),
                                      BLOCK_R=BLOCK_R, **config)
    grad_s.copy_(partials.sum(0))


def grouped_weight_grad(left, right, out, out_strides, offsets, scaling, row_index=None):
    """out_e (P x Q, fp32) = scaling L_e^T R_e for every expert; ``out_strides`` = (expert, p, q);
    R's rows through ``row_index`` as x's in ``grouped_shrink``."""
    P, Q = left.shape[1], right.shape[1]
    experts = offsets.numel() - 1
    target = _common.target(left.device)
    config = weight_grad_config(target, left.dtype)
    grid = (experts, triton.cdiv(P, BLOCK_R), triton.cdiv(Q, config["BLOCK_Q"]))
    gather = row_index is not None
    _grouped_weight_grad_kernel[grid](left, right, row_index if gather else offsets, out, offsets,
                                      P, Q, scaling, left.stride(0), left.stride(1),
                                      right.stride(0), right.stride(1), *out_strides,
                                      PRECISION=precision(left.dtype), GATHER=gather,
                                      BLOCK_P=BLOCK_R, **config)
