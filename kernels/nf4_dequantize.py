"""NF4 dequantization in one launch, nested (double-quantized) absmax decoded inside the kernel.

Layout (bitsandbytes'): element i of the flattened weight is the high nibble of byte i // 2 when i
is even, the low nibble when odd; its scale is absmax[i // blocksize]. With double quantization,
absmax is stored as uint8 codes into an 8-bit code book, one fp32 scale per ``nested_blocksize``
codes, plus one fp32 offset: absmax = nested_code[q] * nested_absmax[j // nested_blocksize] + offset.

Bit-exact with bitsandbytes because every product and sum is rounded as bitsandbytes rounds it: the
kernel is launched with fp fusion off (no FMA may merge the nested multiply and add), and bf16
outputs are rounded on the bits (see ``round_to_bf16``).
"""

import triton
import triton.language as tl

from ._common import store_rounded

BLOCK_BYTES = 1024  # packed bytes per program: 2048 outputs
NUM_WARPS = 4


@triton.jit
def load_absmax(block, mask, absmax_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr,
                nested_shift, NESTED: tl.constexpr):
    """fp32 absmax of quantization block(s) ``block``; decodes double quantization if NESTED."""
    if NESTED:
        code_index = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        nested_scale = tl.load(nested_absmax_ptr + (block >> nested_shift), mask=mask, other=0.0)
        return tl.load(nested_code_ptr + code_index) * nested_scale + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def decode_nf4(nibble, scale, code_ptr):
    """fp32 value of 4-bit codes ``nibble`` (int32) scaled by ``scale``."""
    return tl.load(code_ptr + nibble) * scale


@triton.jit
def _nf4_dequantize_kernel(packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr,
                           offset_ptr, out_ptr, n_elements, block_shift, nested_shift,
                           NESTED: tl.constexpr, BLOCK_BYTES: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    byte_index = pid * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    byte_mask = byte_index < (n_elements + 1) // 2
    byte = tl.load(packed_ptr + byte_index, mask=byte_mask, other=0).to(tl.int32)
    # Both nibbles of a byte share a quantization block: blocksizes are even.
    scale = load_absmax((byte_index * 2) >> block_shift, byte_mask, absmax_ptr, nested_code_ptr,
                        nested_absmax_ptr, offset_ptr, nested_shift, NESTED)
    high = decode_nf4(byte >> 4, scale, code_ptr)
    low = decode_nf4(byte & 0xF, scale, code_ptr)
    # Interleave in registers so the store is one contiguous run per program.
    values = tl.reshape(tl.join(high, low), [2 * BLOCK_BYTES])
    element = pid * (2 * BLOCK_BYTES) + tl.arange(0, 2 * BLOCK_BYTES)
    store_rounded(out_ptr + element, values, element < n_elements)


def nf4_dequantize(packed, absmax, code, out, blocksize, nested=None):
    """Dequantize ``packed`` (uint8, flat) into ``out`` (contiguous, fp32/fp16/bf16).

    ``code``: the 16 fp32 NF4 values. ``nested``: None, or (nested_code, nested_absmax, offset,
    nested_blocksize) when ``absmax`` holds uint8 codes.
    """
    if nested is None:
        nested_code, nested_absmax, offset, nested_blocksize = absmax, absmax, absmax, 1
    else:
        nested_code, nested_absmax, offset, nested_blocksize = nested
    n_elements = out.numel()
    grid = (triton.cdiv(triton.cdiv(n_elements, 2), BLOCK_BYTES),)
    _nf4_dequantize_kernel[grid](
        packed, absmax, code, nested_code, nested_absmax, offset, out, n_elements,
        blocksize.bit_length() - 1, nested_blocksize.bit_length() - 1,
        NESTED=nested is not None, BLOCK_BYTES=BLOCK_BYTES,
        num_warps=NUM_WARPS, enable_fp_fusion=False,
    )
    return out
