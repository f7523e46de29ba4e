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
# Rows per tile of the layout bitsandbytes repacks a weight into for its CPU kernel (its block_n).
CPU_REPACK_TILE_ROWS = 32


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


def is_repacked_for_cpu(quant_state):
    """True when bitsandbytes has repacked the weight of ``quant_state`` for its CPU kernel."""
    return bool(getattr(quant_state, "packing_format_for_cpu", False))


def read_nf4(packed, quant_state):
    """``(packed, quant_state)`` of an NF4 weight in bitsandbytes' standard layout: as given, or
    decoded from the layout bitsandbytes repacks it into for its CPU kernel.

    Every place lowrank reads a Params4bit or a QuantState goes through here. On a CPU with
    AVX512-BF16, ``Linear4bit.forward`` in eval mode without grad rewrites its weight in place
    (``bitsandbytes.functional._convert_weight_packed_for_cpu``): the nibbles are reordered into
    (N, K / 2) tiles of 32 rows, the absmax (nested ones decoded first) is rounded to bf16 and
    transposed to (K / blocksize, N), ``state2`` is dropped, ``dtype`` becomes bf16 and
    ``packing_format_for_cpu`` is set. That layout is decoded here into new tensors and a new,
    non-nested QuantState, and the module's own are left as they are, so bitsandbytes' forward
    keeps working on them. bitsandbytes' inverse (``_convert_weight_packed_for_cpu_inverse``) is
    not used: it rewrites the state it is given and requantizes the absmax, so its weight is no
    longer the one bitsandbytes computes with. Ours is: code[nibble] x the bf16 absmax, exactly.
    """
    if not is_repacked_for_cpu(quant_state):
        return packed, quant_state
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"lowrank: packed weight must be a tensor, got {type(packed).__name__}")
    if quant_state.shape is None or len(quant_state.shape) != 2:
        raise ValueError("lowrank: a weight bitsandbytes repacked for its CPU kernel must have a "
                         f"2-D quant_state shape, got {quant_state.shape}")
    N, K = quant_state.shape
    tile = CPU_REPACK_TILE_ROWS
    if N % tile or K % 2 or K % quant_state.blocksize:
        raise ValueError(f"lowrank: quant_state says bitsandbytes repacked this weight for its CPU "
                         f"kernel, but its shape {N} x {K} cannot be in that layout (out_features "
                         f"a multiple of {tile}, in_features of the blocksize "
                         f"{quant_state.blocksize})")
    tiles = packed.detach().view(torch.uint8)
    if tiles.numel() != N * K // 2:
        raise ValueError(f"lowrank: a weight bitsandbytes repacked for its CPU kernel has "
                         f"{tiles.numel()} bytes, but its shape {N} x {K} needs {N * K // 2}")
    if tuple(quant_state.absmax.shape) != (K // quant_state.blocksize, N):
        raise ValueError(f"lowrank: a repacked weight's absmax must be (in_features / blocksize, "
                         f"out_features) = ({K // quant_state.blocksize}, {N}), got "
                         f"{tuple(quant_state.absmax.shape)}")
    # Byte j of a tile row holds rows j // 2 (low nibble) and 16 + j // 2 (high nibble) of the
    # tile, at column 2 * (column pair) + j % 2.
    tiles = tiles.reshape(N // tile, K // 2, tile)
    codes = torch.cat([tiles & 0xF, tiles >> 4], dim=-1)  # (N / 32, K / 2, 32 rows x 2 columns)
    codes = codes.reshape(N // tile, K // 2, tile, 2).transpose(1, 2).reshape(-1)
    standard = (codes[0::2] << 4) | codes[1::2]  # the first element in the high nibble
    # Packed as a Params4bit packs (n, 1), in the storage dtype it had before bitsandbytes made
    # it uint8, so that what lowrank derives from it (merges) is packed like the original.
    storage = getattr(quant_state, "original_storage_type", None) or torch.uint8
    standard = standard.reshape(-1, storage.itemsize).view(storage)
    absmax = quant_state.absmax.t().reshape(-1).float()
    state = QuantState(absmax=absmax, shape=quant_state.shape, code=quant_state.code,
                       blocksize=quant_state.blocksize, quant_type=quant_state.quant_type,
                       dtype=getattr(quant_state, "original_dtype", quant_state.dtype))
    return standard, state


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
