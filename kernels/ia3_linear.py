"""Fused IA3 linear, forward and backward.

For x (M x K), frozen W (N x K, dense or NF4), bias b and the learned vector l:

    output form (attention-style):  Y = (x W^T + b) * l        l has N elements
    feed-forward form:              Y = (x * l) W^T + b        l has K elements

    output form backward:  dX = (dY * l) W         dl = sum over tokens of dY * (x W^T + b)
    feed-forward backward: dX = (dY W) * l         dl = sum over tokens of (dY W) * x

- A scale on the GEMM's output (Y's columns in the output form, dX's in the feed-forward form)
  is applied to the accumulator before the tile's one store. A scale on its input (x in the
  feed-forward forward, dY in the output form's dX) is a pass of its own before the GEMM
  (``scale_columns``: the operand read and written once, each product rounded once), and the
  GEMM's loop streams the scaled operand as it streams an unscaled one. Scaling the tiles
  inside the loop instead took them through registers rather than straight to shared memory:
  the feed-forward forward took 13.4-16.3 instructions per NF4 element on sm_89 (the 16-code
  lookup spilled) and 8.4-9.0 on sm_90, which kept its 64-row tile (the larger ones spilled or
  passed the instruction gate; H100 2198 us at 4096 x 4096 x 14336 NF4, issue-bound, against
  786 with the pass and the 256-row tile; model); the output form's
  dX 15.1-15.7 on sm_89 and 9.2-9.8 on sm_90 (H100 2416 us, issue-bound; 1479 + 78 for the pass).
- dl is reduced inside the kernels: each program sums its BLOCK_M tokens and writes one row of a
  (cdiv(M, BLOCK_M) x features) fp32 buffer, which the op sums in a fixed order (deterministic).
  In the feed-forward form that happens in the dX kernel, which already holds dY W; in the output
  form a kernel recomputes x W^T + b tile by tile, as the forward does, rather than keep it.
- NF4 tiles of W are decoded in registers (see ``_weight.load_weight_tile``).
- The GEMMs run in x's dtype with fp32 accumulation; l is applied in fp32 (PEFT keeps it fp32 and
  multiplies in fp32), and a scaled operand is rounded to x's dtype once, as PEFT's is.
"""

import triton
import triton.language as tl

from . import _common, dora_grad_scale
from ._common import grouped_tile, row_offsets, store_rounded
from ._weight import (frozen_codes, frozen_tile_dot, gemm_operand, load_gemm_tile, precision,
                      row_aligned, weight_args, with_decoding)
from .nf4_dequantize import load_nested_offset

# Tiles and launch options per kernel, a function of the target (``_common.Target``) and the
# operands' dtype: the one place each launcher's configs come from, a list autotuned on a GPU, as
# kernels/lora_linear.py's (one config in the interpreter and for fp32). The backward kernels'
# BLOCK_M sizes the dl partial sums the op allocates (``partial_rows``), so it does not vary.
# GROUP_M: tile rows per group of the grouped program order, as in kernels/lora_linear.py.
PARTIAL_BLOCK_M = 64


def forward_configs(target, dtype):
    untuned = _common.untuned_forward_configs(target, dtype)
    if untuned:
        return untuned
    if target.arch == 90:
        # As lora_linear.forward_configs (the 256-row tile: 1030 -> 805 us at 4096 x 4096 x 14336
        # NF4 on H100, model), computed transposed as its is (TRANSPOSED_TILE, the decoded W
        # wgmma's register operand): 764 -> 706 us NF4, 784 -> 737 nested, dense unchanged (830,
        # L2-bound); model, issue-bound now, 224-226 registers, no spills. Its packed NF4 tile
        # decoded straight into that operand's layout (REGISTER_ORDER, as the LoRA forward's), in
        # 2 stages (3 left it issue-bound at 255 registers, 9.5 / 10.3 instructions per NF4 /
        # nested element), x unmasked where K is a multiple of BLOCK_K (EVEN_K): 698 -> 640 us
        # NF4 (L2-bound; 9.0 -> 9.1 instructions per element), 711 -> 662 nested (9.5 -> 9.5).
        return [{"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4,
                 "num_stages": 3},
                {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8,
                 "num_stages": 2, "TRANSPOSED_TILE": True},
                {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8,
                 "num_stages": 3}]
    # sm_80/86/89. BLOCK_K 32 in 2 stages, not 4 (or 3): sm_89 7.2 / 7.8 instructions per NF4 /
    # nested element against 7.9 / 8.7, 3 CTAs per SM either way (16 KB of shared memory).
    return [{"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4,
             "num_stages": 3},
            {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4,
             "num_stages": 2}]


