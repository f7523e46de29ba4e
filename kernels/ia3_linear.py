"""Fused IA3 linear, forward and backward.

For x (M x K), frozen W (N x K, dense or NF4), bias b and the learned vector l:

    output form (attention-style):  Y = (x W^T + b) * l        l has N elements
    feed-forward form:              Y = (x * l) W^T + b        l has K elements

    output form backward:  dX = (dY * l) W         dl = sum over tokens of dY * (x W^T + b)
    feed-forward backward: dX = (dY W) * l         dl = sum over tokens of (dY W) * x

- The scale is applied to the accumulator before the output tile's one store (output form), or to
  the x tile as it is loaded (feed-forward form): no extra pass over x or Y.
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

from . import _common
from ._common import cast_rounded, grouped_tile, row_offsets, store_rounded
from ._weight import gemm_operand, load_gemm_tile, precision, weight_args, with_decoding

# Tiles and launch options per kernel, a function of the target (``_common.Target``) and the
# operands' dtype: the one place each launcher's configs come from, a list autotuned on a GPU, as
# kernels/lora_linear.py's (one config in the interpreter and for fp32). The backward kernels'
# BLOCK_M sizes the dl partial sums the op allocates (``partial_rows``), so it does not vary.
# GROUP_M: tile rows per group of the grouped program order, as in kernels/lora_linear.py.
PARTIAL_BLOCK_M = 64


def forward_configs(target, dtype, feedforward):
    untuned = _common.untuned_forward_configs(target, dtype)
    if untuned:
        return untuned
    if target.arch == 90:
        # As lora_linear.forward_configs (the 256-row tile: 1030 -> 805 us at 4096 x 4096 x 14336
        # NF4 on H100, model); in the feed-forward form, whose x scale takes registers in the
        # loop, 128-row tiles spill (BLOCK_K 128) or exceed the NF4 decode's instruction ceiling
        # (BLOCK_K 64: 12.6 per element, nested).
        return [{"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4,
                 "num_stages": 3}] + (
            [] if feedforward else
            [{"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8,
              "num_stages": 3},
             {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8,
              "num_stages": 3}])
    # sm_80/86/89. On sm_89 (the 16-code lookup, ``_weight.nibble_lookup``) the feed-forward
    # form's BLOCK_K 64 tile spilled 184 bytes (its x scale in the loop): it keeps the pair table.
    return [{"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4,
             "num_stages": 3, **({"NIBBLE_LOOKUP": False} if feedforward else {})},
            {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4,
             "num_stages": 4}]


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
    # sm_80/86/89: with int64 row offsets, BLOCK_K 128 with 4 warps left 8 bytes of stack on
    # sm_86/89 (3 or 4 stages), and with 8 warps one CTA per SM (registers); this one builds
    # without stack and at 2 CTAs per SM on all three. The pair table, not sm_89's 16-code
    # lookup: with it the nested output form took 18.4 instructions per NF4 element (ceiling 17).
    return [{"BLOCK_M": PARTIAL_BLOCK_M, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8,
             "num_warps": 4, "num_stages": 3, "NIBBLE_LOOKUP": False}]


def grad_scale_configs(target, dtype):
    """The output form's forward tiles (it recomputes x W^T), at the partial sums' BLOCK_M: each
    W tile (BLOCK_N x BLOCK_K) once, with the first launch options the forward list gives it (the
    sm_90 256-row tile's 8 warps would be a slower copy of the 64-row one's 4: model)."""
    unique = {}
    for config in forward_configs(target, dtype, feedforward=False):
        unique.setdefault((config["BLOCK_N"], config["BLOCK_K"]),
                          {**config, "BLOCK_M": PARTIAL_BLOCK_M})
    return list(unique.values())


@triton.jit
def _ia3_forward_kernel(x_ptr, w_ptr, l_ptr, bias_ptr, y_ptr, absmax_ptr, pairs_ptr,
                        nested_code_ptr, nested_absmax_ptr, offset_ptr, M, N, K, stride_xm,
                        stride_xk, stride_wn, stride_wk, block_shift, nested_shift,
                        FEEDFORWARD: tl.constexpr, HAS_BIAS: tl.constexpr, NF4: tl.constexpr,
                        NESTED: tl.constexpr, SCALE_GROUP: tl.constexpr, INLINE_PTX: tl.constexpr,
                        NIBBLE_LOOKUP: tl.constexpr,
                        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Y = (x W^T + b) * l, or (x * l) W^T + b: one store per output tile, tiles in grouped order
    (``grouped_tile``)."""
    dtype = x_ptr.dtype.element_ty
    tile_m, tile_n = grouped_tile(tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    outs = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row_offsets(rows, stride_xm)[:, None] + cols[None, :] * stride_xk,
                    mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0)
        if FEEDFORWARD:
            scale = tl.load(l_ptr + cols, mask=cols < K, other=0.0)
            x = cast_rounded(x.to(tl.float32) * scale[None, :], dtype)
        w = load_gemm_tile(w_ptr, outs, k0, N, K, stride_wn, stride_wk, absmax_ptr, pairs_ptr,
                           nested_code_ptr, nested_absmax_ptr, offset_ptr, block_shift,
                           nested_shift, NF4, NESTED, SCALE_GROUP, INLINE_PTX, NIBBLE_LOOKUP,
                           BLOCK_K)
        w = gemm_operand(w, dtype, NF4, INLINE_PTX)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + outs, mask=outs < N, other=0.0).to(tl.float32)[None, :]
    if not FEEDFORWARD:
        acc *= tl.load(l_ptr + outs, mask=outs < N, other=0.0)[None, :]
    store_rounded(y_ptr + row_offsets(rows, N)[:, None] + outs[None, :], acc,
                  (rows[:, None] < M) & (outs[None, :] < N))


