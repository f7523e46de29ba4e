"""Fused LoRA / QLoRA linear, forward and backward.

For x (M x K), frozen W (N x K, dense or NF4), bias b, adapters A (r x K), B (N x r), scaling s and
dropout p on the LoRA branch:

    x_d = dropout_p(x)     S = x_d A^T                  Y = x W^T + b + s S B^T
    dS = s dY B            dA = dS^T x_d                dX = dY W + dropout_p'(dS A)

- NF4 tiles of W are decoded in registers inside the GEMMs (forward, and dX reading W as it is
  stored): the dense W never exists in memory.
- The LoRA expand s S B^T and the bias are added to the output tile before its one store.
- Dropout is applied while loading x in the shrink, and regenerated from the seed in backward
  (``dropout_keep``: one Philox call per four elements): no M x K mask is ever stored. The kept
  elements enter the products as they are (exact in x's dtype) and 1 / (1 - p) scales the fp32
  accumulator.
- The frozen GEMM's operands are in x's dtype and accumulate in fp32; fp32 inputs multiply in IEEE
  fp32, not TF32, as torch's matmul does by default.
- The LoRA branch (A, B, S, dS) is in x's dtype, or in fp32 where x is 16-bit and the adapters are
  fp32 (PEFT's fp32 branch, which lowrank.ops keeps): each fp32 operand is then split into two
  parts in x's dtype (``branch_dot``), so the branch is near-fp32 accurate on 16-bit tensor cores.
  Each kernel reads which from its pointers' dtypes.
"""

import triton
import triton.language as tl

from . import _common, _dora_epilogue
from ._common import grouped_tile, row_offsets, store_rounded
from ._weight import (decode_packed_words, frozen_codes, frozen_tile_dot, gemm_operand,
                      load_gemm_tile, load_packed_words, precision, row_aligned, weight_args,
                      with_decoding)
from .nf4_dequantize import load_nested_offset

BLOCK_R = 16  # ranks are handled in chunks of 16 (the smallest tl.dot size): any rank works
MASK_BLOCK_M, MASK_BLOCK_K = 16, 64  # the dropout mask kernel's tile


# Tiles and launch options per kernel, a function of the target (``_common.Target``) and the
# operands' dtype: the one place each launcher's configs come from. The GEMMs over the frozen
# weight take a list, which ``_common.launch`` autotunes over on a GPU: one config in Triton's
# interpreter (autotuning cannot run there) and for fp32 operands (tl.dot on the FMA units: bigger
# tiles spill); on GPUs a short list per architecture, each config compiling for sm_80/86/89/90
# within the static gates (``python -m bench.static`` builds every config;
# tests/test_static_report.py checks its report covers them all). GROUP_M: tile rows per group of
# the grouped program order (``_common.grouped_tile``): 8 on GPUs, as Triton's matmul tutorial; 2
# in the interpreter, so the tests' small shapes have several groups and a ragged last one.


