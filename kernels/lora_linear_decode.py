"""Fused LoRA / QLoRA linear, forward for small M (decode): split-K over the frozen weight.

With a few rows of x, the tiled forward (kernels/lora_linear.py) has only N / BLOCK_N programs, each
walking all of K: too few to keep a GPU's memory system busy, while the work is reading W. Here each
program takes one BLOCK_N slice of W's rows and one slice of K, for all M rows at once, so every
packed byte of W is read exactly once and there are N / BLOCK_N x SPLIT_K programs:

1. ``_lora_decode_kernel``: fp32 partial sums of x W^T per K-slice, (SPLIT_K, M, N); the programs of
   the first N slice also compute the partial shrink dropout(x) A^T of their K-slice, (SPLIT_K, M, R).
2. ``_lora_decode_epilogue_kernel``: sums the partials in a fixed order (deterministic, no atomics),
   rounds S to x's dtype (and stores it: backward needs it), adds s S B^T and the bias, one store.

Dropout, NF4 decoding, dtype and precision rules are those of the tiled path: the same helpers
(``dropout_keep`` from kernels/lora_linear.py, the weight readers of kernels/_weight.py), except
the NF4 code lookup (``load_decode_tile``: the 16 codes, copied into shared memory on CUDA GPUs,
instead of the 2 KB pair table; the same values bit for bit), which is what bounds a GEMV, and the
order of K in the NF4 GEMV's tiles (``in_mma_k_order``).
"""

import torch
import triton
import triton.language as tl

from . import _common
from ._common import cast_rounded, store_rounded
from ._weight import (gemm_operand, load_gemm_tile, load_group_absmax, precision, weight_args,
                      with_decoding, word_codes)
from .nf4_dequantize import decode_nf4_shared_codes, load_nested_offset, shared_codes
from .lora_linear import BLOCK_R, branch_dot, dropout_keep

# PROVISIONAL, not yet measured: rows up to which lowrank.ops takes this path instead of the tiled
# forward. One M block of 16 (tl.dot's smallest) holds them all; partial sums cost SPLIT_K x M x N
# fp32, which grows with M. The crossover must be measured on GPUs (bench/lora_linear.py's decode
# cases time both paths) before this value is trusted.
DECODE_MAX_M = 16
# Programs to aim for per streaming multiprocessor (in the interpreter,
# _common.INTERPRETER_MULTIPROCESSORS makes a few K-slices, so the tests exercise the split):
# where the NF4 decode bounds each SM (``evens_out_sms``), 4, warps enough for its schedulers to
# keep issuing; where DRAM bounds the launch, 2: each program streams 128 x 128 tiles two stages
# deep, and half the K-slices write and read back half the fp32 partial sums (static model,
# estimates, 16 rows of 4096 x 14336: RTX 4090 NF4 46.2 -> 42.1 us, nested 43.1 -> 39.1, dense
# 135.9 -> 133.8; H100 dense 40.9 -> 40.2; at 2 the H100 NF4 GEMV is 16.7 -> 30.3 us, issue-bound
# with too few warps). The model has no latency rule for DRAM: a GPU pass should confirm 8 warps
# an SM keep enough loads in flight.
PROGRAMS_PER_SM = 4
STREAMING_PROGRAMS_PER_SM = 2


