"""NF4 quantization: 4-bit blockwise codes + absmax, and the 8-bit double quantization of absmax.

Both follow bitsandbytes' rule exactly (its portable backend, and the nearest-code search of its
CUDA kernel): per block absmax = max |x|; full blocks are scaled by the correctly rounded reciprocal
1/absmax, the ragged last block is divided by absmax; the code is the nearest one, ties to the lower.
The ragged last block stores its absmax clamped to at least 1e-38, as the portable backend does (it
only shows when that block is all zeros; the values it decodes to are the same).
"""

import triton
import triton.language as tl

from ._common import bucketize

NESTED_BLOCKSIZE = 256  # bitsandbytes double-quantizes absmax in blocks of 256


@triton.jit
def quantize_block(x, block_ptr, is_tail, bounds_ptr, BITS: tl.constexpr):
    """Store the absmax of block ``x`` (fp32) at ``block_ptr``; return its nearest code indices.

    A NaN in the block makes its absmax NaN and all its codes the last one, as in bitsandbytes
    (torch's max propagates NaN); an inf makes absmax inf, finite values code 0.0 and the infs
    themselves (inf * 0 = NaN) the last code.
    """
    # tl.max skips NaN (maxnum): add the block's NaNs back, summed with 0.0 in their place.
    magnitude = tl.abs(x)
    absmax = tl.max(magnitude, axis=0) + tl.sum(tl.where(x == x, 0.0, magnitude), axis=0)
    # Constants typed fp32 explicitly: older Triton makes 1e-38 (a denormal) and 1.0 fp64 here.
    # An all-zero block scales to 0, not NaN; a NaN absmax stays NaN.
    safe = tl.maximum(absmax, tl.full(absmax.shape, 1e-38, tl.float32),
                      propagate_nan=tl.PropagateNan.ALL)
    tl.store(block_ptr, tl.where(is_tail, safe, absmax))
    reciprocal = tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), safe)
    scaled = tl.where(is_tail, tl.math.div_rn(x, safe), x * reciprocal)
    scaled = tl.where(absmax == 0, 0.0, scaled)  # GPUs may flush the 1e-38 denormal above to zero
    return bucketize(scaled, bounds_ptr, BITS)


@triton.jit
def quantize_and_pack(x, block, n_elements, bounds_ptr, packed_ptr, absmax_ptr,
                      BLOCKSIZE: tl.constexpr):
    """Quantize NF4 block number ``block`` (int64) of a flat weight: ``x`` holds its BLOCKSIZE fp32
    values, 0.0 past ``n_elements``; store its packed bytes and its absmax."""
    is_tail = (block + 1) * BLOCKSIZE > n_elements
    codes = tl.reshape(quantize_block(x, absmax_ptr + block, is_tail, bounds_ptr, 4),
                       [BLOCKSIZE // 2, 2])
    # Element 2i goes to the high nibble of byte i. An odd count leaves the last low nibble empty:
    # it holds the code of 0.0 (the masked load's value), as in bitsandbytes.
    high, low = tl.split(codes)
    pair = tl.arange(0, BLOCKSIZE // 2)
    even = block * BLOCKSIZE + 2 * pair
    tl.store(packed_ptr + block * (BLOCKSIZE // 2) + pair, ((high << 4) | low).to(tl.uint8),
             mask=even < n_elements)


@triton.jit
def _nf4_quantize_kernel(w_ptr, bounds_ptr, packed_ptr, absmax_ptr, n_elements,
                         BLOCKSIZE: tl.constexpr):
    block = tl.program_id(0).to(tl.int64)
    index = block * BLOCKSIZE + tl.arange(0, BLOCKSIZE)
    x = tl.load(w_ptr + index, mask=index < n_elements, other=0.0).to(tl.float32)
    quantize_and_pack(x, block, n_elements, bounds_ptr, packed_ptr, absmax_ptr, BLOCKSIZE)


@triton.jit
def _quantize_absmax_kernel(absmax_ptr, offset_ptr, bounds_ptr, codes_ptr, nested_absmax_ptr,
                            n_blocks, NESTED_BLOCKSIZE: tl.constexpr):
    block = tl.program_id(0).to(tl.int64)
    index = block * NESTED_BLOCKSIZE + tl.arange(0, NESTED_BLOCKSIZE)
    mask = index < n_blocks
    centred = tl.load(absmax_ptr + index, mask=mask, other=0.0) - tl.load(offset_ptr)
    centred = tl.where(mask, centred, 0.0)
    is_tail = (block + 1) * NESTED_BLOCKSIZE > n_blocks
    code = quantize_block(centred, nested_absmax_ptr + block, is_tail, bounds_ptr, 8)
    tl.store(codes_ptr + index, code.to(tl.uint8), mask=mask)


def _num_warps(blocksize):
    return min(8, max(1, blocksize // 256))


def nf4_quantize(w, bounds, packed, absmax, blocksize):
    """Quantize flat contiguous ``w`` into ``packed`` (uint8, ceil(n/2)) and ``absmax`` (fp32).

    ``bounds``: the 15 fp32 midpoints between neighbouring NF4 values.
    """
    grid = (triton.cdiv(w.numel(), blocksize),)
    _nf4_quantize_kernel[grid](w, bounds, packed, absmax, w.numel(), BLOCKSIZE=blocksize,
                               num_warps=_num_warps(blocksize))


def quantize_absmax(absmax, offset, bounds, codes, nested_absmax):
    """Double quantization: ``codes`` (uint8) and ``nested_absmax`` of ``absmax - offset``.

    ``offset``: 0-d fp32 tensor; ``bounds``: the 255 midpoints of the 8-bit code book.
    """
    grid = (triton.cdiv(absmax.numel(), NESTED_BLOCKSIZE),)
    _quantize_absmax_kernel[grid](absmax, offset, bounds, codes, nested_absmax, absmax.numel(),
                                  NESTED_BLOCKSIZE=NESTED_BLOCKSIZE,
                                  num_warps=_num_warps(NESTED_BLOCKSIZE))