def forward_configs(target, dtype, undropped=False):
    # ``undropped``: DoRA's epilogue under dropout, which reads a second output tile (the
    # undropped product) beside acc.
    untuned = _common.untuned_forward_configs(target, dtype)
    if untuned:
        return untuned
    if target.arch == 90:
        # wgmma tiles. Each decoded W element feeds BLOCK_M rows: at 128 rows the NF4 GEMM is
        # issue-bound by the decode (two warps per scheduler at one CTA per SM), at 256 rows (two
        # warpgroups of 128) it is bound by shared memory and L1 (wgmma's operand reads, x's
        # tile, the decoded tile, the code lookups); model, 4096 x 4096 x 14336 NF4 on H100:
        # 1029 -> 805 us. 128 x 256 spills with the decode, and so does 256 x 128 with DoRA's
        # undropped tile (160 bytes of stack). The 256-row tile is computed transposed
        # (TRANSPOSED_TILE): the decoded W is wgmma's A operand, which Hopper reads from
        # registers, so W is not re-read from shared memory for each 64-row slice of x; Triton
        # still moves the decoded tile into A's register layout through shared memory (STS +
        # ldmatrix), as the decode's join / reshape / fp32 -> bf16 chain is not one it carries
        # that layout through. Model: 777 -> 713 us (issue-bound). x's loads without masks in the
        # K loop (rows past M clamped, EVEN_K): 700 -> 698 us for the kernel, now bound by L1
        # (issue 700 -> 610; nested 734 -> 711, issue 641). 256 x 128 x 128 in 2 stages would
        # be 696 us but spills (255 registers). Packed NF4 tiles decoded straight into A's
        # layout (no STS, ldmatrix or barriers): shared 698 -> 568 us, issue 619 in 2 stages,
        # now bound by L2 at 640 us (nested 711 -> 662). First by relabeling the columns of a
        # lane's 8 packed bytes, x read in that order 4 bytes wide: 8.97 / 9.44 instructions per
        # NF4 / nested element, 2.0 of them x's copies and their addresses (32 + 32 per thread
        # per step). Now each lane reads its rows' whole words and takes byte q of each
        # (``_weight.decode_register_order``), x in W's order 16 bytes wide: 7.94 / 8.34 (loop
        # 287 -> 254 / 302 -> 267 instructions, registers 254 -> 216 / 254 -> 237; shared 568 ->
        # 617 us with the whole-row reads, still under L2's 640 us, the bound). Tried (model,
        # same shape): BLOCK_K 128 decodes through shared memory (the packed rows, 8-byte
        # aligned at K % 16, load 8 lanes to a row where A takes 4): 9.1 / 9.5, 696 us; as two
        # 64-column halves joined into A (one x load, one dot) 8.64 / 9.11 but 32 bytes of
        # stack at 255 registers; the loop unrolled by two, 200 bytes; x's row offsets in
        # int32, 10.1 (a 64-bit add each).
        return ([] if undropped else
                [{"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8,
                  "num_stages": 2, "TRANSPOSED_TILE": True}]) + [
                {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8,
                 "num_stages": 3},
                {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4,
                 "num_stages": 3}]
    # sm_80/86/89 (and GPUs without a list of their own): W tiles of 128 rows amortize the decode;
    # 64 rows of x, as 128 x 128 tiles leave one CTA per SM (registers) or spill.
    return [{"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4,
             "num_stages": 3},
            {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4,
             "num_stages": 2}]  # 4 stages: 7.8 / 8.7 instructions per NF4 / nested element (sm_89)


def grad_input_configs(target, dtype, dropout):
    # As forward_configs, with W's N x K swapped; with dropout one config, as its mask regenerated
    # over bigger tiles spills registers on sm_90.
    if target.arch is None:
        return [{"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 2, "num_warps": 4,
                 "num_stages": 3}]
    if dtype.itemsize == 4 or dropout:
        return [{"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4,
                 "num_stages": 3}]
    if target.arch == 90:  # 256 x 64 x 128: 1072 -> 805 us (model), as forward_configs says;
        # transposed as the forward's (W^T the register operand): 764 -> 736 us (model, H100 NF4
        # 4096 x 4096 x 14336; issue-bound, 250 registers, no spills). Bound by shared memory
        # since (698 us): the decoded tile crosses it into wgmma's register layout (STS +
        # ldmatrix, 32 KB a step). The forward's first relabeling (columns permuted in pairs,
        # before ``_weight.decode_register_order``) cannot avoid that here: in A = W^T a lane
        # holds one byte of each of 16 W rows, so byte loads
        # (LDG.U8, a 64-bit address each; cp.async takes 4 bytes at least) made the loop 302 ->
        # 333 instructions (model 699 us, issue-bound), and each warp's byte load touches 4
        # lines of L1 the model does not count. The packed words and absmax loaded a step ahead
        # into registers instead of through shared memory (PACKED_WORDS): shared 698 -> 654 us,
        # loop 302 -> 269 instructions (9.44 -> 8.41 per element; nested 9.91 -> 9.16, 711 ->
        # 654 us), 254 registers, no spills. Then (model, same shape): ptxas no longer
        # serializes the wgmmas (tl.assume(N > 0) in the kernel) 269 -> 262; the words decoded
        # before the next ones load 258; dY and the words unmasked where N and K are multiples
        # of the tile (EVEN_N, EVEN_K) 255; the words 16 bytes a thread (one absmax each) 250:
        # 7.81 per element, nested 9.12 -> 8.19; still 654 us, bound by shared memory (dY's
        # wgmma reads and copy, the code lookups, the decoded tile's crossing).
        return [{"BLOCK_M": 256, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8,
                 "num_stages": 3, "TRANSPOSED_TILE": True},
                {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8,
                 "num_stages": 3},
                {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4,
                 "num_stages": 3}]
    return [{"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4,
             "num_stages": 3},
            {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4,
             "num_stages": 2}]  # 4 stages: 8.0 / 8.7 instructions per NF4 / nested element (sm_89)


