"""The frozen weight as the GEMM kernels read it: dense (any strides) or packed NF4 decoded in
registers, plus the launcher-side arguments that describe it. Shared by every op that reads W."""

import triton
import triton.language as tl

from ._common import code_pairs, store_rounded
from .nf4_dequantize import (_SHARED_CODES_PTX, check_code_table, decode_nf4, decode_nf4_pairs,
                             decode_nf4_shared_codes, load_absmax, shared_code_lookups_ptx,
                             shared_codes)
from .nf4_quantize import quantize_and_pack


@triton.jit
def load_weight_tile(w_ptr, rows, cols, mask, K, stride_wn, stride_wk, absmax_ptr, pairs_ptr,
                     nested_code_ptr, nested_absmax_ptr, nested_offset, block_shift, nested_shift,
                     NF4: tl.constexpr, NESTED: tl.constexpr):
    """W[rows, cols] in fp32, element by element: loaded (dense, any strides) or decoded from
    packed NF4 (row-major). ``rows`` and ``cols`` may have any (broadcastable) shape: the flat
    element range of the merge kernels, or a GEMM tile whose rows do not start on a byte (odd K)."""
    if NF4:
        index = rows.to(tl.int64) * K + cols
        byte = tl.load(w_ptr + (index >> 1), mask=mask, other=0).to(tl.int32)
        nibble = (byte >> ((1 - (index & 1)) * 4).to(tl.int32)) & 0xF  # even index: high nibble
        scale = load_absmax(index >> block_shift, mask, absmax_ptr, nested_code_ptr,
                            nested_absmax_ptr, nested_offset, nested_shift, NESTED)
        return decode_nf4(nibble, scale, pairs_ptr)
    else:
        return tl.load(w_ptr + rows.to(tl.int64) * stride_wn + cols * stride_wk, mask=mask,
                       other=0.0).to(tl.float32)  # int64: N x K may pass 2**31


@triton.jit
def load_group_absmax(row_first, outs, k0, N, K, absmax_ptr, nested_code_ptr, nested_absmax_ptr,
                      nested_offset, block_shift, nested_shift, NESTED: tl.constexpr,
                      GROUPS: tl.constexpr, SCALE_GROUP: tl.constexpr, EVEN_K: tl.constexpr,
                      ROW_ALIGNED: tl.constexpr = False, ROWS_IN_BOUNDS: tl.constexpr = False,
                      PTX_CODE_LOOKUP: tl.constexpr = False):
    """The fp32 absmax of a packed tile's groups, [rows, GROUPS]: one per row (``row_first``: its
    first element, int64; ``outs``: its output index) and group of SCALE_GROUP columns from
    ``k0``, nested absmax decoded. Rows past N and, unless EVEN_K (K a multiple of the tile's
    width), groups past K (a ragged last tile) are masked: the last row's lie past the absmax
    array, where NaN times x's masked zeros would poison the sum. ROW_ALIGNED (see
    ``row_block``): no masks, rows past N and groups past K read the absmax of row N - 1 and
    column K - 1 instead (in bounds and finite; their products are x's masked zeros or outputs
    never stored), unless ROWS_IN_BOUNDS (the caller's rows are < N) and EVEN_K.
    PTX_CODE_LOOKUP: as ``load_absmax``'s."""
    group_cols = k0 + tl.arange(0, GROUPS) * SCALE_GROUP
    if ROW_ALIGNED:
        rows = outs if ROWS_IN_BOUNDS else tl.minimum(outs, N - 1)
        cols = group_cols if EVEN_K else tl.minimum(group_cols, K - 1)
        block = row_block(rows, K, block_shift)[:, None] + (cols >> block_shift)[None, :]
        return load_absmax(block, None, absmax_ptr, nested_code_ptr, nested_absmax_ptr,
                           nested_offset, nested_shift, NESTED, PTX_CODE_LOOKUP)
    block = (row_first[:, None] + group_cols[None, :]) >> block_shift
    mask = (outs < N)[:, None]
    if not EVEN_K:
        mask = mask & (group_cols < K)[None, :]
    return load_absmax(block, mask, absmax_ptr, nested_code_ptr, nested_absmax_ptr,
                       nested_offset, nested_shift, NESTED, PTX_CODE_LOOKUP)


