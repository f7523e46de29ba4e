"""Merge an IA3 vector into its frozen weight in one pass over W: W' = W * l[:, None] (output
form, l has N elements) or W * l[None, :] (feed-forward form, K elements); unmerge divides.

The weight and result take the forms of ``lora_merge`` (dense, any strides, possibly in place; or
NF4 requantized block by block). Products and quotients are in fp32, correctly rounded (the divide
too: a GPU's default fp32 division is approximate), then rounded once to the result.
"""

import triton
import triton.language as tl

from ._weight import load_weight_tile, merge_args, store_weight_block
from .nf4_dequantize import load_nested_offset


@triton.jit
def _ia3_merge_kernel(w_ptr, l_ptr, out_ptr, out_absmax_ptr, bounds_ptr, absmax_ptr, pairs_ptr,
                      nested_code_ptr, nested_absmax_ptr, offset_ptr, stride_wn, stride_wk,
                      stride_on, stride_ok, block_shift, nested_shift, N, K, stride_ln, stride_lk,
                      UNMERGE: tl.constexpr, NF4: tl.constexpr, NESTED: tl.constexpr,
                      NF4_OUT: tl.constexpr, BLOCK: tl.constexpr):
    """l is read as an N x K view that broadcasts it: strides (1, 0) in the output form, (0, 1)
    in the feed-forward form (one compiled kernel for both)."""
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
    scale = tl.load(l_ptr + rows * stride_ln + cols * stride_lk, mask=mask, other=1.0)
    if UNMERGE:
        merged = tl.math.div_rn(w, scale)
    else:
        merged = w * scale
    store_weight_block(merged, block, rows, cols, mask, n_elements, out_ptr, stride_on, stride_ok,
                       out_absmax_ptr, bounds_ptr, NF4_OUT, BLOCK)


def ia3_merge(w, scale, shape, feedforward, unmerge, out, out_absmax=None, bounds=None, nf4=None):
    """``out`` = W (of ``shape`` N x K) scaled by (or, with ``unmerge``, divided by) ``scale``, l as
    flat fp32; the other arguments as in ``lora_merge.lora_merge``."""
    N, K = shape
    grid, args, kwargs = merge_args(w, out, out_absmax, bounds, nf4, N, K)
    stride_ln, stride_lk = (0, 1) if feedforward else (1, 0)
    _ia3_merge_kernel[grid](w, scale, *args, stride_ln, stride_lk, UNMERGE=unmerge, **kwargs)
