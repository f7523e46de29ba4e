"""Helpers shared by the kernels: the target a launch is built for, exact rounding and code-book
search."""

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakTensorKeyDictionary

# Blocksizes bitsandbytes accepts for 4-bit blockwise quantization.
NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
INTERPRETER_MULTIPROCESSORS = 4  # what a launch sized by SM count sees in Triton's interpreter


@dataclass(frozen=True)
class Target:
    """What a launch is built for: a GPU architecture (``arch`` 90 for sm_90) and its SM count, or
    Triton's interpreter (``arch`` None), and whether kernels may use inline PTX (NVIDIA GPUs;
    the interpreter and AMD take the portable ``tl.load`` path instead). Launchers choose their
    configs from it, in one place per kernel, so tuning for a GPU lands there; ``bench.static``
    substitutes each GPU it builds for (``target`` is the one function it replaces)."""

    arch: int | None
    multiprocessors: int
    inline_ptx: bool = False


def target(device):
    """The ``Target`` of tensors on ``device``."""
    if device.type != "cuda":
        return Target(None, INTERPRETER_MULTIPROCESSORS)
    props = torch.cuda.get_device_properties(device)
    return Target(10 * props.major + props.minor, props.multi_processor_count,
                  inline_ptx=torch.version.hip is None)


def untuned_forward_configs(target, dtype):
    """The one config of the tiled GEMM forwards (LoRA, IA3) in Triton's interpreter (autotuning
    cannot run there; GROUP_M 2, so the tests' small shapes have several groups and a ragged last
    one) and for fp32 operands (tl.dot on the FMA units: bigger tiles spill); None for the other
    targets and dtypes, which each launcher lists for itself."""
    if target.arch is None or dtype.itemsize == 4:
        return [{"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32,
                 "GROUP_M": 2 if target.arch is None else 8, "num_warps": 4, "num_stages": 3}]
    return None


def launch(kernel, grid, configs, *args, bucket, key=("N", "K"), **kwargs):
    """``kernel[grid(config)](*args, **kwargs, **config)`` with the fastest of ``configs``.

    ``configs``: dicts of the kernel's tile constexprs plus ``num_warps`` and ``num_stages``, from
    the kernel's config function (one in Triton's interpreter, where autotuning cannot run; a short
    per-architecture list on a GPU). ``grid(config)``: the launch grid for a config. With several,
    ``triton.autotune`` times each on the first call of every value of the ``key`` arguments and
    tensor dtypes, and keeps the fastest for the process; ``bucket`` (a GEMM's M) picks a tuner
    per power-of-two bucket, so a new M retunes only when it changes bucket. The kernels write
    their outputs, never accumulate into them, so timing a config by running it is harmless."""
    if len(configs) == 1:
        return kernel[grid(configs[0])](*args, **kwargs, **configs[0])
    tuner_key = (kernel, tuple(tuple(sorted(config.items())) for config in configs),
                 triton.next_power_of_2(bucket))
    tuner = _TUNERS.get(tuner_key)
    if tuner is None:
        tuner = _TUNERS[tuner_key] = triton.autotune([triton_config(c) for c in configs],
                                                     key=list(key))(kernel)
    return tuner[grid](*args, **kwargs)


def triton_config(config):
    """A config dict as ``triton.Config``: launch options apart from constexprs."""
    options = ("num_warps", "num_stages")
    return triton.Config({k: v for k, v in config.items() if k not in options},
                         **{k: config[k] for k in options if k in config})


# Autotuners by (kernel, its configs, M's power-of-two bucket): ``launch``.
_TUNERS = {}


# Pair tables by code book (the code book stays alive, and the same, while lowrank holds it:
# FrozenWeight.code is one tensor per device), rebuilt if it is written in place.
_PAIR_TABLES = WeakTensorKeyDictionary()


