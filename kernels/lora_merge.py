"""Merge a LoRA adapter into its frozen weight: W' = W + s B A, in one pass over W.

W is dense (any strides; the result may overwrite it, which is how the in-place merge and unmerge
run, unmerge with -s) or packed NF4. The result is dense in any float dtype, or NF4 again: each
program then holds one whole quantization block, dequantizes it, adds s B A, and requantizes it
exactly as ``nf4_quantize`` does (nested absmax, which needs the mean of every absmax, is
quantized afterwards by the absmax kernel of nf4_quantize, as for any quantization).

B A is summed one rank at a time in fp32, each product rounded before its add (no FMA), and s
applied to the sum: ``lowrank.reference.merge_lora`` does the same, so the merged fp32 values are
equal and the NF4 bytes agree with bitsandbytes' quantization of the reference's merged weight.
"""

import triton
import triton.language as tl

from ._weight import load_weight_tile, merge_args, store_weight_block
from .nf4_dequantize import load_nested_offset


@triton.jit
def _lora_merge_kernel(w_ptr, a_ptr, b_ptr, out_ptr, out_absmax_ptr, bounds_ptr, absmax_ptr,
                       pairs_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, stride_wn,
                       stride_wk, stride_on, stride_ok, block_shift, nested_shift, N, K, R, scaling,
                       stride_ar, stride_ak, stride_bn, stride_br, NF4: tl.constexpr,
                       NESTED: tl.constexpr, NF4_OUT: tl.constexpr, BLOCK: tl.constexpr):
    block = tl.program_id(0).to(tl.int64)
    index = block * BLOCK + tl.arange(0, BLOCK)
    n_elements = N.to(tl.int64) * K
    mask = index < n_elements
    rows = index // K
    cols = index % K
    nested_offset = load_nested_offset(offset_ptr, NESTED)
    w = load_weight_tile(w_ptr, rows, cols, mask, K, stride_wn, stride_wk, absmax_ptr, pairs_ptr,
                         nested_code_ptr, nested_absmax_ptr, nested_offset, block_shift,
                         nested_shift, NF4, NESTED)
    delta = tl.zeros([BLOCK], dtype=tl.float32)
    for r in range(R):  # B and A are small and stay in cache: one rank-1 update per rank
        b = tl.load(b_ptr + rows * stride_bn + r * stride_br, mask=mask, other=0.0)
        a = tl.load(a_ptr + r * stride_ar + cols * stride_ak, mask=mask, other=0.0)
        delta += b * a
    store_weight_block(w + scaling * delta, block, rows, cols, mask, n_elements, out_ptr,
                       stride_on, stride_ok, out_absmax_ptr, bounds_ptr, NF4_OUT, BLOCK)


def lora_merge(w, lora_a, lora_b, scaling, out, out_absmax=None, bounds=None, nf4=None):
    """``out`` = W + scaling B A. ``lora_a`` (r x K) and ``lora_b`` (N x r): fp32, any strides.

    ``out``: dense N x K (any strides, may be ``w``), or flat uint8 packed bytes with
    ``out_absmax`` and ``bounds`` for an NF4 result (blocksize that of ``nf4``, the decoding
    tensors of a packed ``w``; None for a dense ``w``)."""
    N, R = lora_b.shape
    K = lora_a.shape[1]
    grid, args, kwargs = merge_args(w, out, out_absmax, bounds, nf4, N, K)
    _lora_merge_kernel[grid](w, lora_a, lora_b, *args, R, scaling, lora_a.stride(0),
                             lora_a.stride(1), lora_b.stride(0), lora_b.stride(1), **kwargs)