@triton.jit
def _ia3_grad_input_kernel(dy_ptr, w_ptr, l_ptr, x_ptr, dx_ptr, dl_ptr, absmax_ptr, pairs_ptr,
                           nested_code_ptr, nested_absmax_ptr, offset_ptr, M, N, K, stride_xm,
                           stride_xk, stride_wn, stride_wk, block_shift, nested_shift,
                           FEEDFORWARD: tl.constexpr, GRAD_SCALE: tl.constexpr, NF4: tl.constexpr,
                           NESTED: tl.constexpr, SCALE_GROUP: tl.constexpr,
                           INLINE_PTX: tl.constexpr, NIBBLE_LOOKUP: tl.constexpr,
                           PRECISION: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr):
    """dX = (dY * l) W, or (dY W) * l; in the feed-forward form with GRAD_SCALE, also this
    program's token-sum of (dY W) * x into row ``tile_m`` (its block of tokens) of ``dl_ptr``
    (fp32, ? x K). Tiles in grouped order (``grouped_tile``)."""
    dtype = dy_ptr.dtype.element_ty
    tile_m, tile_k = grouped_tile(tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k_first = tile_k * BLOCK_K
    cols = k_first + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        outs = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(dy_ptr + row_offsets(rows, N)[:, None] + outs[None, :],
                     mask=(rows[:, None] < M) & (outs[None, :] < N), other=0.0)
        if not FEEDFORWARD:
            scale = tl.load(l_ptr + outs, mask=outs < N, other=0.0)
            dy = cast_rounded(dy.to(tl.float32) * scale[None, :], dtype)
        w = load_gemm_tile(w_ptr, outs, k_first, N, K, stride_wn, stride_wk, absmax_ptr, pairs_ptr,
                           nested_code_ptr, nested_absmax_ptr, offset_ptr, block_shift,
                           nested_shift, NF4, NESTED, SCALE_GROUP, INLINE_PTX, NIBBLE_LOOKUP,
                           BLOCK_K)
        acc = tl.dot(dy, gemm_operand(w, dtype, NF4, INLINE_PTX), acc, input_precision=PRECISION)
    if FEEDFORWARD:
        if GRAD_SCALE:
            x = tl.load(x_ptr + row_offsets(rows, stride_xm)[:, None] + cols[None, :] * stride_xk,
                        mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0)
            tl.store(dl_ptr + tile_m * K + cols, tl.sum(acc * x.to(tl.float32), axis=0),
                     mask=cols < K)
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
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row_offsets(rows, stride_xm)[:, None] + cols[None, :] * stride_xk,
                    mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0)
        w = load_gemm_tile(w_ptr, outs, k0, N, K, stride_wn, stride_wk, absmax_ptr, pairs_ptr,
                           nested_code_ptr, nested_absmax_ptr, offset_ptr, block_shift,
                           nested_shift, NF4, NESTED, SCALE_GROUP, INLINE_PTX, NIBBLE_LOOKUP,
                           BLOCK_K)
        w = gemm_operand(w, dtype, NF4, INLINE_PTX)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + outs, mask=outs < N, other=0.0).to(tl.float32)[None, :]
    dy = tl.load(dy_ptr + row_offsets(rows, N)[:, None] + outs[None, :],
                 mask=(rows[:, None] < M) & (outs[None, :] < N), other=0.0)
    tl.store(dl_ptr + tile_m * N + outs, tl.sum(acc * dy.to(tl.float32), axis=0),
             mask=outs < N)


def partial_rows(M, feedforward):
    """Rows of the per-token-block dl buffer the backward kernels fill (either form)."""
    return triton.cdiv(M, PARTIAL_BLOCK_M)


def ia3_forward(x, w, scale, bias, y, feedforward, nf4=None):
    """``scale``: l as flat contiguous fp32. ``nf4``: None for a dense ``w`` (N x K, any strides),
    else the packed bytes' decoding tensors."""
    M, K = x.shape
    N = y.shape[1]
    flags, decoding, (stride_wn, stride_wk) = weight_args(w, nf4)
    target = _common.target(x.device)
    configs = with_decoding(forward_configs(target, x.dtype, feedforward), nf4, K, target)
    _common.launch(
        _ia3_forward_kernel,
        lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"]),), configs,
        x, w, scale, y if bias is None else bias, y, *decoding[:5], M, N, K, x.stride(0),
        x.stride(1), stride_wn, stride_wk, *decoding[5:], bucket=M, FEEDFORWARD=feedforward,
        HAS_BIAS=bias is not None, **flags,
        PRECISION=precision(x.dtype),
        enable_fp_fusion=False)


def ia3_grad_input(dy, w, scale, x, dx, grad_scale, feedforward, nf4=None):
    """dX into ``dx`` (M x K); in the feed-forward form also dl's per-token-block partial sums into
    ``grad_scale`` (fp32, partial_rows(M, True) x K) unless it is None."""
    M, K = dx.shape
    N = dy.shape[1]
    flags, decoding, (stride_wn, stride_wk) = weight_args(w, nf4)
    write_scale = feedforward and grad_scale is not None
    target = _common.target(dy.device)
    configs = with_decoding(grad_input_configs(target, dy.dtype), nf4, K, target)
    _common.launch(
        _ia3_grad_input_kernel,
        lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(K, c["BLOCK_K"]),), configs,
        dy, w, scale, x, dx, grad_scale if write_scale else dx, *decoding[:5], M, N, K,
        x.stride(0), x.stride(1), stride_wn, stride_wk, *decoding[5:], bucket=M, FEEDFORWARD=feedforward,
        GRAD_SCALE=write_scale, **flags,
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