# Tiles and launch options per kernel, a function of the target (``_common.Target``), x's dtype
# and the weight's kind: the one place each launcher's config comes from. BLOCK_M holds every row
# (DECODE_MAX_M). NF4 takes 128 outputs per program, not 64: the decode's fixed cost per loop
# iteration (x's tile, the operand shuffles, the loop) spreads over twice the weight, and the
# static model (bench.static, estimates) puts the H100 decode at 22 us instead of 30; the dense
# decode stays at 64 (at 128 its fp32 partial sums grow, for a model time 1-3% longer). NF4's
# BLOCK_K is 128 (16-bit x) for the same reason: the absmax of each row (its nested decode, and
# the staging of both through shared memory) is read once per 128 columns (H100, 16 rows of
# 4096 x 14336, model: nested 21.6 -> 18.0 us, NF4 17.4 -> 17.3).
def decode_tile(target, nf4, dtype, K):
    """BLOCK_M / BLOCK_N / BLOCK_K of the split-K partial GEMM (also kernels/lora_mixed.py's) for
    x of ``dtype`` and ``K`` columns: they size the grid and the partial sums, so every config of
    a list shares them. fp32 x keeps NF4's BLOCK_K at 64: its IEEE tl.dot (FMA units) at 128 took
    92 KB of shared memory, one CTA per SM on sm_89; so does AMD's (``amd``): built for gfx942
    (bf16, NF4 and nested, 16 rows, two stages), 128 x 128 took 132 KB of LDS, over the 64 KB a
    workgroup gets (Triton's launch raises OutOfResources), 128 x 64 34-67 KB (one stage: 32 KB,
    ``partial_stages``). NF4 with runs of one absmax shorter than
    MIN_PIPELINED_SCALE_GROUP (a K not a multiple of 32) takes 64 x 32: at 128 x 128 its absmax
    gathers (one per 2 to 16 elements; odd K, one per element, nested three loads each) spilled
    72 to 4304 bytes of stack on sm_89 and sm_90 (bf16, K = 73 and 74, the mixed partial GEMM's
    worst); at 64 x 32, 56 to 128 registers on sm_80 to sm_90 and none."""
    if nf4 is not None and K % MIN_PIPELINED_SCALE_GROUP:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32}
    return {"BLOCK_M": 16, "BLOCK_N": 64 if nf4 is None else 128,
            "BLOCK_K": 128 if nf4 is not None and dtype.itemsize == 2 and not amd(target) else 64}


def amd(target):
    """Whether ``target`` is an AMD GPU: a GPU without inline PTX (``_common.Target``)."""
    return target.arch is not None and not target.inline_ptx


# Registers per thread of the nested NF4 GEMV on sm_90 (ptxas' maxrregcount, ``partial_options``),
# so that 4 CTAs of 4 warps fit an SM (PROGRAMS_PER_SM): with its packed words loaded a step
# ahead (``prefetch_words``) ptxas took 168 (3 CTAs per SM, issue-bound with fewer warps: H100,
# 16 rows, model 17.0 -> 21.1 us); held to 128 it takes 127, no spills (16.4 us). The plain
# weight's took 120-125 unheld, and held to 128 more instructions (model 15.6 -> 15.9 us).
NESTED_MAX_REGISTERS = 128


def partial_options(target, nf4):
    """Launch options of the NF4 split-K partial GEMM beyond warps and stages (also
    kernels/lora_mixed.py's): the nested weight's NESTED_MAX_REGISTERS on sm_90."""
    if target.arch == 90 and nf4 is not None and nf4.nested_code is not None:
        return {"maxnreg": NESTED_MAX_REGISTERS}
    return {}


def decode_configs(target, dtype, nf4, K):
    """One config in Triton's interpreter, a list autotuned on GPUs (``_common.launch``). The
    tiles are the same in every config (``decode_tile``); the dense list varies warps. Two
    stages: NF4 tiles pipelined three deep need over 99 KB of shared memory on sm_86/sm_89, and
    spill registers on sm_90; unpipelined, the NF4 tile of 128 x 128 takes ~245 registers (2 CTAs
    per SM). NF4 takes 4 warps only: with 8 its 128-column tile spilled (nested, sm_80: 8 bytes
    of stack) and was never faster on a modelled GPU (bench.static, estimates). The launcher
    sets each config's stages for its K (``partial_stages``)."""
    tile = decode_tile(target, nf4, dtype, K)
    if target.arch is None or nf4 is not None:
        return [{**tile, "num_warps": 4, "num_stages": 2, **partial_options(target, nf4)}]
    return [{**tile, "num_warps": 4, "num_stages": 2}, {**tile, "num_warps": 8, "num_stages": 2}]


# The shortest run of a row's elements sharing one absmax (SCALE_GROUP, ``_weight.scale_group``)
# with which the split-K partial GEMM is software-pipelined. Its tile's absmax loads (BLOCK_N x
# BLOCK_K / SCALE_GROUP gathers; nested, their codes and scales too) are staged through shared
# memory, which for shorter runs took Triton's part of it (sm_80, nested bf16, 3 rows) to 48 KB
# at K = 72 (with the codes' 1 KB, over what a launch gets without Triton's opt-in), 52 KB at
# K = 80, 64 KB at K = 76, 96 KB at K = 74 and, odd K decoded element by element (SCALE_GROUP 0),
# 228 KB at K = 73, over every GPU's limit. Unpipelined: 8-36 KB on sm_80, sm_89 and sm_90 (bf16
# and fp32 x). Real layers' K, multiples of 64, keep two stages.
MIN_PIPELINED_SCALE_GROUP = 32