def code_pairs(code):
    """The 256 x 2 fp32 pair table of a 16-entry code book: row b holds (code[b >> 4],
    code[b & 15]), the values of packed byte b, its high nibble (the even element) first. It
    starts on 256 bytes (the decode kernels' lookup puts an entry's offset in the address's
    lowest byte: kernels/lora_linear_decode.py)."""
    cached = _PAIR_TABLES.get(code)
    if cached is None or cached[0] != code._version:
        byte = torch.arange(256, device=code.device)
        spare = torch.empty(2 * 256 + 64, dtype=torch.float32, device=code.device)
        start = -spare.data_ptr() % 256 // 4
        table = spare[start:start + 2 * 256].view(256, 2)
        table.copy_(torch.stack((code[byte >> 4], code[byte & 15]), 1))
        cached = (code._version, table)
        _PAIR_TABLES[code] = cached
    return cached[1]


# Kernels run in Triton's interpreter (decided when this module is imported, as for @triton.jit).
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def round_to_bf16(x):
    """fp32 -> bf16, round to nearest even.

    The native cast rounds to nearest even on GPUs (one instruction per pair) but truncates in
    Triton's interpreter, where it is done on the bits instead, so bf16 outputs can be compared
    bit for bit with bitsandbytes and torch in both.
    """
    if INTERPRETED:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # keep NaN a NaN: the carry could make it inf
        result = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        result = x.to(tl.bfloat16, fp_downcast_rounding="rtne")
    return result


@triton.jit
def cast_rounded(value, dtype: tl.constexpr):
    """fp32 ``value`` in ``dtype``, rounded to nearest even (exact for bf16 too)."""
    if dtype == tl.bfloat16:
        return round_to_bf16(value)
    else:
        return value.to(dtype)


@triton.jit
def store_rounded(ptr, value, mask):
    """Store fp32 ``value`` into ``ptr``'s dtype, rounding to nearest even (exact for bf16 too)."""
    tl.store(ptr, cast_rounded(value, ptr.dtype.element_ty), mask=mask)


@triton.jit
def row_offsets(rows, stride):
    """``rows`` x ``stride`` in int64: where rows of a matrix start. An input's M x K or an output's
    M x N passes 2**31 at training sizes (K = 14336 at M >= 149,797; an lm_head of 128k outputs at
    M >= 16,744), and int32 would wrap there. Kernels take a tile's row bases from here (once per
    tile, not per element); offsets within a row stay int32."""
    return rows.to(tl.int64) * stride


@triton.jit
def grouped_tile(tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """(tile row, tile column) of this program in a tiles_m x tiles_n grid of output tiles launched
    as one dimension of tiles_m * tiles_n programs, in grouped order (Triton's matmul tutorial):
    GROUP_M tile rows at a time, column by column, the last group holding the rows left over.

    Why: programs launched together then read GROUP_M row blocks of the first operand and a few
    column blocks of the second, instead of one row block and every column block, so a wave of
    resident CTAs needs fewer distinct bytes and more of its reads hit L2 before they are evicted.
    The static model (bench/static/model.py) cannot show it: it reads every tensor from DRAM once
    (perfect reuse, whatever the order) and counts each program's tile loads at L2 bandwidth,
    which the order does not change."""
    program = tl.program_id(0)
    per_group = GROUP_M * tiles_n
    first_row = (program // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_row, GROUP_M)
    within = program % per_group
    return first_row + within % group_rows, within // group_rows


@triton.jit
def bucketize(x, bounds_ptr, BITS: tl.constexpr):
    """Number of ``bounds`` strictly below ``x``: ``torch.bucketize(x, bounds)`` (right=False).

    ``bounds`` are the 2**BITS - 1 sorted midpoints between neighbouring code values, so the result
    is the index of the nearest code, ties going to the lower one, as in bitsandbytes. NaN goes
    above every bound (the last index), as torch.bucketize puts it. A binary search: BITS gathers
    from a table small enough to stay in L1.
    """
    index = tl.zeros(x.shape, dtype=tl.int32)
    for level in tl.static_range(BITS):
        probe = tl.load(bounds_ptr + index + ((1 << (BITS - 1 - level)) - 1))
        index = tl.where(x <= probe, index, index + (1 << (BITS - 1 - level)))  # NaN: not <=
    return index