def shrink_config(target, dtype):
    # A pass over x (M x K) at rank 16: it should run at DRAM speed. 32 rows per program fill the
    # SMs (M = 4096: 128 programs; 64 left half of H100's 132 idle, and the busy ones issue-bound
    # at one warp per scheduler), and 128 columns per step halve the loop's bookkeeping per byte
    # (bf16: a 16-byte load per thread per row, 8 rows per warp). Model,
    # x 4096 x 4096 bf16: H100 13.0 us issue-bound -> 11.3 DRAM-bound (issue 6.2); RTX 4090 37.6
    # DRAM-bound either way; the joined [x | S] form 22.5 DRAM-bound either way. An fp32 x takes
    # 64 columns: 128 held 64 KB of shared memory in 3 stages (with dropout), one CTA per SM on
    # sm_89. Two stages left a loop of 261 instructions on sm_90 (model 29.7 us, L2-bound).
    return {"BLOCK_M": 32, "BLOCK_K": 128 if dtype.itemsize <= 2 else 64, "num_warps": 4,
            "num_stages": 3}


def grad_a_config(target, dtype):
    # 32 columns of x per program: twice the programs of 64 (H100, K = 4096: 128 for 132 SMs), and
    # the model's dA at 4096 x 4096 goes from issue-bound (16.7 us) to DRAM-bound (11.3 us).
    return {"BLOCK_M": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}


@triton.jit
def split_parts(value, dtype: tl.constexpr):
    """fp32 ``value`` as hi + lo, both in 16-bit ``dtype``: hi is ``value`` rounded, lo the remainder
    (exact in fp32) rounded, so hi + lo carries about twice dtype's mantissa bits."""
    hi = value.to(dtype)
    return hi, (value - hi.to(tl.float32)).to(dtype)


@triton.jit
def branch_dot(lhs, rhs, acc, dtype: tl.constexpr, PRECISION: tl.constexpr):
    """acc + lhs @ rhs for the LoRA branch, in fp32, the products on ``dtype`` (x's) operands.

    An fp32 operand of a 16-bit ``dtype`` (fp32 adapters, S or dS) is split (``split_parts``) and
    the products hi x hi + hi x lo + lo x hi accumulated: relative error about 2^-16 in bf16 (the
    lo x lo term left out, lo rounded), where one bf16 product rounds each operand by 2^-8. A
    rank-r product is r / K of the layer's work, so two or three 16-bit products cost little, and
    less than one in fp32, which tensor cores do not take at 16-bit speed."""
    if lhs.dtype == dtype:
        if rhs.dtype == dtype:
            acc = tl.dot(lhs, rhs, acc, input_precision=PRECISION)
        else:
            rhs_hi, rhs_lo = split_parts(rhs, dtype)
            acc = tl.dot(lhs, rhs_hi, acc, input_precision=PRECISION)
            acc = tl.dot(lhs, rhs_lo, acc, input_precision=PRECISION)
    else:
        lhs_hi, lhs_lo = split_parts(lhs, dtype)
        if rhs.dtype == dtype:
            acc = tl.dot(lhs_hi, rhs, acc, input_precision=PRECISION)
            acc = tl.dot(lhs_lo, rhs, acc, input_precision=PRECISION)
        else:
            rhs_hi, rhs_lo = split_parts(rhs, dtype)
            acc = tl.dot(lhs_hi, rhs_hi, acc, input_precision=PRECISION)
            acc = tl.dot(lhs_hi, rhs_lo, acc, input_precision=PRECISION)
            acc = tl.dot(lhs_lo, rhs_hi, acc, input_precision=PRECISION)
    return acc


@triton.jit
def dropout_keep(seed_ptr, rows, k0, K, p, BLOCK_K: tl.constexpr):
    """The keep mask of the tile ``rows`` x [k0, k0 + BLOCK_K) of an M x K input (``rows`` a vector
    of row indices, k0 a multiple of 4): the same in every kernel, forward and backward.

    One Philox call (``tl.randint4x``) per four elements: group (m, k // 4), numbered
    m * cdiv(K, 4) + k // 4 in int64 (M x K passes 2**31 at training sizes), gives four uint32
    words, word j for element 4 (k // 4) + j; an element is kept where its word is at least
    p * 2**32 (an integer compare, no float conversion)."""
    BLOCK_M: tl.constexpr = rows.shape[0]
    groups = row_offsets(rows, (K + 3) // 4)[:, None] + (k0 // 4 + tl.arange(0, BLOCK_K // 4))[None, :]
    r0, r1, r2, r3 = tl.randint4x(tl.load(seed_ptr), groups)
    # join(join(r0, r2), join(r1, r3))[..., i, j] is word 2 i + j: the four in element order.
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK_M, BLOCK_K])
    # p * 2**32 in fp32 rounds to 2**32 for p within 2**-25 of 1: the largest fp32 below it instead.
    return words >= tl.minimum(p * 4294967296.0, 4294967040.0).to(tl.uint32)


