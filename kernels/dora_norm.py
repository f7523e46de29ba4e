"""DoRA's weight norm: ``||W + s B A||`` per output row (N values, fp32), in one pass over W.

W is read as it is stored (dense, any strides, or packed NF4 decoded in registers by
``_weight.load_gemm_tile``, the GEMMs' lean decode, nested absmax or not). Each program owns BLOCK_N rows and walks K
in tiles: the rank-r correction s B A of a tile is one small product (B's rows times a tile of A's
columns, both fp32) added to the decoded tile in registers, and the squares summed in fp32. The
merged weight W + s B A never exists in memory; B and A are small and stay in cache.

The product runs on tensor cores at close to fp32 accuracy (``rank_product_precision``): on NVIDIA
GPUs as tf32x3, three TF32 products of each factor's high and low halves (about 22 of fp32's 24
mantissa bits; the low x low product is dropped), on AMD as bf16x6 (three bf16 pieces of each).
An IEEE fp32 product would run on the FMA units, one instruction per rank per element: on sm_90
that made the norm pass 40.4 instructions per NF4 element at BLOCK_R 16, against 21.6 now (the
static report; an emulation of tf32x3 in torch gave the norm's error of IEEE fp32, ~1e-7 relative,
where plain TF32 gave 1e-4).
"""

import torch
import triton
import triton.language as tl

from . import _common
from ._weight import decoding_flags, frozen_codes, load_gemm_tile, weight_args
from .nf4_dequantize import load_nested_offset

# BLOCK_R: the rank is covered in chunks of 16 (tl.dot's smallest inner dimension); a rank that is
# not a multiple of 16 is padded with zeros by the masks.
def norm_config(target, dtype):
    """Tiles and launch options for a ``_common.Target`` (W's dtype does not change them). sm_90:
    64 rows per program, enough for wgmma and for the split of each A tile into its halves to be
    shared by 64 rows of W. mma.sync GPUs (and the interpreter): K tiles of 32, as 64 x 64 spills
    there (sm_80 to sm_89, ragged shapes)."""
    if target.arch == 90:
        return {"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_R": 16, "num_warps": 4}
    return {"BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_R": 16, "num_warps": 4}


def rank_product_precision():
    """tl.dot's input precision for s B A: near fp32 on tensor cores, in the form the GPU's
    backend offers (NVIDIA, and Triton's interpreter, which multiplies in fp32 whatever it is
    told: tf32x3; AMD: bf16x6)."""
    return "bf16x6" if torch.version.hip else "tf32x3"


@triton.jit
def _dora_norm_kernel(w_ptr, a_ptr, b_ptr, norm_ptr, absmax_ptr, pairs_ptr, nested_code_ptr,
                      nested_absmax_ptr, offset_ptr, block_shift, nested_shift, N, K, R, scaling,
                      stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
                      NF4: tl.constexpr, NESTED: tl.constexpr, SCALE_GROUP: tl.constexpr,
                      INLINE_PTX: tl.constexpr, NIBBLE_LOOKUP: tl.constexpr,
                      RANK_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    ranks = tl.arange(0, BLOCK_R)
    sum_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    codes = frozen_codes(pairs_ptr, NF4, SCALE_GROUP, NIBBLE_LOOKUP, INLINE_PTX)
    nested_offset = load_nested_offset(offset_ptr, NESTED)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        mask = row_mask[:, None] & col_mask[None, :]
        w = load_gemm_tile(w_ptr, tl.program_id(0) * BLOCK_N, k0, N, K, stride_wn, stride_wk,
                           absmax_ptr, codes, nested_code_ptr, nested_absmax_ptr, nested_offset,
                           block_shift, nested_shift, NF4, NESTED, SCALE_GROUP, INLINE_PTX,
                           NIBBLE_LOOKUP, BLOCK_N, BLOCK_K)
        delta = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + ranks
            b = tl.load(b_ptr + rows[:, None] * stride_bn + r[None, :] * stride_br,
                        mask=row_mask[:, None] & (r[None, :] < R), other=0.0)
            a = tl.load(a_ptr + r[:, None] * stride_ar + cols[None, :] * stride_ak,
                        mask=(r[:, None] < R) & col_mask[None, :], other=0.0)
            delta = tl.dot(b, a, delta, input_precision=RANK_PRECISION)
        # Masked elements must add nothing: a nested NF4 decode gives them the absmax offset.
        merged = tl.where(mask, w + scaling * delta, 0.0)
        sum_sq += tl.sum(merged * merged, axis=1)
    tl.store(norm_ptr + rows, tl.sqrt_rn(sum_sq), mask=row_mask)


def dora_norm(w, lora_a, lora_b, scaling, norm, nf4=None):
    """``norm`` (N, fp32, contiguous) = the row norms of W + scaling B A.

    ``w``: dense N x K (any strides; ``nf4`` None) or the flat packed bytes of an NF4 weight with
    ``nf4`` what decodes them (``FrozenWeight.nf4``). ``lora_a`` (r x K), ``lora_b`` (N x r): fp32,
    any strides. N, K and r at least 1."""
    N, R = lora_b.shape
    K = lora_a.shape[1]
    flags, decoding, (stride_wn, stride_wk) = weight_args(w, nf4)
    target = _common.target(w.device)
    config = norm_config(target, w.dtype)
    grid = (triton.cdiv(N, config["BLOCK_N"]),)
    _dora_norm_kernel[grid](w, lora_a, lora_b, norm, *decoding, N, K, R, scaling, stride_wn,
                            stride_wk, lora_a.stride(0), lora_a.stride(1), lora_b.stride(0),
                            lora_b.stride(1), **flags,
                            **decoding_flags(nf4, K, config["BLOCK_K"], target),
                            RANK_PRECISION=rank_product_precision(), **config)