def grad_input_configs(target, dtype):
    if target.arch is None:
        return [{"BLOCK_M": PARTIAL_BLOCK_M, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 2,
                 "num_warps": 4, "num_stages": 3}]
    if dtype.itemsize == 4:
        return [{"BLOCK_M": PARTIAL_BLOCK_M, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 8,
                 "num_warps": 4, "num_stages": 3}]
    if target.arch == 90:  # BLOCK_N 128 with 8 warps: 11.6 instructions per NF4 element
        return [{"BLOCK_M": PARTIAL_BLOCK_M, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8,
                 "num_warps": 4, "num_stages": 3},
                {"BLOCK_M": PARTIAL_BLOCK_M, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8,
                 "num_warps": 4, "num_stages": 4}]
    # sm_80/86/89: kernels/lora_linear.py's dX tile, 64 x 64 x 128: the loop's fixed work over
    # twice the decoded elements of BLOCK_K 64, on sm_89 7.2 / 7.6 instructions per NF4 / nested
    # element against 8.3-8.5 / 8.9-9.2; 2 CTAs per SM and no stack on all three (with the int64
    # row offsets before load_gemm_tile's int32 ones it left 8 bytes of stack on sm_86/89; with
    # 8 warps, one CTA per SM). Tensor-bound either way: RTX 4090 2915 us at 4096 x 4096 x
    # 14336 (model; the pair table's lookups had made it L1-bound, 3761-3818 us). (With dY's
    # scale in the loop the 16-code lookup took 18.4 nested.)
    return [{"BLOCK_M": PARTIAL_BLOCK_M, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8,
             "num_warps": 4, "num_stages": 3}]


def grad_scale_configs(target, dtype):
    """The output form's forward tiles (it recomputes x W^T), at the partial sums' BLOCK_M: each
    W tile (BLOCK_N x BLOCK_K) once, with the first launch options the forward list gives it (the
    sm_90 256-row tile's 8 warps would be a slower copy of the 64-row one's 4: model). Not the
    forward's TRANSPOSED_TILE, which the kernel does not take: its 64-row tiles computed
    transposed were slower (model, H100 4096 x 4096 x 14336: NF4 1452 -> 2102 us, nested 1508 ->
    2169, issue-bound; dense unchanged)."""
    unique = {}
    for config in forward_configs(target, dtype):
        tile = {key: value for key, value in config.items() if key != "TRANSPOSED_TILE"}
        unique.setdefault((tile["BLOCK_N"], tile["BLOCK_K"]), {**tile, "BLOCK_M": PARTIAL_BLOCK_M})
    return list(unique.values())