@triton.jit
def _lora_shrink_kernel(x_ptr, a_ptr, s_ptr, seed_ptr, joined_ptr, M, K, R, p, stride_xm, stride_xk,
                        stride_ar, stride_ak, stride_jm, DROPOUT: tl.constexpr,
                        JOINED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """S = dropout(x) A^T, stored in S's dtype (M x R, contiguous; fp32 where A is fp32, else x's);
    one rank chunk per program. ``x`` may have any strides.

    JOINED: also the cublas route's operand [x | S] (rows ``stride_jm`` apart, in x's dtype),
    written in the same pass: x as it is loaded (undropped: the frozen GEMM reads x, not its
    dropout) by the first rank chunk's programs, then S beside it, or for an fp32 S its
    ``split_parts`` as [hi | hi | lo] (``lowrank.ops.lora.split_product``'s layout, 3R columns)."""
    dtype = x_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    x_rows = x_ptr + row_offsets(rows, stride_xm)[:, None]
    joined_rows = joined_ptr + row_offsets(rows, stride_jm)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        # int64 columns too: x may be a transposed view, whose columns are rows of its storage.
        x = tl.load(x_rows + row_offsets(cols, stride_xk)[None, :],
                    mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0)
        if JOINED:
            if tl.program_id(1) == 0:
                tl.store(joined_rows + cols[None, :], x,
                         mask=(rows[:, None] < M) & (cols[None, :] < K))
        if DROPOUT:
            x = tl.where(dropout_keep(seed_ptr, rows, k0, K, p, BLOCK_K), x, 0.0)
        a = tl.load(a_ptr + ranks[:, None] * stride_ar + row_offsets(cols, stride_ak)[None, :],
                    mask=(ranks[:, None] < R) & (cols[None, :] < K), other=0.0)
        acc = branch_dot(x, tl.trans(a), acc, dtype, PRECISION)
    if DROPOUT:
        acc = acc / (1 - p)
    s_mask = (rows[:, None] < M) & (ranks[None, :] < R)
    store_rounded(s_ptr + row_offsets(rows, R)[:, None] + ranks[None, :], acc, s_mask)
    if JOINED:
        s_cols = joined_rows + K + ranks[None, :]
        if s_ptr.dtype.element_ty == dtype:
            store_rounded(s_cols, acc, s_mask)
        else:
            hi, lo = split_parts(acc, dtype)
            tl.store(s_cols, hi, mask=s_mask)
            tl.store(s_cols + R, hi, mask=s_mask)
            tl.store(s_cols + 2 * R, lo, mask=s_mask)


@triton.jit
def _lora_forward_kernel(x_ptr, w_ptr, s_ptr, b_ptr, bias_ptr, y_ptr, absmax_ptr, pairs_ptr,
                         nested_code_ptr, nested_absmax_ptr, offset_ptr, M, N, K, R, scaling,
                         stride_xm, stride_xk, stride_wn, stride_wk, stride_bn, stride_br,
                         block_shift, nested_shift, HAS_BIAS: tl.constexpr, NF4: tl.constexpr,
                         NESTED: tl.constexpr, SCALE_GROUP: tl.constexpr, INLINE_PTX: tl.constexpr,
                         NIBBLE_LOOKUP: tl.constexpr,
                         PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
                         scale_ptr, undropped_ptr, product_ptr, COLUMN_SCALE: tl.constexpr,
                         UNDROPPED: tl.constexpr, STORE_PRODUCT: tl.constexpr,
                         TRANSPOSED_TILE: tl.constexpr = False, PACKED_WORDS: tl.constexpr = False,
                         EVEN_K: tl.constexpr = False, ROW_ALIGNED: tl.constexpr = False):
    """Y = x W^T + b + s S B^T, one store per output tile; with COLUMN_SCALE, DoRA's output
    (kernels/_dora_epilogue.py). Output tiles in grouped order (``grouped_tile``).

    TRANSPOSED_TILE: the tile is summed as Y^T = W x^T + B (s S)^T (the weight the dot's first
    operand: wgmma takes it from registers, x from shared memory) and transposed back (a layout
    change in registers) before the epilogue. The same products, in another order. PACKED_WORDS:
    packed NF4 bytes 4-byte aligned, so where K % 8 == 0 a transposed tile loads them as words
    and decodes them in the dot's register layout (``_weight.decode_register_order``).
    ROW_ALIGNED: the absmax indexed in int32 by row and column (``_weight.row_aligned``)."""
    dtype = x_ptr.dtype.element_ty
    tile_m, tile_n = grouped_tile(tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    outs = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # The LoRA branch first, in the accumulator itself: summed apart into a second BLOCK_M x
    # BLOCK_N accumulator it spilled registers (sm_89 beside the split's operands; sm_90 at
    # 256-row tiles, where acc alone takes 128 registers per thread). An fp32 S (fp32 x, or the
    # fp32 branch) is scaled before its products; a 16-bit S would be rounded again, so its
    # products are scaled after, before the frozen GEMM's are added. Not software-pipelined
    # (one stage): its prefetched tiles left 16 bytes of stack on sm_80.
    if TRANSPOSED_TILE:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in tl.range(0, R, BLOCK_R, num_stages=1):
        ranks = r0 + tl.arange(0, BLOCK_R)
        s = tl.load(s_ptr + row_offsets(rows, R)[:, None] + ranks[None, :],
                    mask=(rows[:, None] < M) & (ranks[None, :] < R), other=0.0)
        b = tl.load(b_ptr + outs[:, None] * stride_bn + ranks[None, :] * stride_br,
                    mask=(outs[:, None] < N) & (ranks[None, :] < R), other=0.0)
        if s.dtype == tl.float32:
            s = s * scaling
        if TRANSPOSED_TILE:
            acc = branch_dot(b, tl.trans(s), acc, dtype, PRECISION)
        else:
            acc = branch_dot(s, tl.trans(b), acc, dtype, PRECISION)
    if s_ptr.dtype.element_ty != tl.float32:
        acc = acc * scaling
    codes = frozen_codes(pairs_ptr, NF4, SCALE_GROUP, NIBBLE_LOOKUP, INLINE_PTX)
    nested_offset = load_nested_offset(offset_ptr, NESTED)
    # Rows past M read row M - 1 again (their outputs are never stored), so x's loads in the K
    # loop need no row mask; with EVEN_K (K a multiple of BLOCK_K) no mask at all. Made after
    # the LoRA branch: live across it, these row addresses spilled the fp32 branch's sm_90
    # REGISTER_ORDER builds (8 bytes of stack at 255 registers).
    x_rows = x_ptr + row_offsets(tl.minimum(rows, M - 1), stride_xm)[:, None]
    # A transposed packed NF4 tile decoded straight into wgmma's register operand layout.
    REGISTER_ORDER: tl.constexpr = TRANSPOSED_TILE and NF4 and SCALE_GROUP >= 8 and PACKED_WORDS
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x = tl.load(x_rows + cols[None, :] * stride_xk)
        else:
            x = tl.load(x_rows + cols[None, :] * stride_xk, mask=cols[None, :] < K, other=0.0)
        w = load_gemm_tile(w_ptr, tile_n * BLOCK_N, k0, N, K, stride_wn, stride_wk, absmax_ptr,
                           codes, nested_code_ptr, nested_absmax_ptr, nested_offset, block_shift,
                           nested_shift, NF4, NESTED, SCALE_GROUP, INLINE_PTX, NIBBLE_LOOKUP,
                           BLOCK_N, BLOCK_K, REGISTER_ORDER, EVEN_K, ROW_ALIGNED)
        acc = frozen_tile_dot(x, w, acc, dtype, NF4, INLINE_PTX, PRECISION, TRANSPOSED_TILE)
    if TRANSPOSED_TILE:
        acc = tl.trans(acc)
    if COLUMN_SCALE:
        acc = _dora_epilogue.column_scale(acc, rows, outs, M, N, scale_ptr, undropped_ptr,
                                          product_ptr, UNDROPPED, STORE_PRODUCT)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + outs, mask=outs < N, other=0.0).to(tl.float32)[None, :]
    store_rounded(y_ptr + row_offsets(rows, N)[:, None] + outs[None, :], acc,
                  (rows[:, None] < M) & (outs[None, :] < N))


@triton.jit
def _lora_grad_input_kernel(dy_ptr, w_ptr, ds_ptr, a_ptr, dx_ptr, seed_ptr, absmax_ptr, pairs_ptr,
                            nested_code_ptr, nested_absmax_ptr, offset_ptr, M, N, K, R, p,
                            stride_wn, stride_wk, stride_ar, stride_ak, block_shift, nested_shift,
                            DROPOUT: tl.constexpr, NF4: tl.constexpr, NESTED: tl.constexpr,
                            SCALE_GROUP: tl.constexpr, INLINE_PTX: tl.constexpr,
                            NIBBLE_LOOKUP: tl.constexpr,
                            PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
                            TRANSPOSED_TILE: tl.constexpr = False,
                            PACKED_WORDS: tl.constexpr = False, EVEN_K: tl.constexpr = False,
                            EVEN_N: tl.constexpr = False, ROW_ALIGNED: tl.constexpr = False):
    """dX = dY W + dropout'(dS A): W is read as stored (N x K), NF4 decoded in registers. Output
    tiles in grouped order (``grouped_tile``). TRANSPOSED_TILE: as the forward's, dY W summed
    as W^T dY^T. PACKED_WORDS: packed NF4 bytes 4-byte aligned, so where K % 8 == 0
    (SCALE_GROUP >= 8) the transposed tile's bytes are loaded as words
    (``_weight.load_packed_words``). EVEN_K: K a multiple of BLOCK_K (``load_gemm_tile``);
    EVEN_N: N a multiple of BLOCK_N, so dY's loads need no mask. ROW_ALIGNED: as the
    forward's."""
    dtype = dy_ptr.dtype.element_ty
    # The launchers never launch an empty product. Without it the loop's zero-trip path sets
    # acc with moves, and ptxas then serializes every wgmma of the loop (sm_90).
    tl.assume(N > 0)
    tile_m, tile_k = grouped_tile(tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k_first = tile_k * BLOCK_K
    cols = k_first + tl.arange(0, BLOCK_K)
    dy_rows = dy_ptr + row_offsets(tl.minimum(rows, M - 1), N)[:, None]  # as the forward's x
    if TRANSPOSED_TILE:
        acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    codes = frozen_codes(pairs_ptr, NF4, SCALE_GROUP, NIBBLE_LOOKUP, INLINE_PTX)
    nested_offset = load_nested_offset(offset_ptr, NESTED)
    # The transposed NF4 tile's packed words and absmax loaded into registers a step ahead,
    # not software-pipelined through shared memory (cp.async, then a read back): sm_90's loop
    # is bound by shared memory, which the tile's decoded copy for wgmma's register operand
    # already crosses (see grad_input_configs).
    PREFETCH: tl.constexpr = TRANSPOSED_TILE and NF4 and SCALE_GROUP >= 8 and PACKED_WORDS
    if PREFETCH:
        words_next, scale_next = load_packed_words(
            w_ptr, 0, k_first, N, K, absmax_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset,
            block_shift, nested_shift, NESTED, SCALE_GROUP, BLOCK_N, BLOCK_K,
            ROW_ALIGNED=ROW_ALIGNED)
    for n0 in range(0, N, BLOCK_N):
        outs = n0 + tl.arange(0, BLOCK_N)
        if EVEN_N:
            dy = tl.load(dy_rows + outs[None, :])
        else:
            dy = tl.load(dy_rows + outs[None, :], mask=outs[None, :] < N, other=0.0)
        if PREFETCH:
            # Decoded before the next tile's loads, which then reuse its registers (no copies
            # of the loop-carried words and absmax: 4 instructions per step).
            w = decode_packed_words(words_next, scale_next, codes, INLINE_PTX, NIBBLE_LOOKUP)
            if EVEN_N and EVEN_K:
                # The last step loads the last tile again (unused), not past W: no masks.
                next_first = tl.minimum(n0 + BLOCK_N, N - BLOCK_N)
            else:
                next_first = n0 + BLOCK_N  # past the last row: masked off
            words_next, scale_next = load_packed_words(
                w_ptr, next_first, k_first, N, K, absmax_ptr, nested_code_ptr,
                nested_absmax_ptr, nested_offset, block_shift, nested_shift, NESTED, SCALE_GROUP,
                BLOCK_N, BLOCK_K, EVEN_N and EVEN_K, ROW_ALIGNED)
        else:
            w = load_gemm_tile(w_ptr, n0, k_first, N, K, stride_wn, stride_wk, absmax_ptr,
                               codes, nested_code_ptr, nested_absmax_ptr, nested_offset,
                               block_shift, nested_shift, NF4, NESTED, SCALE_GROUP, INLINE_PTX,
                               NIBBLE_LOOKUP, BLOCK_N, BLOCK_K, False, EVEN_K, ROW_ALIGNED)
        if TRANSPOSED_TILE:
            acc = tl.dot(tl.trans(w.to(dtype)), tl.trans(dy), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(dy, gemm_operand(w, dtype, NF4, INLINE_PTX), acc,
                         input_precision=PRECISION)
    if TRANSPOSED_TILE:
        acc = tl.trans(acc)
    lora = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        ds = tl.load(ds_ptr + row_offsets(rows, R)[:, None] + ranks[None, :],
                     mask=(rows[:, None] < M) & (ranks[None, :] < R), other=0.0)
        a = tl.load(a_ptr + ranks[:, None] * stride_ar + cols[None, :] * stride_ak,
                    mask=(ranks[:, None] < R) & (cols[None, :] < K), other=0.0)
        if DROPOUT:  # masked below, apart from dY W
            lora = branch_dot(ds, a, lora, dtype, PRECISION)
        else:  # straight into acc: no second accumulator's registers
            acc = branch_dot(ds, a, acc, dtype, PRECISION)
    if DROPOUT:
        acc += tl.where(dropout_keep(seed_ptr, rows, k_first, K, p, BLOCK_K), lora / (1 - p), 0.0)
    store_rounded(dx_ptr + row_offsets(rows, K)[:, None] + cols[None, :], acc,
                  (rows[:, None] < M) & (cols[None, :] < K))


@triton.jit
def _lora_grad_a_kernel(ds_ptr, x_ptr, da_ptr, seed_ptr, M, K, R, p, stride_xm, stride_xk,
                        DROPOUT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """dA = dS^T dropout(x), fp32 (R x K, contiguous); the mask regenerated from the seed."""
    dtype = x_ptr.dtype.element_ty
    k_first = tl.program_id(0) * BLOCK_K
    cols = k_first + tl.arange(0, BLOCK_K)
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        ds = tl.load(ds_ptr + row_offsets(rows, R)[:, None] + ranks[None, :],
                     mask=(rows[:, None] < M) & (ranks[None, :] < R), other=0.0)
        x = tl.load(x_ptr + row_offsets(rows, stride_xm)[:, None] + cols[None, :] * stride_xk,
                    mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0)
        if DROPOUT:
            x = tl.where(dropout_keep(seed_ptr, rows, k_first, K, p, BLOCK_K), x, 0.0)
        acc = branch_dot(tl.trans(ds), x, acc, dtype, PRECISION)
    if DROPOUT:
        acc = acc / (1 - p)
    tl.store(da_ptr + ranks[:, None] * K + cols[None, :], acc,
             mask=(ranks[:, None] < R) & (cols[None, :] < K))


@triton.jit
def _dropout_mask_kernel(seed_ptr, mask_ptr, M, K, p, BLOCK_M: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    """The keep mask (int8, M x K, contiguous) that the GEMM kernels draw for ``seed``."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = dropout_keep(seed_ptr, rows, tl.program_id(1) * BLOCK_K, K, p, BLOCK_K)
    tl.store(mask_ptr + row_offsets(rows, K)[:, None] + cols[None, :], keep.to(tl.int8),
             mask=(rows[:, None] < M) & (cols[None, :] < K))


def lora_shrink(x, lora_a, s, seed, p, joined=None):
    """S = dropout(x) A^T into ``s``. ``joined``: None, or an M x (K + R') matrix in x's dtype with
    unit column stride, into which x (undropped) and S are written too (the kernel's JOINED: R' is
    R, or 3R for an fp32 S)."""
    M, K = x.shape
    R = lora_a.shape[0]
    if joined is not None:
        columns = K + (R if s.dtype == x.dtype else 3 * R)
        if joined.dtype != x.dtype or joined.shape != (M, columns) or joined.stride(1) != 1:
            raise ValueError(f"lora_shrink: joined must be {M} x {columns} in {x.dtype} with unit "
                             f"column stride, got {tuple(joined.shape)} in {joined.dtype} with "
                             f"strides {joined.stride()}")
    target = _common.target(x.device)
    config = shrink_config(target, x.dtype)
    grid = (triton.cdiv(M, config["BLOCK_M"]), triton.cdiv(R, BLOCK_R))
    _lora_shrink_kernel[grid](
        x, lora_a, s, seed, s if joined is None else joined, M, K, R, p, x.stride(0), x.stride(1),
        lora_a.stride(0), lora_a.stride(1), 0 if joined is None else joined.stride(0),
        DROPOUT=p > 0, JOINED=joined is not None, PRECISION=precision(x.dtype), BLOCK_R=BLOCK_R,
        **config)


def lora_forward(x, w, s, lora_b, bias, y, scaling, nf4=None, column_scale=None, undropped=None,
                 product=None):
    """``nf4``: None for a dense ``w`` (N x K, any strides), else the packed bytes' decoding tensors.
    DoRA's epilogue (``_dora_epilogue.launch_args``): ``column_scale``, ``undropped``,
    ``product``."""
    M, K = x.shape
    N, R = lora_b.shape
    flags, (absmax, pairs, nested_code, nested_absmax, offset, shift, nested_shift), \
        (stride_wn, stride_wk) = weight_args(w, nf4)
    target = _common.target(x.device)
    configs = [{**config, "EVEN_K": K % config["BLOCK_K"] == 0} for config in
               with_decoding(forward_configs(target, x.dtype, undropped is not None), nf4, K,
                             target)]
    _common.launch(
        _lora_forward_kernel,
        lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"]),), configs,
        x, w, s, lora_b, y if bias is None else bias, y, absmax, pairs, nested_code, nested_absmax,
        offset, M, N, K, R, scaling, x.stride(0), x.stride(1), stride_wn, stride_wk, lora_b.stride(0),
        lora_b.stride(1), shift, nested_shift, bucket=M, HAS_BIAS=bias is not None, **flags,
        PRECISION=precision(x.dtype), PACKED_WORDS=nf4 is not None and w.data_ptr() % 4 == 0,
        ROW_ALIGNED=row_aligned(nf4, N, K), BLOCK_R=BLOCK_R, enable_fp_fusion=False,
        **_dora_epilogue.launch_args(y, column_scale, undropped, product))


def lora_grad_input(dy, w, ds, lora_a, dx, seed, p, nf4=None):
    M, N = dy.shape
    R, K = lora_a.shape
    flags, (absmax, pairs, nested_code, nested_absmax, offset, shift, nested_shift), \
        (stride_wn, stride_wk) = weight_args(w, nf4)
    target = _common.target(dy.device)
    configs = [{**config, "EVEN_K": K % config["BLOCK_K"] == 0,
                "EVEN_N": N % config["BLOCK_N"] == 0} for config in
               with_decoding(grad_input_configs(target, dy.dtype, p > 0), nf4, K, target)]
    _common.launch(
        _lora_grad_input_kernel,
        lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(K, c["BLOCK_K"]),), configs,
        dy, w, ds, lora_a, dx, seed, absmax, pairs, nested_code, nested_absmax, offset,
        M, N, K, R, p, stride_wn, stride_wk, lora_a.stride(0), lora_a.stride(1), shift,
        nested_shift, bucket=M, DROPOUT=p > 0, **flags,
        PRECISION=precision(dy.dtype), PACKED_WORDS=nf4 is not None and w.data_ptr() % 4 == 0,
        ROW_ALIGNED=row_aligned(nf4, N, K), BLOCK_R=BLOCK_R, enable_fp_fusion=False)


def lora_grad_a(ds, x, da, seed, p):
    M, K = x.shape
    R = ds.shape[1]
    target = _common.target(x.device)
    config = grad_a_config(target, x.dtype)
    grid = (triton.cdiv(K, config["BLOCK_K"]), triton.cdiv(R, BLOCK_R))
    _lora_grad_a_kernel[grid](ds, x, da, seed, M, K, R, p, x.stride(0), x.stride(1),
                              DROPOUT=p > 0, PRECISION=precision(x.dtype), BLOCK_R=BLOCK_R,
                              **config)


def dropout_mask(seed, mask, p):
    M, K = mask.shape
    grid = (triton.cdiv(M, MASK_BLOCK_M), triton.cdiv(K, MASK_BLOCK_K))
    _dropout_mask_kernel[grid](seed, mask, M, K, p, BLOCK_M=MASK_BLOCK_M, BLOCK_K=MASK_BLOCK_K)
