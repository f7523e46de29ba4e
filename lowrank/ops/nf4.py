"""NF4 quantization and dequantization as torch.library custom ops (with fake implementations, so
that torch.compile traces through them). ``lowrank.nf4`` checks the arguments, dispatches and calls
them. Kernels: ``kernels/nf4_quantize.py``, ``kernels/nf4_dequantize.py``."""

from typing import Optional

import torch

from lowrank._quant_state import NESTED_BLOCKSIZE, build_quant_state, code_books
from lowrank.frozen_weight import FrozenWeight
from lowrank.kernels import nf4_dequantize as nf4_dequantize_kernel
from lowrank.kernels import nf4_quantize as nf4_quantize_kernel


@torch.library.custom_op("lowrank::nf4_dequantize", mutates_args=("out",))
def nf4_dequantize(weight: list[Optional[torch.Tensor]], weight_sizes: list[int],
                   out: torch.Tensor) -> None:
    """Dequantize an NF4 weight, in ``FrozenWeight.flat``'s form, into contiguous ``out``."""
    w = FrozenWeight.from_flat(weight, weight_sizes)
    nested = None if w.nested_code is None else (w.nested_code, w.nested_absmax, w.offset,
                                                 w.nested_blocksize)
    nf4_dequantize_kernel.nf4_dequantize(w.tensor, w.absmax, w.code, out, w.blocksize, nested)


@nf4_dequantize.register_fake
def _(weight, weight_sizes, out):
    return None


@torch.library.custom_op("lowrank::nf4_quantize", mutates_args=())
def nf4_quantize(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat contiguous ``w`` -> (packed uint8 of ceil(n / 2) bytes, fp32 absmax per block)."""
    packed = torch.empty((w.numel() + 1) // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(-(-w.numel() // blocksize), dtype=torch.float32, device=w.device)
    nf4_quantize_kernel.nf4_quantize(w, code_books(w.device)[1], packed, absmax, blocksize)
    return packed, absmax


@nf4_quantize.register_fake
def _(w, blocksize):
    return (w.new_empty((w.numel() + 1) // 2, dtype=torch.uint8),
            w.new_empty(-(-w.numel() // blocksize), dtype=torch.float32))


@torch.library.custom_op("lowrank::nf4_quantize_absmax", mutates_args=())
def nf4_quantize_absmax(absmax: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Double quantization of fp32 ``absmax`` around 0-d ``offset`` -> (uint8 codes, nested absmax)."""
    codes = torch.empty(absmax.numel(), dtype=torch.uint8, device=absmax.device)
    nested_absmax = torch.empty(-(-absmax.numel() // NESTED_BLOCKSIZE), dtype=torch.float32,
                                device=absmax.device)
    nf4_quantize_kernel.quantize_absmax(absmax, offset, code_books(absmax.device)[3], codes,
                                        nested_absmax)
    return codes, nested_absmax


@nf4_quantize_absmax.register_fake
def _(absmax, offset):
    return (absmax.new_empty(absmax.numel(), dtype=torch.uint8),
            absmax.new_empty(-(-absmax.numel() // NESTED_BLOCKSIZE), dtype=torch.float32))


def nf4_quant_state(shape, dtype, blocksize, absmax, double_quant):
    """The QuantState of freshly quantized NF4 blocks with fp32 ``absmax``: double quantization of
    absmax around its mean, as bitsandbytes does, when ``double_quant``."""
    if not double_quant:
        return build_quant_state(shape, dtype, blocksize, absmax)
    offset = absmax.mean()
    absmax_codes, nested_absmax = nf4_quantize_absmax(absmax, offset)
    return build_quant_state(shape, dtype, blocksize, absmax_codes, nested=(offset, nested_absmax))