@triton.jit
def _ia3_forward_kernel(x_ptr, w_ptr, l_ptr, bias_ptr, y_ptr, absmax_ptr, pairs_ptr,
                        nested_code_ptr, nested_absmax_ptr, offset_ptr, M, N, K, stride_xm,
                        stride_xk, stride_wn, stride_wk, block_shift, nested_shift,
                        SCALE_OUTPUT: tl.constexpr, HAS_BIAS: tl.constexpr, NF4: tl.constexpr,
                        NESTED: tl.constexpr, SCALE_GROUP: tl.constexpr, INLINE_PTX: tl.constexpr,
                        NIBBLE_LOOKUP: tl.constexpr,
                        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                        TRANSPOSED_TILE: tl.constexpr = False, PACKED_WORDS: tl.constexpr = False,
                        EVEN_K: tl.constexpr = False, ROW_ALIGNED: tl.constexpr = False):
    """Y = x W^T + b, times l per output column if SCALE_OUTPUT (the output form; the
    feed-forward form's x comes scaled): one store per output tile, tiles in grouped order
    (``grouped_tile``). TRANSPOSED_TILE and PACKED_WORDS: as kernels/lora_linear.py's forward,
    x W^T summed as W x^T (the weight wgmma's register operand) and transposed back before the
    epilogue. ROW_ALIGNED: the absmax indexed in int32 by row and column
    (``_weight.row_aligned``)."""
    dtype = x_ptr.dtype.element_ty
    tile_m, tile_n = grouped_tile(tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    outs = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if TRANSPOSED_TILE:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # NF4: rows past M read row M - 1, never stored: one mask for all a thread's rows (as
    # kernels/lora_linear.py's forward). Dense tiles keep the row mask: without it sm_89's
    # 64 x 128 x 64 tile took 8 bytes of stack.
    x_rows = tl.minimum(rows, M - 1) if NF4 else rows
    codes = frozen_codes(pairs_ptr, NF4, SCALE_GROUP, NIBBLE_LOOKUP, INLINE_PTX)
    nested_offset = load_nested_offset(offset_ptr, NESTED)
    # As kernels/lora_linear.py's forward: a transposed packed NF4 tile decoded straight into
    # wgmma's register operand layout.
    REGISTER_ORDER: tl.constexpr = TRANSPOSED_TILE and NF4 and SCALE_GROUP >= 8 and PACKED_WORDS
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x_tile = x_ptr + row_offsets(x_rows, stride_xm)[:, None] + cols[None, :] * stride_xk
        if NF4 and EVEN_K:  # K a multiple of BLOCK_K: no mask at all
            x = tl.load(x_tile)
        else:
            if NF4:
                x_mask = cols[None, :] < K
            else:
                x_mask = (rows[:, None] < M) & (cols[None, :] < K)
            x = tl.load(x_tile, mask=x_mask, other=0.0)
        w = load_gemm_tile(w_ptr, tile_n * BLOCK_N, k0, N, K, stride_wn, stride_wk, absmax_ptr,
                           codes, nested_code_ptr, nested_absmax_ptr, nested_offset, block_shift,
                           nested_shift, NF4, NESTED, SCALE_GROUP, INLINE_PTX, NIBBLE_LOOKUP,
                           BLOCK_N, BLOCK_K, REGISTER_ORDER, EVEN_K, ROW_ALIGNED)
        acc = frozen_tile_dot(x, w, acc, dtype, NF4, INLINE_PTX, PRECISION, TRANSPOSED_TILE)
    if TRANSPOSED_TILE:
        acc = tl.trans(acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + outs, mask=outs < N, other=0.0).to(tl.float32)[None, :]
    if SCALE_OUTPUT:
        acc *= tl.load(l_ptr + outs, mask=outs < N, other=0.0)[None, :]
    store_rounded(y_ptr + row_offsets(rows, N)[:, None] + outs[None, :], acc,
                  (rows[:, None] < M) & (outs[None, :] < N))


@triton.jit
def _ia3_grad_input_kernel(dy_ptr, w_ptr, l_ptr, x_ptr, dx_ptr, dl_ptr, absmax_ptr, pairs_ptr,
                           nested_code_ptr, nested_absmax_ptr, offset_ptr, M, N, K, stride_xm,
                           stride_xk, stride_wn, stride_wk, block_shift, nested_shift,
                           SCALE_OUTPUT: tl.constexpr, GRAD_SCALE: tl.constexpr, NF4: tl.constexpr,
                           NESTED: tl.constexpr, SCALE_GROUP: tl.constexpr,
                           INLINE_PTX: tl.constexpr, NIBBLE_LOOKUP: tl.constexpr,
                           PRECISION: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr):
    """dX = dY W, times l per column if SCALE_OUTPUT (the feed-forward form; the output form's
    dY comes scaled); with GRAD_SCALE also this program's token-sum of (dY W) * x into row
    ``tile_m`` (its block of tokens) of ``dl_ptr`` (fp32, ? x K), the feed-forward form's dl.
    Tiles in grouped order (``grouped_tile``)."""
    dtype = dy_ptr.dtype.element_ty
    tile_m, tile_k = grouped_tile(tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k_first = tile_k * BLOCK_K
    cols = k_first + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    dy_rows = dy_ptr + row_offsets(tl.minimum(rows, M - 1), N)[:, None]  # as the forward's x
    codes = frozen_codes(pairs_ptr, NF4, SCALE_GROUP, NIBBLE_LOOKUP, INLINE_PTX)
    nested_offset = load_nested_offset(offset_ptr, NESTED)
    for n0 in range(0, N, BLOCK_N):
        outs = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(dy_rows + outs[None, :], mask=outs[None, :] < N, other=0.0)
        w = load_gemm_tile(w_ptr, n0, k_first, N, K, stride_wn, stride_wk, absmax_ptr, codes,
                           nested_code_ptr, nested_absmax_ptr, nested_offset, block_shift,
                           nested_shift, NF4, NESTED, SCALE_GROUP, INLINE_PTX, NIBBLE_LOOKUP,
                           BLOCK_N, BLOCK_K)
        acc = tl.dot(dy, gemm_operand(w, dtype, NF4, INLINE_PTX), acc, input_precision=PRECISION)
    if GRAD_SCALE:
        x = tl.load(x_ptr + row_offsets(rows, stride_xm)[:, None] + cols[None, :] * stride_xk,
                    mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0)
        # Rows past M (row M - 1's dY again) add exactly nothing, whatever their values.
        product = tl.where(rows[:, None] < M, acc * x.to(tl.float32), 0.0)
        tl.store(dl_ptr + tile_m * K + cols, tl.sum(product, axis=0), mask=cols < K)
    if SCALE_OUTPUT:
        acc *= tl.load(l_ptr + cols, mask=cols < K, other=0.0)[None, :]
    store_rounded(dx_ptr + row_offsets(rows, K)[:, None] + cols[None, :], acc,
                  (rows[:, None] < M) & (cols[None, :] < K))


@triton.jit
def _ia3_grad_scale_kernel(x_ptr, w_ptr, bias_ptr, dy_ptr, dl_ptr, absmax_ptr, pairs_ptr,
                           nested_code_ptr, nested_absmax_ptr, offset_ptr, M, N, K, stride_xm,
                           stride_xk, stride_wn, stride_wk, block_shift, nested_shift,
                           HAS_BIAS: tl.constexpr, NF4: tl.constexpr, NESTED: tl.constexpr,
                           SCALE_GROUP: tl.constexpr, INLINE_PTX: tl.constexpr,
                           NIBBLE_LOOKUP: tl.constexpr,
                           PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Output form: this program's token-sum of dY * (x W^T + b) into row ``tile_m`` (its block
    of tokens) of ``dl_ptr`` (fp32, ? x N); x W^T + b is recomputed here, never stored. Tiles in
    grouped order (``grouped_tile``)."""
    dtype = x_ptr.dtype.element_ty
    tile_m, tile_n = grouped_tile(tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    outs = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_rows = x_ptr + row_offsets(tl.minimum(rows, M - 1), stride_xm)[:, None]  # as the forward's
    codes = frozen_codes(pairs_ptr, NF4, SCALE_GROUP, NIBBLE_LOOKUP, INLINE_PTX)
    nested_offset = load_nested_offset(offset_ptr, NESTED)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + cols[None, :] * stride_xk, mask=cols[None, :] < K, other=0.0)
        w = load_gemm_tile(w_ptr, tile_n * BLOCK_N, k0, N, K, stride_wn, stride_wk, absmax_ptr,
                           codes, nested_code_ptr, nested_absmax_ptr, nested_offset, block_shift,
                           nested_shift, NF4, NESTED, SCALE_GROUP, INLINE_PTX, NIBBLE_LOOKUP,
                           BLOCK_N, BLOCK_K)
        w = gemm_operand(w, dtype, NF4, INLINE_PTX)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + outs, mask=outs < N, other=0.0).to(tl.float32)[None, :]
    dy = tl.load(dy_ptr + row_offsets(rows, N)[:, None] + outs[None, :],
                 mask=(rows[:, None] < M) & (outs[None, :] < N), other=0.0)
    # Rows past M (row M - 1's x again) add exactly nothing, whatever their values.
    product = tl.where(rows[:, None] < M, acc * dy.to(tl.float32), 0.0)
    tl.store(dl_ptr + tile_m * N + outs, tl.sum(product, axis=0), mask=outs < N)


def partial_rows(M, feedforward):
    """Rows of the per-token-block dl buffer the backward kernels fill (either form)."""
    return triton.cdiv(M, PARTIAL_BLOCK_M)


def scale_columns(t, scale, scaled):
    """``scaled`` = t * l per column, each product in fp32 rounded once into t's dtype, as the
    GEMMs rounded a scaled tile in their loops and as PEFT rounds it: the feed-forward form's x
    (``ia3_forward``). ``t``: M x C, contiguous; ``scale``: l, C values, flat contiguous fp32.
    DoRA's backward scale pass without its dropout shift or column sums is exactly that (one
    read and one write of t), so it runs here."""
    dora_grad_scale.dora_grad_scale(t, scale, scaled)


def ia3_forward(x, w, bias, y, output_scale=None, nf4=None):
    """Y = x W^T + bias, times ``output_scale`` per column if given (the output form's l, flat
    contiguous fp32); the feed-forward form passes its x already scaled (``scale_columns``).
    ``nf4``: None for a dense ``w`` (N x K, any strides), else the packed bytes' decoding
    tensors."""
    M, K = x.shape
    N = y.shape[1]
    flags, decoding, (stride_wn, stride_wk) = weight_args(w, nf4)
    target = _common.target(x.device)
    configs = [{**config, "EVEN_K": K % config["BLOCK_K"] == 0} for config in
               with_decoding(forward_configs(target, x.dtype), nf4, K, target)]
    _common.launch(
        _ia3_forward_kernel,
        lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"]),), configs,
        x, w, y if output_scale is None else output_scale, y if bias is None else bias, y,
        *decoding[:5], M, N, K, x.stride(0), x.stride(1), stride_wn, stride_wk, *decoding[5:],
        bucket=M, SCALE_OUTPUT=output_scale is not None, HAS_BIAS=bias is not None, **flags,
        PRECISION=precision(x.dtype), PACKED_WORDS=nf4 is not None and w.data_ptr() % 4 == 0,
        ROW_ALIGNED=row_aligned(nf4, N, K), enable_fp_fusion=False)


def ia3_grad_input(dy, w, dx, output_scale=None, x=None, grad_scale=None, nf4=None):
    """dX = dY W into ``dx`` (M x K), times ``output_scale`` per column if given (the
    feed-forward form's l, flat contiguous fp32; the output form passes its dY already scaled,
    ``scale_columns``). With ``grad_scale`` (fp32, partial_rows(M, True) x K) and ``x``, also the
    feed-forward form's dl partial sums, from dY W before the scale."""
    M, K = dx.shape
    N = dy.shape[1]
    flags, decoding, (stride_wn, stride_wk) = weight_args(w, nf4)
    x = dx if x is None else x  # read only with grad_scale
    target = _common.target(dy.device)
    configs = with_decoding(grad_input_configs(target, dy.dtype), nf4, K, target)
    _common.launch(
        _ia3_grad_input_kernel,
        lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(K, c["BLOCK_K"]),), configs,
        dy, w, dx if output_scale is None else output_scale, x, dx,
        dx if grad_scale is None else grad_scale, *decoding[:5], M, N, K, x.stride(0),
        x.stride(1), stride_wn, stride_wk, *decoding[5:], bucket=M,
        SCALE_OUTPUT=output_scale is not None, GRAD_SCALE=grad_scale is not None, **flags,
        PRECISION=precision(dy.dtype),
        enable_fp_fusion=False)


def ia3_grad_scale(x, w, bias, dy, grad_scale, nf4=None):
    """Output form: dl's per-token-block partial sums into ``grad_scale`` (fp32,
    partial_rows(M, False) x N)."""
    M, K = x.shape
    N = dy.shape[1]
    flags, decoding, (stride_wn, stride_wk) = weight_args(w, nf4)
    target = _common.target(x.device)
    configs = with_decoding(grad_scale_configs(target, x.dtype), nf4, K, target)
    _common.launch(
        _ia3_grad_scale_kernel,
        lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"]),), configs,
        x, w, dy if bias is None else bias, dy, grad_scale, *decoding[:5], M, N, K, x.stride(0),
        x.stride(1), stride_wn, stride_wk, *decoding[5:], bucket=M, HAS_BIAS=bias is not None, **flags,
        PRECISION=precision(x.dtype), enable_fp_fusion=False)