@triton.jit
def row_block(outs, K, block_shift):
    """With ROW_ALIGNED (``row_aligned``: the blocksize divides K, the indices fit in int32), the
    absmax index of rows ``outs``' first elements, int32: a block of (row * K + col) is then
    row * (K >> block_shift) + (col >> block_shift), this row part the same at every step of a
    forward's loop, not a 64-bit shift of the int64 element per step (model, sm_90's 256-row
    nested tiles: forward 8.34 -> 8.28 instructions per element, dX 8.19 -> 8.09)."""
    return outs * (K >> block_shift)


@triton.jit
def load_gemm_tile(w_ptr, first_out, k0, N, K, stride_wn, stride_wk, absmax_ptr, codes,
                   nested_code_ptr, nested_absmax_ptr, nested_offset, block_shift, nested_shift,
                   NF4: tl.constexpr, NESTED: tl.constexpr, SCALE_GROUP: tl.constexpr,
                   INLINE_PTX: tl.constexpr, NIBBLE_LOOKUP: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, REGISTER_ORDER: tl.constexpr = False,
                   EVEN_K: tl.constexpr = False, ROW_ALIGNED: tl.constexpr = False):
    """The GEMM tile W[first_out : first_out + BLOCK_N, k0 : k0 + BLOCK_K] in fp32 (``k0`` a
    multiple of BLOCK_K), dense or decoded from packed NF4. ``codes``: where ``frozen_codes``
    (called once, before the loop) put the NF4 code book; ``nested_offset``: the value
    ``nf4_dequantize.load_nested_offset`` loaded, also before the loop.

    NF4 with SCALE_GROUP > 0 (K even, and SCALE_GROUP consecutive elements of a row, starting at a
    multiple of it, always share a quantization block: ``scale_group``): each row's packed bytes
    are loaded once as a [BLOCK_N, BLOCK_K / 2] tile (contiguous, so wide loads), each byte looked
    up in the pair table as both of its values at once (one 8-byte load, interleaved as the
    elements are) or, with NIBBLE_LOOKUP, each nibble among the 16 codes
    (``decode_nf4_shared_codes``: twice the loads, from 64 bytes of shared memory instead of a
    2 KB global table; the same values), and one absmax per row
    and group, nested absmax decoded there too, not per element. The tile's first element is an
    int64 scalar (N x K may pass 2**31); offsets inside the tile are int32 (BLOCK_N x K < 2**31),
    their row parts the same at every step of a loop, so computed once, not per row and step.
    SCALE_GROUP == 0 (dense, or odd K: rows start mid-byte): element by element,
    ``load_weight_tile``.

    REGISTER_ORDER (packed NF4 with SCALE_GROUP >= 8, ``w_ptr`` 4-byte aligned, BLOCK_K a
    multiple of 32): the packed tile loaded as words and decoded in wgmma's register operand
    layout (``decode_register_order``), not moved there through shared memory afterwards.

    EVEN_K: the launcher knows K is a multiple of BLOCK_K, so no tile reaches past K and the
    absmax of a tile's groups needs no column mask (about 0.3 instructions per element in
    sm_89's nested dX). ROW_ALIGNED: the absmax indexed in int32 by row and column
    (``row_block``)."""
    outs = first_out + tl.arange(0, BLOCK_N)
    # The nested code-book lookup in PTX for the register-order tiles (sm_90's 256-row forward:
    # 8.19 -> 8.13 instructions per element, model); in the other GEMMs the lookup left to
    # Triton's pipelining cost less (the mixed-adapter segment forward and IA3's dX took more
    # registers and model time with it).
    PTX_CODE_LOOKUP: tl.constexpr = INLINE_PTX and REGISTER_ORDER
    if NF4 and SCALE_GROUP > 0:
        GROUPS: tl.constexpr = BLOCK_K // SCALE_GROUP
        # The tile's rows as an int64 scalar (N x K may pass 2**31) plus int32 offsets, the same
        # at every step of a loop (BLOCK_N x K < 2**31). tl.cast, not .to: a loop counter (the
        # dX kernels' first_out) is a Python int in the interpreter.
        row_offsets = tl.arange(0, BLOCK_N) * K
        first_row = tl.cast(first_out, tl.int64) * K
        if REGISTER_ORDER:
            word = (k0 >> 3) + tl.arange(0, BLOCK_K // 8)
            words = tl.load(w_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + (first_row >> 3)
                            + ((row_offsets >> 3)[:, None] + word[None, :]),
                            mask=(outs < N)[:, None] & (word < (K >> 3))[None, :], other=0)
        else:
            pair = (k0 >> 1) + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(w_ptr + (first_row >> 1) + ((row_offsets >> 1)[:, None] + pair[None, :]),
                             mask=(outs < N)[:, None] & (pair < (K >> 1))[None, :], other=0)
            if NIBBLE_LOOKUP:
                values = decode_nf4_shared_codes(packed, codes, INLINE_PTX)  # [BLOCK_N, BLOCK_K / 2, 2]
            else:
                values = decode_nf4_pairs(packed, codes, INLINE_PTX)
        row_first = first_row + row_offsets  # each row's first element
        if GROUPS == 1:
            # The absmax as a vector, broadcast after the load: loaded as [BLOCK_N, 1], its
            # layout (a row per thread) became the decoded tile's, which sm_80-89 then wrote to
            # shared memory (for mma.sync) 2 bytes at a time instead of 16.
            if ROW_ALIGNED:  # rows past N read row N - 1's absmax, as load_group_absmax's
                scale = load_absmax(row_block(tl.minimum(outs, N - 1), K, block_shift)
                                    + (k0 >> block_shift), None, absmax_ptr, nested_code_ptr,
                                    nested_absmax_ptr, nested_offset, nested_shift, NESTED,
                                    PTX_CODE_LOOKUP)
            else:
                scale = load_absmax((row_first + k0) >> block_shift, outs < N, absmax_ptr,
                                    nested_code_ptr, nested_absmax_ptr, nested_offset,
                                    nested_shift, NESTED, PTX_CODE_LOOKUP)
            if REGISTER_ORDER:
                tile = decode_register_order(words, scale, codes, INLINE_PTX, NIBBLE_LOOKUP)
            else:
                tile = tl.reshape(values, [BLOCK_N, BLOCK_K]) * scale[:, None]
        else:
            scale = load_group_absmax(row_first, outs, k0, N, K, absmax_ptr, nested_code_ptr,
                                      nested_absmax_ptr, nested_offset, block_shift, nested_shift,
                                      NESTED, GROUPS, SCALE_GROUP, EVEN_K, ROW_ALIGNED,
                                      PTX_CODE_LOOKUP=PTX_CODE_LOOKUP)
            if REGISTER_ORDER:
                tile = decode_register_order(words, scale, codes, INLINE_PTX, NIBBLE_LOOKUP)
            else:
                tile = tl.reshape(tl.reshape(values, [BLOCK_N, GROUPS, SCALE_GROUP])
                                  * scale[:, :, None], [BLOCK_N, BLOCK_K])
    else:
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = (outs < N)[:, None] & (cols < K)[None, :]
        tile = load_weight_tile(w_ptr, outs[:, None], cols[None, :], mask, K, stride_wn, stride_wk,
                                absmax_ptr, codes, nested_code_ptr, nested_absmax_ptr,
                                nested_offset, block_shift, nested_shift, NF4, NESTED)
    return tile


# wgmma's register operand (sm_90's TRANSPOSED_TILE: the decoded W first) is laid out per warp
# as 16 rows (lanes: rows 0-7, a register: row 8), each lane holding 2 consecutive columns of every
# 8 (lane % 4 picks which) in registers, warps 16 rows apart. A packed byte holds 2 consecutive
# columns, so lane q of each 4 needs byte q of every 4-byte word of its rows: byte loads, or a
# lane's 8 consecutive bytes relabeled as every fourth byte (the columns permuted in pairs, and x
# read in that order 4 bytes wide: 32 copies and 32 64-bit addresses per thread a step at 256 x
# 128 x 64). Instead each lane reads whole words (the tile passes through shared memory anyway,
# Triton's cp.async pipeline: 2 LDS.128 a row where it read 1 LDS.64) and gathers byte q of 4
# words with 3 prmt before the lookup: the tile keeps W's column order, so x's copies are 16
# bytes wide.

# _SHARED_CODES_PTX on byte q of 4 words ($8-$11): $12 the prmt selector (q + 16 (q + 4): byte q
# of the first word, then of the second) gathers 2 bytes of each pair into one half of a word.
_REGISTER_ORDER_PTX = tl.constexpr(
    "{ .reg .b32 g, g2, h, l, a;\n"
    "prmt.b32 g, $8, $9, $12; prmt.b32 g2, $10, $11, $12; prmt.b32 g, g, g2, 0x5410;\n"
    + shared_code_lookups_ptx("g", "$13") + "}")


@triton.jit
def decode_register_order(words, scale, codes, INLINE_PTX: tl.constexpr,
                          NIBBLE_LOOKUP: tl.constexpr):
    """A packed tile loaded as int32 words ([BLOCK_N, BLOCK_K / 8], 4 bytes a word in memory
    order) decoded and scaled: fp32 [BLOCK_N, BLOCK_K], ``load_gemm_tile``'s values in W's
    column order, computed as [BLOCK_N, BLOCK_K / 32, 4 (i), 4 (q), 2] where element
    (n, h, i, q, b) is nibble b of byte q of word 4 h + i: each value where wgmma's register
    operand wants it, lane q (of 4) reading byte q of each word (see above). ``scale``: the
    absmax per row ([BLOCK_N]) or per row and group of columns ([BLOCK_N, groups]), applied to
    each word's values before they are joined: applied to the joined tile, the nested absmax's
    loads set its layout, and Triton moved it into the operand's through shared memory (sm_90's
    nested forward at 256 x 128 x 64: 18.5 instructions per element, not 8.3)."""
    BLOCK_N: tl.constexpr = words.shape[0]
    BLOCK_K: tl.constexpr = 8 * words.shape[1]
    HALVES: tl.constexpr = BLOCK_K // 32
    tl.static_assert(BLOCK_K % 32 == 0)
    word0, word1, word2, word3 = quarters(words, HALVES)  # word 4 h + i as [n, h], i = 0-3
    # Each word's scale as [n, h]: the tile's groups span 32 columns or more, 16 (words 0-1 and
    # 2-3 of each 4) or 8 (a word each). Broadcast, not added to zeros: an fp32 add of 0.0 is
    # not removed (it turns -0.0 into 0.0), one FADD per row and step (sm_90).
    if len(scale.shape) == 1:
        scale0 = tl.broadcast_to(scale[:, None], [BLOCK_N, HALVES])
        scale1, scale2, scale3 = scale0, scale0, scale0
    elif scale.shape[1] <= HALVES:
        GROUPS: tl.constexpr = scale.shape[1]
        scale0 = tl.reshape(tl.broadcast_to(scale[:, :, None], [BLOCK_N, GROUPS, HALVES // GROUPS]),
                            [BLOCK_N, HALVES])
        scale1, scale2, scale3 = scale0, scale0, scale0
    elif scale.shape[1] == 2 * HALVES:
        scale0, scale2 = tl.split(tl.reshape(scale, [BLOCK_N, HALVES, 2]))
        scale1, scale3 = scale0, scale2
    else:
        scale0, scale1, scale2, scale3 = quarters(scale, HALVES)
    byte = tl.arange(0, 4)[None, None, :]
    spread = tl.zeros([BLOCK_N, HALVES, 4], tl.int32)  # [n, h, q]
    word0, word1, word2, word3 = (word0[:, :, None] + spread, word1[:, :, None] + spread,
                                  word2[:, :, None] + spread, word3[:, :, None] + spread)
    if NIBBLE_LOOKUP and INLINE_PTX:
        high0, high1, high2, high3, low0, low1, low2, low3 = tl.inline_asm_elementwise(
            _REGISTER_ORDER_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r",
            [word0, word1, word2, word3, spread + (byte * 17 + 64), spread + codes],
            dtype=(tl.float32,) * 8, is_pure=True, pack=1)
    else:
        high0, low0 = tl.split(word_byte(word0, byte, codes, INLINE_PTX, NIBBLE_LOOKUP))
        high1, low1 = tl.split(word_byte(word1, byte, codes, INLINE_PTX, NIBBLE_LOOKUP))
        high2, low2 = tl.split(word_byte(word2, byte, codes, INLINE_PTX, NIBBLE_LOOKUP))
        high3, low3 = tl.split(word_byte(word3, byte, codes, INLINE_PTX, NIBBLE_LOOKUP))
    value0 = tl.join(high0, low0) * scale0[:, :, None, None]
    value1 = tl.join(high1, low1) * scale1[:, :, None, None]
    value2 = tl.join(high2, low2) * scale2[:, :, None, None]
    value3 = tl.join(high3, low3) * scale3[:, :, None, None]
    # join(join(v0, v2), join(v1, v3))[..., i1, i0] is v_(2 i1 + i0): [n, h, q, b, i1, i0].
    values = tl.join(tl.join(value0, value2), tl.join(value1, value3))
    return tl.reshape(tl.permute(values, (0, 1, 4, 5, 2, 3)), [BLOCK_N, BLOCK_K])


@triton.jit
def quarters(t, HALVES: tl.constexpr):
    """``t`` ([n, 4 h + i]) as four [n, h] tensors, i = 0, 1, 2, 3."""
    even, odd = tl.split(tl.reshape(t, [t.shape[0], HALVES, 2, 2]))
    first, third = tl.split(even)
    second, fourth = tl.split(odd)
    return first, second, third, fourth


@triton.jit
def word_byte(words, byte, codes, INLINE_PTX: tl.constexpr, NIBBLE_LOOKUP: tl.constexpr):
    """The two codes of byte ``byte`` (0-3, or a tensor of them) of each of ``words`` (shape
    S + [2], the high nibble's first), by ``load_gemm_tile``'s lookup for the flags: the
    portable twin of _REGISTER_ORDER_PTX and of ``word_codes``' (the interpreter, AMD)."""
    packed = (words >> (byte * 8)) & 0xFF
    if NIBBLE_LOOKUP:
        return decode_nf4_shared_codes(packed, codes, INLINE_PTX)
    else:
        return decode_nf4_pairs(packed, codes, INLINE_PTX)


@triton.jit
def frozen_codes(pairs_ptr, NF4: tl.constexpr, SCALE_GROUP: tl.constexpr,
                 NIBBLE_LOOKUP: tl.constexpr, INLINE_PTX: tl.constexpr):
    """``load_gemm_tile``'s ``codes``, made once per program before the loop that decodes: where
    its tiles look NF4 codes up. With NIBBLE_LOOKUP on packed tiles, the 16 codes copied into
    shared memory (``nf4_dequantize.shared_codes``; with INLINE_PTX a lookup is a prmt and an
    ld.shared, where the global table took a third instruction per code to build its 64-bit
    address); else (the interpreter, AMD: ``tl.load`` lookups) the pair table ``pairs_ptr``."""
    if NF4 and SCALE_GROUP > 0 and NIBBLE_LOOKUP and INLINE_PTX:
        # A scalar: broadcast from shared_codes' [1] tensor, the address fixed the packed tile's
        # layout to the decoded tile's (sm_90's transposed tiles: a 1-byte shared load per byte).
        return tl.max(shared_codes(pairs_ptr, INLINE_PTX), axis=0)
    else:
        return pairs_ptr


@triton.jit
def gemm_operand(tile, dtype: tl.constexpr, NF4: tl.constexpr, INLINE_PTX: tl.constexpr):
    """A weight tile from ``load_gemm_tile`` (fp32) as a tl.dot operand in ``dtype``.

    For mma.sync (sm_80 to sm_89) Triton lays both operands of a tl.dot out for the narrowest
    load found behind either of them, halved if a tl.join is on the way (its kWidth): an NF4 tile
    (bytes, and the join of each byte's two values) made it 4 for 16-bit operands instead of 2,
    so x was read from shared memory without ldmatrix and its fragments regrouped with four moves
    per mma (about a third of sm_89's instructions per decoded element). With INLINE_PTX, the
    16-bit tile goes through a move marked impure, which that search does not look behind; ptxas
    removes the move. Dense tiles and fp32 operands need none."""
    operand = tile.to(dtype)
    if NF4 and INLINE_PTX and dtype.primitive_bitwidth == 16:
        operand = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [operand],
                                            dtype=operand.dtype, is_pure=False, pack=2)
    return operand


@triton.jit
def frozen_tile_dot(x, w, acc, dtype: tl.constexpr, NF4: tl.constexpr, INLINE_PTX: tl.constexpr,
                    PRECISION: tl.constexpr, TRANSPOSED_TILE: tl.constexpr):
    """acc + x w^T for a GEMM over the frozen weight (x: BLOCK_M x BLOCK_K, w from
    ``load_gemm_tile``: BLOCK_N x BLOCK_K); with TRANSPOSED_TILE, acc (BLOCK_N x BLOCK_M) + w x^T:
    the decoded weight the dot's first operand, which wgmma (sm_90) reads from registers, so it
    is not re-read from shared memory for each 64-row slice of x. ``gemm_operand``'s move is for
    mma.sync's operand layouts, so the transposed tile skips it."""
    if TRANSPOSED_TILE:
        acc = tl.dot(w.to(dtype), tl.trans(x), acc, input_precision=PRECISION)
    else:
        acc = tl.dot(x, tl.trans(gemm_operand(w, dtype, NF4, INLINE_PTX)), acc,
                     input_precision=PRECISION)
    return acc


@triton.jit
def load_packed_words(w_ptr, first_out, k0, N, K, absmax_ptr, nested_code_ptr,
                      nested_absmax_ptr, nested_offset, block_shift, nested_shift,
                      NESTED: tl.constexpr, SCALE_GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, IN_BOUNDS: tl.constexpr = False,
                      ROW_ALIGNED: tl.constexpr = False):
    """The packed NF4 tile of ``load_gemm_tile`` (rows first_out + i, columns k0 + j), loaded
    but not decoded, for a loop to fetch a step ahead (``decode_packed_words`` decodes it): its
    bytes as int32 words, 4 a word in memory order ([BLOCK_N, BLOCK_K / 8]: K % 8 == 0, so
    SCALE_GROUP >= 8, and ``w_ptr`` 4-byte aligned), and the absmax of each row and group of
    SCALE_GROUP columns ([BLOCK_N, BLOCK_K / SCALE_GROUP], nested absmax decoded). Words, not
    bytes: Triton keeps a loaded byte tile across a loop iteration as one register per byte
    and packs them again for the lookup (about 60 instructions per step of sm_90's dX).
    IN_BOUNDS: the caller knows K is a multiple of BLOCK_K and the tile's rows are < N, so the
    words load without a mask (no predicates, no zeroed registers) and each row's start on a
    multiple of BLOCK_K / 8 words: 16-byte loads where ``w_ptr`` is 16-byte aligned, a thread's
    4 words in one row and one absmax group (sm_90's dX: 255 -> 250 instructions per step, nested
    279 -> 262; Triton then moves the decoded tile into wgmma's layout in two rounds through
    shared memory, two barriers more per step). ROW_ALIGNED: as ``load_gemm_tile``'s."""
    GROUPS: tl.constexpr = BLOCK_K // SCALE_GROUP
    outs = first_out + tl.arange(0, BLOCK_N)
    row_offsets = tl.arange(0, BLOCK_N) * K  # int32 inside the tile, as load_gemm_tile's
    first_row = tl.cast(first_out, tl.int64) * K
    word = (k0 >> 3) + tl.arange(0, BLOCK_K // 8)
    row_words = row_offsets >> 3
    first_word = first_row >> 3
    if IN_BOUNDS:
        row_words = tl.multiple_of(row_words, BLOCK_K // 8)
        first_word = tl.multiple_of(first_word, BLOCK_K // 8)
    word_ptrs = (w_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + first_word
                 + (row_words[:, None] + word[None, :]))
    if IN_BOUNDS:
        words = tl.load(word_ptrs)
    else:
        words = tl.load(word_ptrs, mask=(outs < N)[:, None] & (word < (K >> 3))[None, :], other=0)
    scale = load_group_absmax(first_row + row_offsets, outs, k0, N, K, absmax_ptr,
                              nested_code_ptr, nested_absmax_ptr, nested_offset, block_shift,
                              nested_shift, NESTED, GROUPS, SCALE_GROUP, IN_BOUNDS, ROW_ALIGNED,
                              IN_BOUNDS)
    return words, scale


@triton.jit
def decode_packed_words(words, scale, codes, INLINE_PTX: tl.constexpr,
                        NIBBLE_LOOKUP: tl.constexpr):
    """``load_packed_words``' tile decoded: fp32 [BLOCK_N, BLOCK_K], the values
    ``load_gemm_tile`` gives for it. ``codes``: ``frozen_codes``' result."""
    BLOCK_N: tl.constexpr = words.shape[0]
    BLOCK_K: tl.constexpr = 8 * words.shape[1]
    GROUPS: tl.constexpr = scale.shape[1]
    values = word_codes(words, codes, INLINE_PTX, NIBBLE_LOOKUP)
    tile = tl.reshape(values, [BLOCK_N, GROUPS, BLOCK_K // GROUPS]) * scale[:, :, None]
    return tl.reshape(tile, [BLOCK_N, BLOCK_K])


@triton.jit
def word_codes(words, codes, INLINE_PTX: tl.constexpr, NIBBLE_LOOKUP: tl.constexpr):
    """The code values of packed bytes loaded as int32 words (4 bytes, 8 elements each, in
    memory order): fp32 [BLOCK_N, 4 x words.shape[1], 2], as ``decode_nf4_shared_codes`` /
    ``decode_nf4_pairs`` give them for the same bytes. With NIBBLE_LOOKUP and INLINE_PTX a word
    is the 16-code lookup's operand as it is (4 bytes, 8 codes); else each byte is looked up
    apart (the ``tl.load`` lookups of the interpreter and AMD, or the pair table), its two codes
    then taken apart so both paths join the same eight values."""
    if NIBBLE_LOOKUP and INLINE_PTX:
        table = tl.full(words.shape, 0, tl.int32) + codes
        high0, high1, high2, high3, low0, low1, low2, low3 = tl.inline_asm_elementwise(
            _SHARED_CODES_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [words, table],
            dtype=(tl.float32,) * 8, is_pure=True, pack=1)
    else:
        high0, low0 = tl.split(word_byte(words, 0, codes, INLINE_PTX, NIBBLE_LOOKUP))
        high1, low1 = tl.split(word_byte(words, 1, codes, INLINE_PTX, NIBBLE_LOOKUP))
        high2, low2 = tl.split(word_byte(words, 2, codes, INLINE_PTX, NIBBLE_LOOKUP))
        high3, low3 = tl.split(word_byte(words, 3, codes, INLINE_PTX, NIBBLE_LOOKUP))
    # join(join(v0, v2), join(v1, v3))[..., i, j] is v_(2i + j): byte 2i + j of each word, then
    # its high nibble (the even element) and low nibble.
    values = tl.join(tl.join(tl.join(high0, high2), tl.join(high1, high3)),
                     tl.join(tl.join(low0, low2), tl.join(low1, low3)))
    return tl.reshape(values, [words.shape[0], 4 * words.shape[1], 2])


def decoding_flags(nf4, K, block_k, target):
    """``load_gemm_tile``'s constexprs: SCALE_GROUP (see ``scale_group``), INLINE_PTX and
    NIBBLE_LOOKUP (``nibble_lookup``). The decode GEMV's packed tiles take the 16-code lookup
    whatever NIBBLE_LOOKUP says (kernels/lora_linear_decode.py: ``load_decode_tile``)."""
    return {"SCALE_GROUP": scale_group(nf4, K, block_k), "INLINE_PTX": target.inline_ptx,
            "NIBBLE_LOOKUP": nibble_lookup(nf4, target)}


# Architectures whose tiled GEMMs look NF4 codes up one nibble at a time among the 16 codes
# (one 128-byte line) instead of one byte at a time in the 2 KB pair table. The pair table's
# lookups at random bytes touch ~14 lines per warp load and made the NF4 GEMMs L1-bound; the
# static model (bench.static, estimates) at 4096 x 4096 x 14336 bf16, LoRA forward: RTX 4090
# 3537 -> 2953 us (the tensor-core limit), H100 2607 -> 1045 us (now issue-bound: twice the
# loads). sm_80/86 run sm_89's tiles (mma.sync) and take it too (no device of theirs in the
# model; their builds pass the same gates); AMD and the interpreter take the ``tl.load`` twin of
# whichever lookup is chosen.
NIBBLE_LOOKUP_ARCHS = frozenset({80, 86, 89, 90})


def nibble_lookup(nf4, target):
    """Whether ``load_gemm_tile`` decodes NF4 with ``decode_nf4_shared_codes`` on ``target``."""
    return nf4 is not None and target.arch in NIBBLE_LOOKUP_ARCHS


def with_decoding(configs, nf4, K, target):
    """Each of a GEMM's ``configs`` with its ``decoding_flags`` (SCALE_GROUP depends on the
    config's BLOCK_K), so an autotuned launch gets the right ones for every config it tries."""
    if nf4 is not None and any(config["BLOCK_N"] > MAX_TILE_ROWS for config in configs):
        raise ValueError(f"NF4 GEMM configs take BLOCK_N <= {MAX_TILE_ROWS} (MAX_TILE_ROWS: "
                         f"load_gemm_tile's int32 offsets), got {configs}")
    return [{**config, **decoding_flags(nf4, K, config["BLOCK_K"], target)} for config in configs]


def scale_group(nf4, K, block_k):
    """``load_gemm_tile``'s SCALE_GROUP for a K-wide weight read in BLOCK_K-wide tiles: the most
    consecutive elements of a row (a power of two dividing BLOCK_K) that always share one absmax,
    or 0 when a row may start mid-byte (odd K) or the weight is dense."""
    if nf4 is None or K % 2:
        return 0
    return min(block_k, nf4.blocksize, K & -K)  # K & -K: the largest power of two dividing K


def precision(dtype):
    """tl.dot's input precision for operands of ``dtype``: IEEE fp32 as torch's matmul, not TF32."""
    return "ieee" if dtype.itemsize == 4 else "tf32"  # 16-bit inputs ignore it


# load_gemm_tile's offsets from a tile's first element are int32: at most MAX_TILE_ROWS (the
# widest BLOCK_N of any NF4 GEMM's configs: ``with_decoding`` checks them) x K + K elements.
MAX_TILE_ROWS = 256
MAX_NF4_IN_FEATURES = (2**31 - 1) // (MAX_TILE_ROWS + 1)


def row_aligned(nf4, N, K):
    """``load_gemm_tile``'s ROW_ALIGNED for an N x K weight: packed NF4 whose blocksize divides K
    (no quantization block spans two rows), with every absmax index a tile computes below 2**31
    as int32 (checked up to row N + 2 MAX_TILE_ROWS, past any a tile reaches: the dX prefetches
    the tile past the last row, and rows past N read row N - 1's absmax). Otherwise the index
    is the int64 element's, shifted."""
    return (nf4 is not None and K % nf4.blocksize == 0
            and (N + 2 * MAX_TILE_ROWS + 1) * (K // nf4.blocksize) < 2**31)


def weight_args(w, nf4):
    """(constexpr flags, NF4 decoding arguments, W strides) for a dense ``w`` (nf4=None, any
    strides; the unused NF4 pointers point at ``w``) or packed NF4 bytes, ``nf4`` being what decodes
    them, read by name: absmax, code, nested_code (None unless nested), nested_absmax, offset,
    blocksize, nested_blocksize and in_features (``lowrank.ops.FrozenWeight.nf4``). The kernels
    take the code book as its pair table (``code_pairs``, 256-byte aligned for the 16-code
    lookup: ``check_code_table``)."""
    if nf4 is None:
        return {"NF4": False, "NESTED": False}, (w, w, w, w, w, 0, 0), (w.stride(0), w.stride(1))
    if nf4.in_features > MAX_NF4_IN_FEATURES:
        raise ValueError(f"NF4 weights with in_features up to {MAX_NF4_IN_FEATURES} are supported, "
                         f"got {nf4.in_features}: load_gemm_tile's int32 offsets inside a tile "
                         f"of {MAX_TILE_ROWS} rows would wrap")
    nested = nf4.nested_code is not None
    absmax = nf4.absmax
    pairs = code_pairs(nf4.code)
    check_code_table(pairs)
    return ({"NF4": True, "NESTED": nested},
            (absmax, pairs, nf4.nested_code if nested else absmax,
             nf4.nested_absmax if nested else absmax, nf4.offset if nested else absmax,
             nf4.blocksize.bit_length() - 1, nf4.nested_blocksize.bit_length() - 1),
            (nf4.in_features, 1))


@triton.jit
def store_weight_block(merged, block, rows, cols, mask, n_elements, out_ptr, stride_on, stride_ok,
                       out_absmax_ptr, bounds_ptr, NF4_OUT: tl.constexpr, BLOCK: tl.constexpr):
    """Store a merge kernel's BLOCK fp32 values (flat elements ``block * BLOCK + i``): dense
    (rounded to ``out_ptr``'s dtype, any strides) or requantized to NF4, BLOCK being the blocksize."""
    if NF4_OUT:
        quantize_and_pack(tl.where(mask, merged, 0.0), block, n_elements, bounds_ptr, out_ptr,
                          out_absmax_ptr, BLOCK)
    else:
        store_rounded(out_ptr + rows * stride_on + cols * stride_ok, merged, mask)


DENSE_MERGE_BLOCK = 1024  # elements per program of a merge into a dense weight


def merge_args(w, out, out_absmax, bounds, nf4, N, K):
    """Launch arguments shared by the merge kernels, which walk the weight's N x K elements in
    row-major order, one quantization block (NF4 out) or DENSE_MERGE_BLOCK elements per program.

    ``out``: dense (N x K, any strides, may be ``w`` itself), or the flat packed bytes of an NF4
    result with ``out_absmax`` (fp32, one per block) and ``bounds`` (the 15 NF4 midpoints).
    Returns (grid, the arguments from ``out_ptr`` to ``K``, keyword arguments)."""
    flags, decoding, (stride_wn, stride_wk) = weight_args(w, nf4)
    nf4_out = out_absmax is not None
    block = nf4.blocksize if nf4_out else DENSE_MERGE_BLOCK
    strides = (0, 0) if nf4_out else (out.stride(0), out.stride(1))
    grid = (triton.cdiv(N * K, block),)
    args = (out, out_absmax if nf4_out else out, bounds if nf4_out else out, *decoding[:5],
            stride_wn, stride_wk, *strides, *decoding[5:], N, K)
    return grid, args, {**flags, "NF4_OUT": nf4_out, "BLOCK": block,
                        "num_warps": min(8, max(1, block // 256)), "enable_fp_fusion": False}
