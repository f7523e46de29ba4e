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

from . import _common
from ._common import code_pairs, store_rounded


@triton.jit
def load_nested_offset(offset_ptr, NESTED: tl.constexpr):
    """``load_absmax``'s ``nested_offset``: with NESTED the fp32 offset of double quantization,
    to load once, before a kernel's loop (a ``tl.load`` of it inside stayed there, each step one
    more pipelined copy and its shared-memory read: 5 instructions of sm_89's nested dX loop);
    else 0, unread."""
    if NESTED:
        return tl.load(offset_ptr)
    else:
        return 0.0


@triton.jit
def load_absmax(block, mask, absmax_ptr, nested_code_ptr, nested_absmax_ptr, nested_offset,
                nested_shift, NESTED: tl.constexpr, PTX_CODE_LOOKUP: tl.constexpr = False):
    """fp32 absmax of quantization block(s) ``block``; decodes double quantization if NESTED
    (``nested_offset``: ``load_nested_offset``'s). ``mask``: None where the caller keeps every
    block in bounds, so the loads need no predicate and no default. PTX_CODE_LOOKUP: the nested
    code-book lookup in PTX (``nested_code``)."""
    if NESTED:
        if mask is None:
            code_index = tl.load(absmax_ptr + block).to(tl.int32)
            nested_scale = tl.load(nested_absmax_ptr + (block >> nested_shift))
        else:
            code_index = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            nested_scale = tl.load(nested_absmax_ptr + (block >> nested_shift), mask=mask,
                                   other=0.0)
        return (nested_code(code_index, nested_code_ptr, PTX_CODE_LOOKUP) * nested_scale
                + nested_offset)
    elif mask is None:
        return tl.load(absmax_ptr + block)
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def nested_code(code_index, nested_code_ptr, INLINE_PTX: tl.constexpr):
    """Entry ``code_index`` (int32) of the 256-entry fp32 code book of double quantization.
    INLINE_PTX: one ``ld.global.nc.f32`` at ``mad.wide.u32`` of the index and the book's base.
    As ``tl.load`` inside a GEMM's loop, Triton software-pipelined the lookup: a cp.async behind
    a branch and its barrier's padding, then a shared-memory read per row (sm_90's 256-row
    forward: 8.19 -> 8.13 instructions per element with this, model). The ``tl.load`` form is
    the portable path (Triton's interpreter, AMD)."""
    if INLINE_PTX:
        return tl.inline_asm_elementwise(
            "{ .reg .b64 %entry; mad.wide.u32 %entry, $1, 4, $2; ld.global.nc.f32 $0, [%entry]; }",
            "=r,r,l", [code_index, nested_code_ptr + tl.zeros(code_index.shape, tl.int32)],
            dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.load(nested_code_ptr + code_index)


@triton.jit
def decode_nf4_pairs(packed, pairs_ptr, INLINE_PTX: tl.constexpr):
    """The code values of packed bytes ``packed`` (any shape S), fp32 of shape S + [2]: each byte's
    high nibble (its even element) then its low nibble, one 8-byte lookup in the pair table
    (``_common.code_pairs``), the order of the elements in memory.

    INLINE_PTX: the lookup as one ``ld.global.nc.v2.f32``, its address ``mad.wide.u32`` of the
    byte and the table's base (ptxas: two instructions, where the same sum as a tensor of
    pointers took four, the 64-bit add of an int32 offset widened first). The same load written
    as ``tl.load`` is software-pipelined by Triton into a cp.async plus a shared-memory read-back
    per lookup (about 1.5 more instructions per element in a GEMM's loop); the table is 2 KB and
    stays in L1. The ``tl.load`` form is the portable path (Triton's interpreter, AMD)."""
    if INLINE_PTX:
        high, low = tl.inline_asm_elementwise(
            "{ .reg .b64 %entry; mad.wide.u32 %entry, $2, 8, $3; "
            "ld.global.nc.v2.f32 {$0, $1}, [%entry]; }", "=r,=r,r,l",
            [packed.to(tl.int32), pairs_ptr + tl.zeros(packed.shape, tl.int32)],  # tensors only
            dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
        pair = tl.join(high, low)
    else:
        entry = packed.to(tl.int32) * 2
        pair = tl.load(pairs_ptr + tl.expand_dims(entry, -1) + tl.arange(0, 2))
    return pair


# The 16-entry lookup in PTX, one call per 4 packed bytes ($8) for their 8 codes: $0-$3 the high
# nibbles' (the even elements), $4-$7 the low nibbles'. Pair-table row n < 16 holds code[n] at
# byte 8n + 4 (``_common.code_pairs``), so each nibble is shifted to 8n in its own byte, and its
# entry's address is the table's with that byte as its lowest (the table is 256-byte aligned:
# ``check_code_table``): one prmt and one load per code, the high word ($13) shared by all.
_CODES_PTX = tl.constexpr(
    "{ .reg .b32 h, l, a; .reg .b64 p;\n"
    "shr.b32 h, $8, 1; and.b32 h, h, 0x78787878; shl.b32 l, $8, 3; and.b32 l, l, 0x78787878;\n"
    + "".join(f"prmt.b32 a, {nibbles}, $9, 0x765{byte}; mov.b64 p, {{a, $13}}; "
              f"ld.global.nc.f32 ${out}, [p+4];\n"
              for out, (nibbles, byte) in enumerate([("h", b) for b in range(4)]
                                                    + [("l", b) for b in range(4)]))
    + "}")


@triton.jit
def decode_nf4_codes(packed, pairs_ptr, INLINE_PTX: tl.constexpr):
    """The code values of packed bytes ``packed`` (any shape S; Triton hands the PTX 4 bytes a
    thread holds at a time), fp32 of shape S + [2], each byte's high nibble (its even element)
    first, as ``decode_nf4_pairs`` gives them, but looked up one nibble at a time in the pair
    table's first 16 rows: one 128-byte line, where the 2 KB pair table read at random bytes
    touches ~14 lines per warp load (``bench.static.sass.table_wavefronts``): L1 wavefronts
    bound the decode GEMV (kernels/lora_linear_decode.py) and, where ``_weight.nibble_lookup``
    selects it, the tiled GEMMs. Twice the lookups of the pair table, so more instructions per
    element. INLINE_PTX: ``_CODES_PTX`` (no 64-bit add per lookup; the table 256-byte aligned,
    ``check_code_table``); else ``tl.load`` (Triton's interpreter, AMD)."""
    if INLINE_PTX:
        table = pairs_ptr.to(tl.int64, bitcast=True)
        low = tl.full(packed.shape, 0, tl.int32) + (table & 0xFFFFFFFF).to(tl.int32)
        high = tl.full(packed.shape, 0, tl.int32) + (table >> 32).to(tl.int32)
        even, odd = tl.inline_asm_elementwise(
            _CODES_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r", [packed, low, high],
            dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
        return tl.join(even, odd)
    else:
        byte = packed.to(tl.int32)
        return tl.load(pairs_ptr + tl.join(byte >> 4, byte & 0xF) * 2 + 1)


def shared_code_lookups_ptx(word, table):
    """PTX: the codes of the 4 bytes in register ``word`` looked up in the shared table at
    ``table``, high nibbles into $0-$3 and low into $4-$7 (scratch registers h, l, a declared by
    the caller)."""
    return ("shr.b32 h, {0}, 2; and.b32 h, h, 0x3c3c3c3c; shl.b32 l, {0}, 2; "
            "and.b32 l, l, 0x3c3c3c3c;\n".format(word)
            + "".join(f"prmt.b32 a, {nibbles}, {table}, 0x765{byte}; ld.shared.f32 ${out}, [a];\n"
                      for out, (nibbles, byte) in enumerate([("h", b) for b in range(4)]
                                                            + [("l", b) for b in range(4)])))


# ``decode_nf4_codes`` with the 16 codes in shared memory (``shared_codes``): a nibble's entry is
# the table's address with 4 x the nibble as its lowest byte (the table is 256-byte aligned), one
# prmt and one ld.shared per code. Shared addresses are 32-bit: no 64-bit pair to build per
# lookup (the global table's high word, one move per code in ptxas' output).
_SHARED_CODES_PTX = tl.constexpr("{ .reg .b32 h, l, a;\n" + shared_code_lookups_ptx("$8", "$9") + "}")

# The 16 codes (pair-table rows 0 to 15, the code at byte 8n + 4) copied into a shared array; $0
# its 32-bit address. Every thread copies all 16 and reads only after its own copy, so what any
# thread reads is its own store or another thread's store of the same value: no barrier. The
# array is 1 KB, 1 KB-aligned, though 64 bytes are used: Triton's own shared memory (declared
# 16-byte aligned) follows it, and lays its wgmma operands out for a 1 KB-aligned start (128-byte
# swizzle), which a 64-byte array before it would break on sm_90.
_FILL_SHARED_CODES_PTX = tl.constexpr(
    "{ .shared .align 1024 .b32 codes[256]; .reg .b32 v;\n"
    + "".join(f"ld.global.nc.f32 v, [$1+{8 * n + 4}]; st.shared.f32 [codes+{4 * n}], v;\n"
              for n in range(16))
    + "mov.u32 $0, codes; }")


@triton.jit
def shared_codes(pairs_ptr, INLINE_PTX: tl.constexpr):
    """Where ``decode_nf4_codes`` finds the 16 codes: with INLINE_PTX a copy in shared memory made
    here (call it once, before the loop that decodes: its 32-bit address as a [1] tensor), else
    the pair table itself."""
    if INLINE_PTX:
        return tl.inline_asm_elementwise(_FILL_SHARED_CODES_PTX, "=r,l",
                                         [pairs_ptr + tl.zeros([1], tl.int32)], dtype=tl.int32,
                                         is_pure=False, pack=1)
    else:
        return pairs_ptr


@triton.jit
def decode_nf4_shared_codes(packed, codes, INLINE_PTX: tl.constexpr):
    """``decode_nf4_codes`` reading the codes where ``shared_codes`` put them (``codes``, its
    result): the same values, with INLINE_PTX two instructions per code instead of three."""
    if INLINE_PTX:
        table = tl.full(packed.shape, 0, tl.int32) + codes
        even, odd = tl.inline_asm_elementwise(
            _SHARED_CODES_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r", [packed, table],
            dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
        return tl.join(even, odd)
    else:
        return decode_nf4_codes(packed, codes, INLINE_PTX)


def check_code_table(pairs):
    """``_CODES_PTX`` writes entry offsets into the table address's lowest byte: an NF4 weight's
    pair table (``_common.code_pairs``, a fresh allocation) must start on 256 bytes. Checked
    where every GEMM launcher gets the table (``_weight.weight_args``)."""
    if pairs.data_ptr() % 256:
        raise ValueError(f"the NF4 pair table must be 256-byte aligned for the 16-code lookup "
                         f"(decode_nf4_codes), got address {pairs.data_ptr():#x}")


@triton.jit
def decode_nf4(nibble, scale, pairs_ptr):
    """fp32 value of 4-bit codes ``nibble`` (int32) scaled by ``scale``, one element at a time:
    pair-table row ``nibble`` (< 16, so its high nibble is 0) holds code[nibble] second."""
    return tl.load(pairs_ptr + 2 * nibble + 1) * scale


@triton.jit
def _nf4_dequantize_kernel(packed_ptr, absmax_ptr, pairs_ptr, nested_code_ptr, nested_absmax_ptr,
                           offset_ptr, out_ptr, n_elements, n_bytes, block_shift, nested_shift,
                           row_length, row_stride, NESTED: tl.constexpr, SCALE_GROUP: tl.constexpr,
                           ROW_GROUP: tl.constexpr, INLINE_PTX: tl.constexpr,
                           BLOCK_BYTES: tl.constexpr):
    """2 x BLOCK_BYTES elements per program: the bytes loaded once (``n_bytes`` is its own
    argument so the mask is known aligned when it is: wide loads), both values of each byte from
    one pair-table lookup, one absmax per SCALE_GROUP elements (a program starts on a block).

    ROW_GROUP 0: the output is contiguous. Otherwise its rows of ``row_length`` elements lie
    ``row_stride`` apart (the cublas route's [W | sB] operand), and ROW_GROUP divides both
    ``row_length`` and the program's elements: each run of ROW_GROUP elements lies in one row, so
    the row is found by one division per run, not per element. Where the program's elements
    divide the row length (real layers: the launcher keeps such configs) the grid is (rows,
    programs per row) instead: no division, and the store as wide as the contiguous one."""
    BLOCK: tl.constexpr = 2 * BLOCK_BYTES
    GROUPS: tl.constexpr = BLOCK // SCALE_GROUP
    if ROW_GROUP == BLOCK:  # a grid of (rows, programs per row): no division for the row
        pid = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)).to(tl.int64)
    else:
        pid = tl.program_id(0).to(tl.int64)
    byte_index = pid * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    byte = tl.load(packed_ptr + byte_index, mask=byte_index < n_bytes, other=0)
    values = tl.reshape(decode_nf4_pairs(byte, pairs_ptr, INLINE_PTX), [GROUPS, SCALE_GROUP])
    group = pid * BLOCK + tl.arange(0, GROUPS) * SCALE_GROUP
    scale = load_absmax(group >> block_shift, group < n_elements, absmax_ptr, nested_code_ptr,
                        nested_absmax_ptr, load_nested_offset(offset_ptr, NESTED), nested_shift,
                        NESTED)
    element = pid * BLOCK + tl.arange(0, BLOCK)
    if ROW_GROUP == 0:  # contiguous
        offset = element
    elif ROW_GROUP == BLOCK:  # rows with a stride, the program within one row: a scalar shift
        offset = element + tl.program_id(0).to(tl.int64) * (row_stride - row_length)
    else:  # rows with a stride, the program across rows: a shift per run of ROW_GROUP elements
        run = pid * BLOCK + tl.arange(0, BLOCK // ROW_GROUP) * ROW_GROUP
        start = run + (run // row_length) * (row_stride - row_length)
        offset = tl.reshape(start[:, None] + tl.arange(0, ROW_GROUP)[None, :], [BLOCK])
    store_rounded(out_ptr + offset, tl.reshape(values * scale[:, None], [BLOCK]),
                  element < n_elements)


def dequantize_configs(target, dtype):
    """Packed bytes per program and warps (``_common.Target``, the output's dtype): one config in
    Triton's interpreter, a list autotuned on GPUs (``_common.launch``), each config's
    SCALE_GROUP added by the launcher (it follows BLOCK_BYTES)."""
    if target.arch is None:
        return [{"BLOCK_BYTES": 1024, "num_warps": 4}]
    return [{"BLOCK_BYTES": 1024, "num_warps": 4}, {"BLOCK_BYTES": 4096, "num_warps": 8}]


def nf4_dequantize(packed, absmax, code, out, blocksize, nested=None):
    """Dequantize ``packed`` (uint8, flat) into ``out`` (fp32/fp16/bf16): contiguous, or an
    N x K matrix whose rows lie further apart than K (``out.stride() == (row_stride, 1)``: the
    cublas route writes W beside the adapter's columns).

    ``code``: the 16 fp32 NF4 values. ``nested``: None, or (nested_code, nested_absmax, offset,
    nested_blocksize) when ``absmax`` holds uint8 codes.
    """
    if nested is None:
        nested_code, nested_absmax, offset, nested_blocksize = absmax, absmax, absmax, 1
    else:
        nested_code, nested_absmax, offset, nested_blocksize = nested
    if out.is_contiguous():
        row_length = row_stride = 0  # unread: ROW_GROUP 0
    elif out.dim() == 2 and out.stride(1) == 1 and out.stride(0) > out.shape[1]:
        row_length, row_stride = out.shape[1], out.stride(0)
    else:
        raise ValueError(f"nf4_dequantize: out of shape {tuple(out.shape)} and strides "
                         f"{out.stride()} is neither contiguous nor rows of contiguous elements")
    target = _common.target(out.device)
    # ROW_GROUP: the largest power of two dividing the row length, within the program's elements.
    configs = [{**config, "SCALE_GROUP": min(blocksize, 2 * config["BLOCK_BYTES"]),
                "ROW_GROUP": min(row_length & -row_length, 2 * config["BLOCK_BYTES"])}
               for config in dequantize_configs(target, out.dtype)]
    # Rows with a stride: the configs whose programs lie within one row where there are any (a
    # program across rows shifts per run: more instructions per element).
    configs = [c for c in configs if c["ROW_GROUP"] == 2 * c["BLOCK_BYTES"]] or configs
    n_elements = out.numel()
    n_bytes = triton.cdiv(n_elements, 2)
    _common.launch(
        _nf4_dequantize_kernel, lambda c: (out.shape[0], row_length // (2 * c["BLOCK_BYTES"]))
        if c["ROW_GROUP"] == 2 * c["BLOCK_BYTES"] else (triton.cdiv(n_bytes, c["BLOCK_BYTES"]),),
        configs,
        packed, absmax, code_pairs(code), nested_code, nested_absmax, offset, out, n_elements,
        n_bytes, blocksize.bit_length() - 1, nested_blocksize.bit_length() - 1, row_length,
        row_stride, bucket=1,
        key=("n_elements",), NESTED=nested is not None, INLINE_PTX=target.inline_ptx,
        enable_fp_fusion=False)
    return out