def partial_stages(target, nf4, config):
    """num_stages of a split-K partial GEMM ``config`` (with its ``decoding_flags``): 2, or 1
    (no software pipelining) for NF4 with runs of one absmax shorter than
    MIN_PIPELINED_SCALE_GROUP (a K not a multiple of 32), and for NF4 on AMD: built for gfx942
    (bf16, 16 rows), two stages of the 128 x 64 tile took 67 KB of LDS with the plain weight or
    runs of 32 (34 KB nested, runs of 64), over the 64 KB a workgroup gets; one stage 32 KB."""
    short_runs = nf4 is not None and config["SCALE_GROUP"] < MIN_PIPELINED_SCALE_GROUP
    return 1 if short_runs or (nf4 is not None and amd(target)) else 2


def epilogue_config(target, dtype):
    return {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4}


@triton.jit
def load_decode_tile(w_ptr, outs, k0, N, K, absmax_ptr, codes, nested_code_ptr,
                     nested_absmax_ptr, nested_offset, block_shift, nested_shift,
                     NESTED: tl.constexpr, SCALE_GROUP: tl.constexpr, INLINE_PTX: tl.constexpr,
                     BLOCK_K: tl.constexpr, words=None):
    """The NF4 tile W[outs, k0 : k0 + BLOCK_K] in fp32, as ``_weight.load_gemm_tile`` decodes it
    with SCALE_GROUP > 0 (the packed bytes loaded once, one absmax per row and group, the same
    values bit for bit), the codes looked up by ``decode_nf4_shared_codes`` in ``codes`` (what
    ``shared_codes`` returned, before the loop): the GEMV's lookup. Not
    ``load_gemm_tile`` with NIBBLE_LOOKUP: that one loads the absmax as a vector (a layout that
    lets sm_80-89 store a GEMM's decoded tile 16 bytes at a time), which here doubles the shared
    traffic of the M <= 16 tile (H100, 16 rows: 20.9 -> 25.1 us for the kernel, model).
    ``words``: the tile's packed bytes already loaded (``load_tile_words``), else loaded here."""
    BLOCK_N: tl.constexpr = outs.shape[0]
    GROUPS: tl.constexpr = BLOCK_K // SCALE_GROUP
    row_first = outs.to(tl.int64) * K  # the row's first element
    if words is None:
        pair = (k0 >> 1) + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(w_ptr + (row_first >> 1)[:, None] + pair[None, :],
                         mask=(outs < N)[:, None] & (pair < (K >> 1))[None, :], other=0)
        values = decode_nf4_shared_codes(packed, codes, INLINE_PTX)  # [BLOCK_N, BLOCK_K / 2, 2]
    else:
        values = word_codes(words, codes, INLINE_PTX, True)  # the 16-code lookup, as above
    scale = load_group_absmax(row_first, outs, k0, N, K, absmax_ptr, nested_code_ptr,
                              nested_absmax_ptr, nested_offset, block_shift, nested_shift, NESTED,
                              GROUPS, SCALE_GROUP, EVEN_K=False)
    if GROUPS == 1:
        return tl.reshape(values, [BLOCK_N, BLOCK_K]) * scale
    return tl.reshape(tl.reshape(values, [BLOCK_N, GROUPS, SCALE_GROUP]) * scale[:, :, None],
                      [BLOCK_N, BLOCK_K])


