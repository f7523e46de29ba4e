"""DoRA's weight norm: ``||W + s B A||`` per output row (N values, fp32), in one pass over W.

W is read as it is stored (dense, any strides, or packed NF4 decoded in registers by
``_weight.load_gemm_tile``, the GEMMs' lean decode, nested absmax or not). Each program owns BLOCK_N rows and walks K
in tiles: the rank-r correction s B A of a tile is one small product (B's rows times a tile of A's
columns, both fp32) added to the decoded tile in registers, and the squares summed in fp32. The
merged weight W + s B A never exists in memory; B and A are small and stay in cache.
"""

import triton
import triton.language as tl

from . import _common
from ._weight import decoding_flags, load_gemm_tile, weight_args

# BLOCK_R: the rank is covered in chunks of 16 (tl.dot's smallest inner dimension); a rank that is
# not a multiple of 16 is padded with zeros by the masks.
CONFIG = {"BLOCK_N": 16, "BLOCK_K": 128, "BLOCK_R": 16, "num_warps": 4}


@triton.jit
def _dora_norm_kernel(w_ptr, a_ptr, b_ptr, norm_ptr, absmax_ptr, pairs_ptr, nested_code_ptr,
                      nested_absmax_ptr, offset_ptr, block_shift, nested_shift, N, K, R, scaling,
                      stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
                      NF4: tl.constexpr, NESTED: tl.constexpr, SCALE_GROUP: tl.constexpr,
                      INLINE_PTX: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    ranks = tl.arange(0, BLOCK_R)
    sum_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        mask = row_mask[:, None] & col_mask[None, :]
        w = load_gemm_tile(w_ptr, rows, k0, N, K, stride_wn, stride_wk, absmax_ptr, pairs_ptr,
                           nested_code_ptr, nested_absmax_ptr, offset_ptr, block_shift,
                           nested_shift, NF4, NESTED, SCALE_GROUP, INLINE_PTX, BLOCK_K)
        delta = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + ranks
            b = tl.load(b_ptr + rows[:, None] * stride_bn + r[None, :] * stride_br,
                        mask=row_mask[:, None] & (r[None, :] < R), other=0.0)
            a = tl.load(a_ptr + r[:, None] * stride_ar + cols[None, :] * stride_ak,
                        mask=(r[:, None] < R) & col_mask[None, :], other=0.0)
            delta += tl.dot(b, a, input_precision="ieee")  # fp32 as torch's: not TF32
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
    grid = (triton.cdiv(N, CONFIG["BLOCK_N"]),)
    _dora_norm_kernel[grid](w, lora_a, lora_b, norm, *decoding, N, K, R, scaling, stride_wn,
                            stride_wk, lora_a.stride(0), lora_a.stride(1), lora_b.stride(0),
                            lora_b.stride(1), **flags,
                            **decoding_flags(nf4, K, CONFIG["BLOCK_K"], _common.target(w.device)),
                            **CONFIG)
