"""bitsandbytes' NF4 format: code books, building and checking its ``QuantState``.

We use bitsandbytes' own ``QuantState`` so that the state of a ``Params4bit`` from a model loaded
with ``load_in_4bit=True`` is read as it is, and ours can be handed back to bitsandbytes.
"""

import functools

import torch
from bitsandbytes.functional import QuantState, create_dynamic_map, get_4bit_type

from lowrank.kernels._common import NF4_BLOCKSIZES as BLOCKSIZES
from lowrank.kernels.nf4_quantize import NESTED_BLOCKSIZE
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
QUANT_STORAGE_DTYPES = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=None)
def code_books(device):
    """(nf4_code, nf4_bounds, nested_code, nested_bounds) as fp32 tensors on ``device``.

    The bounds are the midpoints between neighbouring code values, computed in fp32 as bitsandbytes
    computes them: the nearest code of x is the number of bounds below x.
    """
    nf4 = get_4bit_type("nf4", device="cpu").to(device)
    nested = create_dynamic_map().to(device)
    return nf4, (nf4[:-1] + nf4[1:]) / 2, nested, (nested[:-1] + nested[1:]) / 2


def build_quant_state(shape, dtype, blocksize, absmax, nested=None):
    """The ``QuantState`` bitsandbytes' ``quantize_4bit(..., quant_type="nf4")`` would return.

    ``nested``: None, or (offset, nested_absmax) when ``absmax`` holds the uint8 codes.
    """
    code = code_books(absmax.device)[0].clone()
    if nested is None:
        return QuantState(absmax=absmax, shape=shape, code=code, blocksize=blocksize,
                          quant_type="nf4", dtype=dtype)
    offset, nested_absmax = nested
    state2 = QuantState(absmax=nested_absmax, code=code_books(absmax.device)[2].clone(),
                        blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
    return QuantState(absmax=absmax, shape=shape, code=code, blocksize=blocksize,
                      quant_type="nf4", dtype=dtype, offset=offset, state2=state2)


def check_quantize_args(w, blocksize, quant_storage):
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"lowrank.nf4.quantize: expected a tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"lowrank.nf4.quantize: weight dtype {w.dtype} is not supported; "
                        "use float32, float16 or bfloat16")
    if w.numel() == 0:
        raise ValueError("lowrank.nf4.quantize: the weight is empty")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"lowrank.nf4.quantize: blocksize {blocksize} is not supported; "
                         f"use one of {BLOCKSIZES}")
    if quant_storage not in QUANT_STORAGE_DTYPES:
        raise TypeError(f"lowrank.nf4.quantize: quant_storage {quant_storage} is not supported; "
                        f"use one of {QUANT_STORAGE_DTYPES}")
    n_bytes = (w.numel() + 1) // 2
    if n_bytes % quant_storage.itemsize:
        raise ValueError(f"lowrank.nf4.quantize: {w.numel()} elements pack into {n_bytes} bytes, "
                         f"which do not fill whole {quant_storage} values")


def check_quant_state(packed, quant_state):
    """Check an NF4 ``QuantState`` and its packed weight; return the packed bytes as flat uint8."""
    if not isinstance(quant_state, QuantState):
        raise TypeError("lowrank: quant_state must be a bitsandbytes QuantState, got "
                        f"{type(quant_state).__name__}")
    if quant_state.quant_type != "nf4":
        raise ValueError(f"lowrank: quant_type {quant_state.quant_type!r} is not supported; "
                         "only 'nf4' quantized weights can be used")
    if quant_state.blocksize not in BLOCKSIZES:
        raise ValueError(f"lowrank: blocksize {quant_state.blocksize} is not supported; "
                         f"expected one of {BLOCKSIZES}")
    if quant_state.shape is None:
        raise ValueError("lowrank: quant_state has no shape")
    if quant_state.dtype not in FLOAT_DTYPES:
        raise TypeError(f"lowrank: quant_state dtype {quant_state.dtype} is not supported")
    if quant_state.nested:
        nested_blocksize = quant_state.state2.blocksize
        if nested_blocksize <= 0 or nested_blocksize & (nested_blocksize - 1):
            raise ValueError(f"lowrank: nested blocksize {nested_blocksize} is not a power of two")
        if quant_state.absmax.dtype != torch.uint8:
            raise TypeError("lowrank: a nested quant_state must hold uint8 absmax codes, got "
                            f"{quant_state.absmax.dtype}")
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"lowrank: packed weight must be a tensor, got {type(packed).__name__}")
    if not packed.is_contiguous():
        raise ValueError("lowrank: the packed weight must be contiguous")
    packed_bytes = packed.detach().view(torch.uint8).reshape(-1)
    n_elements = quant_state.shape.numel()
    if packed_bytes.numel() != (n_elements + 1) // 2:
        raise ValueError(f"lowrank: packed weight has {packed_bytes.numel()} bytes, but a weight of "
                         f"shape {tuple(quant_state.shape)} needs {(n_elements + 1) // 2}")
    n_blocks = -(-n_elements // quant_state.blocksize)
    if quant_state.absmax.numel() != n_blocks:
        raise ValueError(f"lowrank: quant_state has {quant_state.absmax.numel()} absmax values, "
                         f"expected {n_blocks} for shape {tuple(quant_state.shape)} and blocksize "
                         f"{quant_state.blocksize}")
    return packed_bytes


def absmax_fp32(quant_state):
    """Non-nested absmax as fp32 (bitsandbytes converts other dtypes the same way)."""
    return quant_state.absmax if quant_state.absmax.dtype == torch.float32 else quant_state.absmax.float()