@triton.jit
def load_tile_words(w_ptr, outs, k0, N, K, k_end, BLOCK_K: tl.constexpr):
    """The packed bytes of the NF4 tile W[outs, k0 : k0 + BLOCK_K] as int32 words (4 bytes, 8
    elements each, in memory order; [BLOCK_N, BLOCK_K / 8]), none at or past column ``k_end``:
    for a loop to load a step ahead (``_weight.word_codes``). ``w_ptr`` 4-byte aligned, K a
    multiple of 32 (SCALE_GROUP >= 32): a row's words start on a multiple of 4 words, so where
    ``w_ptr`` is 16-byte aligned a thread's 4 words of a row (its quarter of the row's bytes in
    ``in_mma_k_order``) can be one load, in the layout the decode takes them in. Words, not bytes: Triton keeps a byte tile across a loop
    iteration as one register per byte, packed again for the lookup."""
    row_words = tl.multiple_of((outs.to(tl.int64) * K) >> 3, 4)
    word = tl.multiple_of(k0 >> 3, 4) + tl.arange(0, BLOCK_K // 8)
    return tl.load(w_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + row_words[:, None]
                   + word[None, :], mask=(outs < N)[:, None] & (word < (k_end >> 3))[None, :],
                   other=0)


@triton.jit
def in_mma_k_order(tile):
    """A [BLOCK_N, BLOCK_K] tile with its columns reordered: quarter t of the row's columns
    becomes columns 4 t to 4 t + 3 of every 16 (column 16 s + 4 t + e, e < 4, is column
    t BLOCK_K / 4 + 4 s + e of ``tile``). A K-step of mma.sync (16 x 8 x 16, 16-bit operands, 4
    consecutive columns per thread as Triton lays them out) gives lane t of a quad columns 4 t
    to 4 t + 3: each thread's columns are one contiguous quarter of the packed row (BLOCK_K / 8
    bytes), loaded whole, where in the physical order they were 2 bytes every 8 (byte loads
    repacked: ~1 instruction per element). A sum over K does not depend on its order; x's
    columns are read in the same order."""
    BLOCK_N: tl.constexpr = tile.shape[0]
    BLOCK_K: tl.constexpr = tile.shape[1]
    quarters = tl.reshape(tile, [BLOCK_N, 4, BLOCK_K // 16, 4])
    return tl.reshape(tl.permute(quarters, (0, 2, 1, 3)), [BLOCK_N, BLOCK_K])


@triton.jit
def load_x_in_mma_k_order(x_ptr, k0, M, K, stride_xm, stride_xk, BLOCK_M: tl.constexpr,
                          BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """in_mma_k_order(x[:, k0 : k0 + BLOCK_K]) for BLOCK_M = 16, loaded in the order of
    mma.sync's A operand registers, so that each mma's operand is one 16-byte shared load. The
    A operand of kWidth 4 (Triton's, with the decoded tile as the other operand) gives a thread
    4 columns (2 jh + jl) of each 16-column K-step in rows g and g + 8, and takes each mma's 4
    registers from two consecutive K-steps 2 q + u, in the order jl, row, u. Loaded in x's
    order, rows g and g + 8 came from two 16-byte loads of 8 columns each, which ptxas copied
    into each mma's operand registers (3 moves per mma: 96 per iteration of the H100 NF4 GEMV's
    loop). The tile is loaded as column pairs (t, q, jh, u, h), x's rows i < 8, and the pair's
    two columns jl: the shared copy Triton makes of it holds each pair's 8 rows in turn, and a
    thread's operand registers lie together. Rows past M read row M - 1 again (their sums are
    never stored); EVEN_K: K a multiple of BLOCK_K, no column mask."""
    HALF: tl.constexpr = BLOCK_M // 2
    QUARTER: tl.constexpr = BLOCK_K // 4  # columns of x per lane t of a quad
    pairs = tl.arange(0, BLOCK_K)
    h, u, jh = pairs & 1, (pairs >> 1) & 1, (pairs >> 2) & 1
    q, t = (pairs % QUARTER) >> 3, pairs // QUARTER
    pair_cols = k0 + t * QUARTER + 8 * q + 4 * u + 2 * jh
    cols = pair_cols[:, None, None] + tl.arange(0, 2)[None, None, :]
    rows = tl.minimum(tl.arange(0, HALF)[None, :, None] + (h * HALF)[:, None, None], M - 1)
    if EVEN_K:
        x = tl.load(x_ptr + rows * stride_xm + cols * stride_xk)
    else:
        x = tl.load(x_ptr + rows * stride_xm + cols * stride_xk, mask=cols < K, other=0.0)
    # (t, q, jh, u, h, i, jl) -> x's row h HALF + i, mma column 16 (2 q + u) + 4 t + 2 jh + jl
    x = tl.reshape(x, [4, QUARTER // 8, 2, 2, 2, HALF, 2])
    return tl.reshape(tl.permute(x, (4, 5, 1, 3, 0, 2, 6)), [BLOCK_M, BLOCK_K])


@triton.jit
def store_partial_base_gemm(x_ptr, w_ptr, partial_ptr, absmax_ptr, pairs_ptr, nested_code_ptr,
                            nested_absmax_ptr, offset_ptr, M, N, K, k_per_split, stride_xm,
                            stride_xk, stride_wn, stride_wk, block_shift, nested_shift,
                            NF4: tl.constexpr, NESTED: tl.constexpr, SCALE_GROUP: tl.constexpr,
                            INLINE_PTX: tl.constexpr, NIBBLE_LOOKUP: tl.constexpr,
                            PRECISION: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            EVEN_K: tl.constexpr = False, PREFETCH_WORDS: tl.constexpr = False):
    """The split-K base GEMM step, for a grid of (N / BLOCK_N, K-slices): this program's fp32
    partial x W^T of every row (all M in one block) over its K-slice, stored in (splits, M, N).
    Shared with the mixed-adapter decode path (kernels/lora_mixed.py), which has no shrink here.
    EVEN_K: K a multiple of BLOCK_K. PREFETCH_WORDS: W's packed bytes 4-byte aligned, to be
    loaded a step ahead where K is a multiple of 32 (``load_tile_words``, ``prefetch_words``)."""
    dtype = x_ptr.dtype.element_ty
    split = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    outs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if NF4 and SCALE_GROUP > 0:
        codes = shared_codes(pairs_ptr, INLINE_PTX)
    nested_offset = load_nested_offset(offset_ptr, NESTED)
    # The NF4 tile's packed bytes loaded a step ahead into registers, not software-pipelined
    # through shared memory (cp.async, then a read back: a third of the loop's shared traffic
    # besides the lookup).
    PREFETCH: tl.constexpr = NF4 and SCALE_GROUP >= 32 and PREFETCH_WORDS
    if PREFETCH:
        words_next = load_tile_words(w_ptr, outs, k_start, N, K, k_end, BLOCK_K)
    for k0 in range(k_start, k_end, BLOCK_K):
        if NF4 and SCALE_GROUP > 0:
            x = load_x_in_mma_k_order(x_ptr, k0, M, K, stride_xm, stride_xk, BLOCK_M, BLOCK_K,
                                      EVEN_K)
            if PREFETCH:
                words = words_next
                words_next = load_tile_words(w_ptr, outs, k0 + BLOCK_K, N, K, k_end, BLOCK_K)
                w = load_decode_tile(w_ptr, outs, k0, N, K, absmax_ptr, codes, nested_code_ptr,
                                     nested_absmax_ptr, nested_offset, block_shift, nested_shift,
                                     NESTED, SCALE_GROUP, INLINE_PTX, BLOCK_K, words)
            else:
                w = load_decode_tile(w_ptr, outs, k0, N, K, absmax_ptr, codes, nested_code_ptr,
                                     nested_absmax_ptr, nested_offset, block_shift, nested_shift,
                                     NESTED, SCALE_GROUP, INLINE_PTX, BLOCK_K)
            w = in_mma_k_order(w).to(dtype)
        else:
            cols = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                        mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0)
            w = load_gemm_tile(w_ptr, tl.program_id(0) * BLOCK_N, k0, N, K, stride_wn, stride_wk,
                               absmax_ptr, pairs_ptr, nested_code_ptr, nested_absmax_ptr,
                               nested_offset, block_shift, nested_shift, NF4, NESTED, SCALE_GROUP,
                               INLINE_PTX, NIBBLE_LOOKUP, BLOCK_N, BLOCK_K)
            w = gemm_operand(w, dtype, NF4, INLINE_PTX)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    tl.store(partial_ptr + (split * M + rows[:, None]) * N + outs[None, :], acc,
             mask=(rows[:, None] < M) & (outs[None, :] < N))


@triton.jit
def _lora_decode_kernel(x_ptr, w_ptr, a_ptr, partial_ptr, s_partial_ptr, seed_ptr, absmax_ptr,
                        pairs_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, M, N, K, R, p,
                        k_per_split, stride_xm, stride_xk, stride_wn, stride_wk, stride_ar,
                        stride_ak, block_shift, nested_shift, DROPOUT: tl.constexpr,
                        NF4: tl.constexpr, NESTED: tl.constexpr, SCALE_GROUP: tl.constexpr,
                        INLINE_PTX: tl.constexpr, NIBBLE_LOOKUP: tl.constexpr,
                        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                        EVEN_K: tl.constexpr = False, PREFETCH_WORDS: tl.constexpr = False):
    """Partial x W^T (and, for the first N slice, partial dropout(x) A^T) over one K-slice."""
    dtype = x_ptr.dtype.element_ty
    split = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    if tl.program_id(0) == 0:
        for r0 in range(0, R, BLOCK_R):
            ranks = r0 + tl.arange(0, BLOCK_R)
            s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(k_start, k_end, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                            mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0)
                if DROPOUT:
                    x = tl.where(dropout_keep(seed_ptr, rows, k0, K, p, BLOCK_K), x, 0.0)
                a = tl.load(a_ptr + ranks[:, None] * stride_ar + cols[None, :] * stride_ak,
                            mask=(ranks[:, None] < R) & (cols[None, :] < K), other=0.0)
                if a.dtype == dtype:
                    s = tl.dot(x, tl.trans(a), s, input_precision=PRECISION)
                else:  # fp32 A of a 16-bit x: IEEE fp32 (a few rows need no tensor cores; the
                    # tiled path's split of A took 8 bytes of stack here on sm_80 to sm_89)
                    s = tl.dot(x.to(tl.float32), tl.trans(a), s, input_precision="ieee")
            if DROPOUT:
                s = s / (1 - p)
            tl.store(s_partial_ptr + (split * M + rows[:, None]) * R + ranks[None, :], s,
                     mask=(rows[:, None] < M) & (ranks[None, :] < R))
    # The shrink first: after the base GEMM, its K-slice's loop test (empty or not) was kept for
    # the shrink's loop on the stack, 8 bytes with nested NF4 and fp32 adapters on sm_80 to 89.
    store_partial_base_gemm(x_ptr, w_ptr, partial_ptr, absmax_ptr, pairs_ptr, nested_code_ptr,
                            nested_absmax_ptr, offset_ptr, M, N, K, k_per_split, stride_xm,
                            stride_xk, stride_wn, stride_wk, block_shift, nested_shift, NF4, NESTED,
                            SCALE_GROUP, INLINE_PTX, NIBBLE_LOOKUP, PRECISION, BLOCK_M, BLOCK_N,
                            BLOCK_K, EVEN_K, PREFETCH_WORDS)


@triton.jit
def _lora_decode_epilogue_kernel(partial_ptr, s_partial_ptr, s_ptr, b_ptr, bias_ptr, y_ptr, M, N,
                                 R, splits, scaling, stride_bn, stride_br, HAS_BIAS: tl.constexpr,
                                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """Y = sum of partials + s S B^T + b, with S the sum of the shrink partials in S's dtype."""
    dtype = y_ptr.dtype.element_ty
    rows = tl.arange(0, BLOCK_M)
    outs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tile_mask = (rows[:, None] < M) & (outs[None, :] < N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for split in range(0, splits):
        acc += tl.load(partial_ptr + (split * M + rows[:, None]) * N + outs[None, :], mask=tile_mask,
                       other=0.0)
    lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        rank_mask = (rows[:, None] < M) & (ranks[None, :] < R)
        s_sum = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for split in range(0, splits):
            s_sum += tl.load(s_partial_ptr + (split * M + rows[:, None]) * R + ranks[None, :],
                             mask=rank_mask, other=0.0)
        s = cast_rounded(s_sum, s_ptr.dtype.element_ty)  # S's dtype, as the tiled path stores it
        if tl.program_id(0) == 0:
            tl.store(s_ptr + rows[:, None] * R + ranks[None, :], s, mask=rank_mask)
        b = tl.load(b_ptr + outs[:, None] * stride_bn + ranks[None, :] * stride_br,
                    mask=(outs[:, None] < N) & (ranks[None, :] < R), other=0.0)
        lora = branch_dot(s, tl.trans(b), lora, dtype, PRECISION)
    acc += scaling * lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + outs, mask=outs < N, other=0.0).to(tl.float32)[None, :]
    store_rounded(y_ptr + rows[:, None] * N + outs[None, :], acc, tile_mask)


# Tried for the H100 NF4 GEMV (16 x 4096 x 14336, static model: estimates; 15.2 us issue- and
# 15.0 us shared-bound, the epilogue 1.1-1.5 us) and not kept. The 16-code lookup alone is 4
# shared bytes per element (62% of the loop's shared traffic), so fewer instructions alone does
# not lift it:
# - The decoded tile as the MMA's A operand (tl.dot(w, x^T), K in that operand's order): sm_90
#   makes it a wgmma with W in registers, no copies of x's registers before each mma (767 -> 673
#   instructions per iteration), but 160 registers (3 CTAs per SM, 17.2 -> 21.7 us); 8 warps: 84
#   registers, issue 15.3 and shared 15.0 us once wgmma's register operand is not counted as
#   shared reads; sm_80-89 load the packed bytes one at a time in that order.
# - BLOCK_N = 256 (x's tile shared by twice the columns: shared 15.0 -> 13.6-13.9 us), 2 warps,
#   one stage, or x loaded already in the mma's K order: 146-245 registers, 21.7-34.7 us.
# Where the loop's instructions go (H100, 16 rows, bf16 x; per thread and iteration, 64 packed
# bytes: 767 instructions, 12.0 a byte, nested 803): the 16-code lookup 5.0 a byte (a prmt and a
# 4-byte shared load per code, 4 shifts and masks per 4 bytes), the absmax multiply 2.0, the bf16
# packing 1.0, copies of x's registers into each mma's A operand 1.6 (x's rows g and g + 8 come
# from two 16-byte loads; the A operand needs them in 4 consecutive registers), the mma 0.5, the
# tile loads 0.4, addresses, masks and the loop ~1.5. Shared memory per iteration: the lookup 64%,
# x read back by each of the 4 warps 16%, W's packed bytes through cp.async 16%.
# - The 256-row pair table copied 16 times into shared memory (copy c of row b at 128 b + 8 c, lane
#   l reading copy l % 16: conflict-free 8-byte loads, both codes of a byte in one; 3 instructions
#   a byte instead of 5): issue 15.2 -> 12.2 us (nested 16.0 -> 13.3), the loop 767 -> 599, but
#   shared memory unchanged (the same wavefronts), so 16 rows 16.7 -> 16.6 us, one row 15.2 ->
#   14.2 (model). Not kept: its 32 KB of static shared memory plus Triton's dynamic shared memory
#   pass 48 KB with fp32 adapters (20 KB dynamic: the shrink's fp32 tiles) and ragged shapes,
#   where a launch needs an opt-in that Triton's launcher makes only when the dynamic part alone
#   is over 48 KB; and those builds fit one CTA per SM on sm_89 (branch dec17-pairs-wip).
def evens_out_sms(target, nf4):
    """Whether ``split_k`` evens out the SMs' shares of W: where the NF4 decode bounds each SM
    (sm_90: issue and shared memory, static model), not where DRAM bounds the launch (sm_80-89,
    AMD, a dense W), where more K-slices only add partial sums to write and read back."""
    return nf4 is not None and target.arch == 90


def split_k(n_tiles, k_steps, multiprocessors, costs=None):
    """(K-slices, BLOCK_K steps per slice): enough programs to fill the device (PROGRAMS_PER_SM
    per SM with ``costs``, else STREAMING_PROGRAMS_PER_SM; or one per step), no empty slice.
    ``costs`` (step_bytes, partial_bytes): also even out the SMs' shares, as ``evens_out_sms``
    asks. Programs are dealt to SMs whole, so a count
    that is not a multiple of the SMs leaves some SMs one more (H100: 112 tiles x 4 slices are 4
    programs on some SMs, 3.4 on average); more, shorter slices even that out, but each program
    also writes its fp32 partial sums, which the epilogue reads back. Of the splits from the
    fewest up, the one whose busiest SM moves the fewest bytes (W's, ``step_bytes`` per BLOCK_K
    step, and twice its ``partial_bytes``), the fewer slices on a tie."""
    per_sm = STREAMING_PROGRAMS_PER_SM if costs is None else PROGRAMS_PER_SM
    programs = per_sm * multiprocessors
    fewest = max(1, min(k_steps, programs // n_tiles))
    splits = fewest
    if costs is not None:
        step_bytes, partial_bytes = costs

        def busiest_sm_bytes(count):
            steps = triton.cdiv(k_steps, count)
            programs_there = triton.cdiv(n_tiles * triton.cdiv(k_steps, steps), multiprocessors)
            return programs_there * (steps * step_bytes + 2 * partial_bytes)

        splits = min(range(fewest, k_steps + 1), key=lambda s: (busiest_sm_bytes(s), s))
    steps_per_split = triton.cdiv(k_steps, splits)
    return triton.cdiv(k_steps, steps_per_split), steps_per_split


def split_costs(target, nf4, tile, rows):
    """``split_k``'s costs for an M = ``rows`` GEMV in ``tile``s of an ``nf4`` weight, or None
    where ``evens_out_sms`` says no: W's bytes per program and BLOCK_K step (packed bytes and
    absmax), and one program's partial sums."""
    if not evens_out_sms(target, nf4):
        return None
    elements = tile["BLOCK_N"] * tile["BLOCK_K"]
    weight = elements // 2 + elements // nf4.blocksize * nf4.absmax.element_size()
    return weight, rows * tile["BLOCK_N"] * 4


def prefetch_words(target, nf4, w):
    """Whether the NF4 GEMV loads its packed words a step ahead (``store_partial_base_gemm``):
    ``w`` 4-byte aligned (``load_tile_words``), and for the nested weight on sm_90 only (and in
    Triton's interpreter), where NESTED_MAX_REGISTERS keeps it at 4 CTAs per SM; on sm_80-89
    it took 168 registers (3 CTAs per SM instead of 5, RTX 4090 DRAM-bound either way)."""
    nested = nf4 is not None and nf4.nested_code is not None
    return (nf4 is not None and w.data_ptr() % 4 == 0
            and (not nested or target.arch in (None, 90)))


def lora_decode_forward(x, w, lora_a, lora_b, bias, y, s, seed, p, scaling, nf4=None):
    """Y (M x N) and S (M x R) for M <= DECODE_MAX_M; arguments as the tiled path's launchers."""
    M, K = x.shape
    N, R = lora_b.shape
    target = _common.target(x.device)
    configs = [{**config, "num_stages": partial_stages(target, nf4, config),
                "EVEN_K": K % config["BLOCK_K"] == 0}
               for config in with_decoding(decode_configs(target, x.dtype, nf4, K), nf4, K, target)]
    config, epilogue = decode_tile(target, nf4, x.dtype, K), epilogue_config(target, x.dtype)
    assert M <= config["BLOCK_M"], "the decode path holds all rows in one M block"
    flags, (absmax, pairs, nested_code, nested_absmax, offset, shift, nested_shift), \
        (stride_wn, stride_wk) = weight_args(w, nf4)
    n_tiles = triton.cdiv(N, config["BLOCK_N"])
    splits, steps_per_split = split_k(n_tiles, triton.cdiv(K, config["BLOCK_K"]),
                                      target.multiprocessors,
                                      split_costs(target, nf4, config, M))
    partial = torch.empty(splits, M, N, dtype=torch.float32, device=x.device)
    s_partial = torch.empty(splits, M, R, dtype=torch.float32, device=x.device)
    prec = precision(x.dtype)
    _common.launch(
        _lora_decode_kernel, lambda c: (n_tiles, splits), configs,
        x, w, lora_a, partial, s_partial, seed, absmax, pairs, nested_code, nested_absmax, offset,
        M, N, K, R, p, steps_per_split * config["BLOCK_K"], x.stride(0), x.stride(1), stride_wn,
        stride_wk, lora_a.stride(0), lora_a.stride(1), shift, nested_shift, bucket=M,
        DROPOUT=p > 0, **flags, PRECISION=prec, BLOCK_R=BLOCK_R,
        PREFETCH_WORDS=prefetch_words(target, nf4, w), enable_fp_fusion=False)
    _lora_decode_epilogue_kernel[(triton.cdiv(N, epilogue["BLOCK_N"]),)](
        partial, s_partial, s, lora_b, y if bias is None else bias, y, M, N, R, splits, scaling,
        lora_b.stride(0), lora_b.stride(1), HAS_BIAS=bias is not None, PRECISION=prec,
        BLOCK_R=BLOCK_R, **epilogue)
