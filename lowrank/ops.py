"""lowrank's kernel ops, registered with ``torch.library`` (with fake implementations) so that
``torch.compile`` traces through them. They run the Triton kernels; the public modules
(``lowrank.nf4``, ...) validate arguments and ask ``lowrank._dispatch`` whether to call them or the
reference.
"""

from typing import Optional

import torch

from lowrank._quant_state import NESTED_BLOCKSIZE, code_books
from lowrank.kernels import nf4_dequantize as nf4_dequantize_kernel
from lowrank.kernels import nf4_quantize as nf4_quantize_kernel


@torch.library.custom_op("lowrank::nf4_dequantize", mutates_args=("out",))
def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, nested_code: Optional[torch.Tensor],
                   nested_absmax: Optional[torch.Tensor], offset: Optional[torch.Tensor],
                   out: torch.Tensor, blocksize: int, nested_blocksize: int) -> None:
    """Dequantize flat uint8 ``packed`` into contiguous ``out``; nested_* are None unless nested."""
    nested = None if nested_code is None else (nested_code, nested_absmax, offset, nested_blocksize)
    code = code_books(packed.device)[0]
    nf4_dequantize_kernel.nf4_dequantize(packed, absmax, code, out, blocksize, nested)


@nf4_dequantize.register_fake
def _(packed, absmax, nested_code, nested_absmax, offset, out, blocksize, nested_blocksize):
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
