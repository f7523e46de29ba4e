"""lowrank.ops.lora_linear and its kernels against the fp64 reference.

Shapes are odd and not multiples of any block (M = 37 over leading dims 37 x 1, K = 97, N = 83;
blocks are 32/64). Tolerances, relative to the largest reference value, per dtype: the products
run in x's dtype with fp32 accumulation, so the error is the dtype's rounding of the operands.
"""

import functools
import math
import types

import pytest
import torch
import triton
import triton.language as tl
from helpers import (EMPTY, K, M, N, TOLERANCE, assert_op_close, assert_same_bits, check_empty,
                     check_lora_linear_against_fp64, decode_nf4, load_tiny_4bit_llama,
                     lora_linear_fp64, make_lora_case, poisoned, relative_error,
                     run_lora_linear, with_nan_after)

from lowrank import nf4, ops
from lowrank.kernels import _weight
from lowrank.kernels import lora_linear as lora_kernels
from lowrank.kernels._common import code_pairs, grouped_tile, row_offsets, target

# Rows for the grouped program order: three tile rows of BLOCK_M = 64, so in Triton's interpreter
# (GROUP_M = 2) two groups of tile rows, the last one ragged; N = 83 and K = 97 give each two
# ragged tile columns.
GROUPED_M = 150


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("kind", ["dense", "nf4-64", "nf4-nested-128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_forward_and_backward_match_fp64_reference(dtype, kind, with_bias, device):
    check_lora_linear_against_fp64(dtype, kind, 16, with_bias, device)


@pytest.mark.parametrize("transposed", [False, True], ids=["tiles", "transposed-tiles"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_ragged_last_tile_reads_no_absmax_past_the_state(dtype, transposed, device, monkeypatch):
    """K = 40 (rows start 8 elements into a 64-element block: a scale group of 8) ends inside
    the forward's last K tile; that tile's groups past K, of the last row, lie past the absmax
    array (N x K = 51.9 blocks). Memory there may hold NaN (here it does), and NaN times x's
    masked zeros poisoned the row's outputs. Transposed: the register-order forward. The dX
    tiles (``load_gemm_tile``, or ``_weight.load_packed_words`` transposed) mask the same groups,
    though there they are output columns past K, never stored, so this cannot show it; nested NF4
    reads its absmax codes through the same masks (a code past the array is a finite value)."""
    if transposed:
        transposed_tiles(monkeypatch)
    k = 40
    x, weight, state, dense, lora_a, lora_b, bias = make_lora_case(dtype, "nf4-64", 16, device,
                                                              k=k)
    state.absmax = with_nan_after(state.absmax)
    weight = with_nan_after(weight)
    grad_y = torch.randn(M, 1, N, generator=torch.Generator().manual_seed(9)).to(device, dtype)
    ours = run_lora_linear(x, weight, state, lora_a, lora_b, 1.5, bias, grad_y)
    expected = lora_linear_fp64(x, dense, lora_a, lora_b, 1.5, bias, grad_y)
    for name, got, want in zip(("y", "dx"), ours, expected):
        assert_op_close(got, want, dtype, name)


@pytest.mark.parametrize("transposed", [False, True], ids=["tiles", "transposed-tiles"])
@pytest.mark.parametrize("kind, k", [("nf4-64", 128), ("nf4-nested-128", 256)],
                         ids=["nf4", "nested"])
def test_row_aligned_tiles_read_no_absmax_past_the_state(kind, k, transposed, device,
                                                          monkeypatch):
    """K a multiple of the blocksize: the GEMMs index the absmax by row and column in int32
    (``_weight.row_aligned``), without masks; the last tile's rows past N (N = 83) would index
    past the absmax array, which holds NaN here (the nested scales too), so they read row N - 1's
    instead. Transposed: the register-order forward and the word-loading dX."""
    if transposed:
        transposed_tiles(monkeypatch)
    x, weight, state, dense, lora_a, lora_b, bias = make_lora_case(torch.float16, kind, 16,
                                                                   device, k=k)
    assert _weight.row_aligned(ops.FrozenWeight.of(weight, state).nf4, N, k)
    state.absmax = with_nan_after(state.absmax)
    if state.state2 is not None:
        state.state2.absmax = with_nan_after(state.state2.absmax)
    grad_y = torch.randn(M, 1, N, generator=torch.Generator().manual_seed(9)).to(device,
                                                                                torch.float16)
    ours = run_lora_linear(x, weight, state, lora_a, lora_b, 1.5, bias, grad_y)
    expected = lora_linear_fp64(x, dense, lora_a, lora_b, 1.5, bias, grad_y)
    for name, got, want in zip(("y", "dx"), ours, expected):
        assert_op_close(got, want, torch.float16, name)


def test_row_aligned_only_where_blocks_stay_in_rows_and_indices_fit_int32():
    """ROW_ALIGNED (the absmax index as row * (K / blocksize) + column / blocksize, int32) only
    for NF4 whose blocksize divides K, and while every row a tile reaches (up to N + 2 x 256,
    the dX's prefetch past the last row) keeps it below 2**31; else the int64 element's index."""
    blocks = types.SimpleNamespace(blocksize=64)
    assert _weight.row_aligned(blocks, 14336, 4096)
    assert not _weight.row_aligned(blocks, 14336, 4096 + 32)  # a block spans two rows
    assert not _weight.row_aligned(None, 14336, 4096)  # dense
    widest = 2**31 // (4096 // 64) - 2 * _weight.MAX_TILE_ROWS - 1  # rows up to 2**31 - 1
    assert _weight.row_aligned(blocks, widest - 1, 4096)
    assert not _weight.row_aligned(blocks, widest, 4096)


@pytest.mark.parametrize("rank", [1, 8, 64])
def test_ranks(rank, device):
    check_lora_linear_against_fp64(torch.bfloat16, "nf4-nested-128", rank, True, device)


@pytest.mark.parametrize("shape", EMPTY.values(), ids=EMPTY)
def test_empty_dimensions_give_the_reference_results_and_gradients(shape, device):
    """M, N or K = 0 is no error (N = 0 and K = 0 crashed the launchers): y is empty, or
    the bias alone when K = 0; dA, dB and dbias are zeros of their shapes where nothing flows."""
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    bias = torch.randn(n, generator=gen).to(device)
    inputs = {"lora_A": torch.randn(3, k, generator=gen).to(device),
              "lora_B": torch.randn(n, 3, generator=gen).to(device), "bias": bias}
    y = check_empty(lambda module, weight, x, lora_A, lora_B, bias: module.lora_linear(
        x, weight, lora_A, lora_B, 0.5, bias=bias), shape, inputs, device)
    if k == 0:
        assert torch.equal(y, bias.expand(m, 2, n))


@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_adapters_in_another_dtype(adapter_dtype, device):
    # x in fp32 with 16-bit adapters: products run in x's dtype, gradients come back in A/B's.
    check_lora_linear_against_fp64(torch.float32, "dense", 8, True, device, adapter_dtype=adapter_dtype)


@pytest.mark.parametrize("m, k", [(M, K), (GROUPED_M, K), (M, 128)],
                         ids=["one-group", "grouped", "even-k"])
@pytest.mark.parametrize("kind", ["dense", "nf4-nested-128"])
def test_kernels_write_every_output_element(kind, m, k, device):
    """The launchers, called with NaN-poisoned outputs, against the reference's intermediates;
    with GROUPED_M rows, over several groups of the grouped tile order; with K a multiple of
    every BLOCK_K, the forward's x loads without a mask (EVEN_K; rows past M clamped)."""
    dtype = torch.bfloat16
    x, weight, state, dense, lora_a, lora_b, bias = make_lora_case(dtype, kind, 20, device, m=m,
                                                                   k=k)
    x, a, b = x.reshape(m, k), lora_a.to(dtype), lora_b.to(dtype)
    seed = torch.zeros(1, dtype=torch.int64, device=device)
    frozen = ops.FrozenWeight.of(weight, state)  # what lowrank.ops hands the launchers
    weight, nf4_args = frozen.tensor, frozen.nf4
    s = poisoned((m, 20), dtype, device)
    lora_kernels.lora_shrink(x, a, s, seed, 0.0)
    assert_op_close(s, x.double() @ a.double().t(), dtype, "S")
    y = poisoned((m, N), dtype, device)
    lora_kernels.lora_forward(x, weight, s, b, bias, y, 1.5, nf4_args)
    expected = x.double() @ dense.double().t() + bias.double() + 1.5 * s.double() @ b.double().t()
    assert_op_close(y, expected, dtype, "Y")
    grad_y = torch.randn(m, N, generator=torch.Generator().manual_seed(4)).to(device, dtype)
    grad_s = (grad_y.double() @ b.double()).to(dtype)
    grad_x = poisoned((m, k), dtype, device)
    lora_kernels.lora_grad_input(grad_y, weight, grad_s, a, grad_x, seed, 0.0, nf4_args)
    expected = grad_y.double() @ dense.double() + grad_s.double() @ a.double()
    assert_op_close(grad_x, expected, dtype, "dX")
    grad_a = poisoned((20, k), torch.float32, device)
    lora_kernels.lora_grad_a(grad_s, x, grad_a, seed, 0.0)
    assert_op_close(grad_a.to(dtype), grad_s.double().t() @ x.double(), dtype, "dA")


@triton.jit
def _tile_order_kernel(out_ptr, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    tile_m, tile_n = grouped_tile(tiles_m, tiles_n, GROUP_M)
    tl.store(out_ptr + 2 * tl.program_id(0), tile_m)
    tl.store(out_ptr + 2 * tl.program_id(0) + 1, tile_n)


@pytest.mark.parametrize("tiles_m, tiles_n, group_m", [(7, 3, 3), (3, 5, 8), (6, 1, 2), (4, 4, 1)])
def test_grouped_tile_order_visits_every_tile_once_group_by_group(tiles_m, tiles_n, group_m,
                                                                  device):
    """Program p's tile: every tile once; groups of group_m tile rows (the last ragged) one after
    another; inside a group, column by column, each column's rows in order."""
    order = torch.full((tiles_m * tiles_n, 2), -1, dtype=torch.int32, device=device)
    _tile_order_kernel[(tiles_m * tiles_n,)](order, tiles_m, tiles_n, GROUP_M=group_m)
    order = [tuple(tile) for tile in order.tolist()]
    assert sorted(order) == [(i, j) for i in range(tiles_m) for j in range(tiles_n)]
    keys = [(row // group_m, column, row) for row, column in order]
    assert keys == sorted(keys)


# (K, blocksize, nested): packed tiles with one absmax per row and tile (K = 128, 256), or per
# group of 32 (blocksize 32 < dX's BLOCK_K) or of 2 (K = 98: rows start on any even element), and
# odd K = 97, decoded element by element (rows start mid-byte).
DECODE_LAYOUTS = [(128, 64, False), (128, 32, False), (256, 128, True), (98, 64, True),
                  (97, 64, False)]


@pytest.mark.parametrize("nibbles", [False, True], ids=["pair-table", "nibble-lookup"])
@pytest.mark.parametrize("k, blocksize, nested", DECODE_LAYOUTS,
                         ids=[f"K={k}-bs={b}{'-nested' if n else ''}" for k, b, n in DECODE_LAYOUTS])
def test_gemms_decode_nf4_bit_for_bit(k, blocksize, nested, nibbles, device, monkeypatch):
    """Forward and dX against an identity (fp32, IEEE products: 1 x w + 0 x the rest is exact) give
    W^T and W: the weight decoded inside the GEMMs, bit for bit what the format stands for, with
    either lookup of the codes (``_weight.nibble_lookup``: the pair table, or the 16 codes that
    some architectures take). On CPU this checks the portable lookups (``tl.load``, as on AMD);
    on an NVIDIA GPU the inline PTX ones (``_common.Target.inline_ptx``)."""
    assert target(torch.device(device)).inline_ptx == (torch.device(device).type == "cuda"
                                                        and torch.version.hip is None)
    monkeypatch.setattr(_weight, "nibble_lookup",
                        lambda nf4_args, _: nf4_args is not None and nibbles)
    w = torch.randn(N, k, generator=torch.Generator().manual_seed(5)) * 0.05
    packed, state = nf4.quantize(w.to(device), blocksize=blocksize, double_quant=nested)
    expected = decode_nf4(packed, state).reshape(N, k)
    frozen = ops.FrozenWeight.of(packed, state)
    flags = _weight.decoding_flags(frozen.nf4, k, 64, target(torch.device(device)))
    assert flags["NIBBLE_LOOKUP"] == nibbles  # the launchers below take this lookup
    zeros = functools.partial(torch.zeros, dtype=torch.float32, device=device)
    y = poisoned((k, N), torch.float32, device)
    lora_kernels.lora_forward(torch.eye(k, device=device), frozen.tensor, zeros(k, 1), zeros(N, 1),
                              None, y, 1.0, frozen.nf4)
    assert_same_bits(y, expected.t().contiguous())
    grad_x = poisoned((N, k), torch.float32, device)
    lora_kernels.lora_grad_input(torch.eye(N, device=device), frozen.tensor, zeros(N, 1),
                                 zeros(1, k), grad_x, zeros(1, dtype=torch.int64), 0.0, frozen.nf4)
    assert_same_bits(grad_x, expected)


def transposed_tiles(monkeypatch):
    """The forward and dX launchers' configs with TRANSPOSED_TILE (the tile computed as W x^T or
    W^T dY^T, so the decoded weight is the dot's first operand: sm_90's 256-row configs), which
    the interpreter's one config leaves off."""
    for name in ("forward_configs", "grad_input_configs"):
        configs = getattr(lora_kernels, name)
        monkeypatch.setattr(lora_kernels, name, functools.partial(
            lambda configs, *args: [{**config, "TRANSPOSED_TILE": True} for config in configs(*args)],
            configs))


@pytest.mark.parametrize("kind", ["dense", "nf4-nested-128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_transposed_tiles_match_fp64_reference(dtype, kind, device, monkeypatch):
    transposed_tiles(monkeypatch)
    check_lora_linear_against_fp64(dtype, kind, 20, True, device)


@pytest.mark.parametrize("branch", [torch.float32, torch.bfloat16], ids=str)
def test_transposed_tiles_decode_nf4_bit_for_bit(branch, device, monkeypatch):
    """As test_gemms_decode_nf4_bit_for_bit, through the transposed tiles (the identity x or dY as
    the dot's second operand, the store transposing back), with the branch's operands in fp32
    (split products) or bf16: zero adapters add exact zeros."""
    transposed_tiles(monkeypatch)
    k = 98
    w = torch.randn(N, k, generator=torch.Generator().manual_seed(5)) * 0.05
    packed, state = nf4.quantize(w.to(device), blocksize=64, double_quant=True)
    frozen = ops.FrozenWeight.of(packed, state)
    zeros = functools.partial(torch.zeros, device=device)
    y = poisoned((k, N), torch.float32, device)
    lora_kernels.lora_forward(torch.eye(k, device=device), frozen.tensor, zeros(k, 3, dtype=branch),
                              zeros(N, 3, dtype=branch), None, y, 1.0, frozen.nf4)
    expected = decode_nf4(packed, state).reshape(N, k)
    assert_same_bits(y, expected.t().contiguous())
    grad_x = poisoned((N, k), torch.float32, device)
    lora_kernels.lora_grad_input(torch.eye(N, device=device), frozen.tensor, zeros(N, 3, dtype=branch),
                                 zeros(3, k, dtype=branch), grad_x, zeros(1, dtype=torch.int64), 0.0,
                                 frozen.nf4)
    assert_same_bits(grad_x, expected)


# (K, blocksize, nested), K % 8 == 0: the transposed dX loads its packed tiles as words a step
# ahead (the kernel's PACKED_WORDS), one absmax per row and tile (K = 128), per group of 32
# (blocksize 32 < BLOCK_K), or per 8 columns (K = 200: SCALE_GROUP 8, the last tile ragged).
WORD_LAYOUTS = [(128, 64, False), (128, 32, True), (200, 64, True)]


def packed_words_weight(k, blocksize, nested, aligned, device, seed):
    """A random N x k weight's packed NF4 bytes, its state and their FrozenWeight: the packed
    bytes 4-byte aligned (read as words) or a view one byte past a 4-byte boundary (byte loads)."""
    w = torch.randn(N, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    packed, state = nf4.quantize(w.to(device), blocksize=blocksize, double_quant=nested)
    if not aligned:
        spare = torch.empty(packed.numel() + 4, dtype=packed.dtype, device=device)
        start = -spare.data_ptr() % 4 + 1  # one byte past a 4-byte boundary
        packed = spare[start:start + packed.numel()].view(packed.shape).copy_(packed)
    frozen = ops.FrozenWeight.of(packed, state)
    assert (frozen.tensor.data_ptr() % 4 == 0) == aligned
    return packed, state, frozen


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("nibbles", [False, True], ids=["pair-table", "nibble-lookup"])
@pytest.mark.parametrize("k, blocksize, nested", WORD_LAYOUTS,
                         ids=[f"K={k}-bs={b}{'-nested' if n else ''}" for k, b, n in WORD_LAYOUTS])
def test_transposed_grad_input_decodes_packed_words_bit_for_bit(k, blocksize, nested, nibbles,
                                                                aligned, device, monkeypatch):
    """dX through the transposed tiles against an identity dY gives W bit for bit where the
    packed bytes are read as 4-byte words (``_weight.load_packed_words``), with either lookup;
    packed bytes that do not start on 4 bytes (a view one byte in) take the byte loads."""
    transposed_tiles(monkeypatch)
    monkeypatch.setattr(_weight, "nibble_lookup",
                        lambda nf4_args, _: nf4_args is not None and nibbles)
    packed, state, frozen = packed_words_weight(k, blocksize, nested, aligned, device, seed=6)
    grad_x = poisoned((N, k), torch.float32, device)
    zeros = functools.partial(torch.zeros, device=device)
    lora_kernels.lora_grad_input(torch.eye(N, device=device), frozen.tensor, zeros(N, 3),
                                 zeros(3, k), grad_x, zeros(1, dtype=torch.int64), 0.0, frozen.nf4)
    assert_same_bits(grad_x, decode_nf4(packed, state).reshape(N, k))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_transposed_grad_input_from_packed_words_matches_fp64_reference(dtype, device,
                                                                        monkeypatch):
    """The transposed tiles' training step with K = 128 (dX from packed words)."""
    transposed_tiles(monkeypatch)
    check_lora_linear_against_fp64(dtype, "nf4-nested-128", 20, True, device, k=128)


# (K, nested) with N = 96, a multiple of dX's BLOCK_N (the interpreter's 32, sm_90's 64): dY loaded
# without a mask (EVEN_N); with K a multiple of BLOCK_K too (128) the transposed tile's packed
# words as well, its last step loading the last tile again instead of past W.
EVEN_N_LAYOUTS = [(128, True), (200, False)]


@pytest.mark.parametrize("transposed", [False, True], ids=["tiles", "transposed-tiles"])
@pytest.mark.parametrize("k, nested", EVEN_N_LAYOUTS,
                         ids=[f"K={k}{'-nested' if n else ''}" for k, n in EVEN_N_LAYOUTS])
def test_grad_input_with_n_a_multiple_of_block_n_decodes_nf4_bit_for_bit(k, nested, transposed,
                                                                         device, monkeypatch):
    """dX against an identity dY (N = 96: every tile's rows inside W) gives W bit for bit; the
    memory past W and its absmax holds NaN (255 bytes), which must not reach dX."""
    if transposed:
        transposed_tiles(monkeypatch)
    n = 96
    configs = lora_kernels.grad_input_configs(target(torch.device(device)), torch.float32, False)
    assert all(n % config["BLOCK_N"] == 0 for config in configs)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(7)) * 0.05
    packed, state = nf4.quantize(w.to(device), blocksize=64, double_quant=nested)
    expected = decode_nf4(packed, state).reshape(n, k)
    packed = with_nan_after(packed)
    state.absmax = with_nan_after(state.absmax)
    frozen = ops.FrozenWeight.of(packed, state)
    grad_x = poisoned((n, k), torch.float32, device)
    zeros = functools.partial(torch.zeros, device=device)
    lora_kernels.lora_grad_input(torch.eye(n, device=device), frozen.tensor, zeros(n, 3),
                                 zeros(3, k), grad_x, zeros(1, dtype=torch.int64), 0.0, frozen.nf4)
    assert_same_bits(grad_x, expected)



# (K, blocksize, nested, BLOCK_K): the forward's register-order tiles (K % 8 == 0: packed bytes
# loaded as words, ``_weight.decode_register_order``) with each absmax layout: one per row and
# tile (K = 128: blocksize 64 at BLOCK_K 32 and 64), two groups of 32 a tile (blocksize 32 at
# BLOCK_K 64), groups of 16 (K = 48) and of 8 (K = 200, its last tile ragged).
REGISTER_ORDER_LAYOUTS = [(128, 64, False, 32), (128, 64, True, 64), (128, 32, True, 64),
                          (48, 64, False, 32), (200, 64, True, 64)]


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("nibbles", [False, True], ids=["pair-table", "nibble-lookup"])
@pytest.mark.parametrize("k, blocksize, nested, block_k", REGISTER_ORDER_LAYOUTS,
                         ids=[f"K={k}-bs={b}{'-nested' if n else ''}-BLOCK_K={bk}"
                              for k, b, n, bk in REGISTER_ORDER_LAYOUTS])
def test_transposed_forward_decodes_packed_words_bit_for_bit(k, blocksize, nested, block_k,
                                                            nibbles, aligned, device,
                                                            monkeypatch):
    """The forward through the transposed tiles against an identity x gives W^T bit for bit
    where the packed bytes are read as 4-byte words and decoded in the register operand's order
    (``_weight.decode_register_order``), with either lookup; packed bytes that do not start on
    4 bytes (a view one byte in) take the byte loads."""
    configs = lora_kernels.forward_configs
    monkeypatch.setattr(lora_kernels, "forward_configs", lambda *args, **kwargs: [
        {**config, "TRANSPOSED_TILE": True, "BLOCK_K": block_k}
        for config in configs(*args, **kwargs)])
    monkeypatch.setattr(_weight, "nibble_lookup",
                        lambda nf4_args, _: nf4_args is not None and nibbles)
    packed, state, frozen = packed_words_weight(k, blocksize, nested, aligned, device, seed=7)
    y = poisoned((k, N), torch.float32, device)
    zeros = functools.partial(torch.zeros, device=device)
    lora_kernels.lora_forward(torch.eye(k, device=device), frozen.tensor, zeros(k, 3),
                              zeros(N, 3), None, y, 1.0, frozen.nf4)
    assert_same_bits(y, decode_nf4(packed, state).reshape(N, k).t().contiguous())


def test_a_misaligned_code_table_is_refused():
    """The 16-code lookup's PTX puts an entry's offset in the table address's lowest byte: a pair
    table off 256 bytes is refused by name; ``code_pairs``'s tables pass."""
    spare = torch.zeros(2 * 256 + 64)
    start = -spare.data_ptr() % 256 // 4
    _weight.check_code_table(spare[start:start + 512])
    with pytest.raises(ValueError, match="256-byte aligned"):
        _weight.check_code_table(spare[start + 2:start + 514])
    for _ in range(3):  # fresh code books, wherever the allocator puts them
        _weight.check_code_table(code_pairs(torch.randn(16)))


def test_dropout_mask_is_the_same_in_forward_and_backward(device):
    dtype, p = torch.float32, 0.3
    x, weight, state, dense, lora_a, lora_b, bias = make_lora_case(dtype, "nf4-64", 8, device)
    grad_y = torch.randn(M, 1, N, generator=torch.Generator().manual_seed(5)).to(device, dtype)
    torch.manual_seed(1234)
    mask = ops.lora_dropout_mask(ops.dropout_seed(device), (M, K), p).reshape(M, 1, K)
    torch.manual_seed(1234)  # lora_linear draws the same seed
    ours = run_lora_linear(x, weight, state, lora_a, lora_b, 2.0, bias, grad_y, dropout=p)
    expected = lora_linear_fp64(x, dense, lora_a, lora_b, 2.0, bias, grad_y, dropout=p, mask=mask)
    for name, got, want in zip(("y", "dx", "dA", "dB"), ours, expected):
        assert_op_close(got, want, dtype, name)
    # Without the same mask the results differ: the test can tell masks apart.
    other = lora_linear_fp64(x, dense, lora_a, lora_b, 2.0, bias, grad_y, dropout=p, mask=~mask)
    assert (ours[2].double() - other[2]).abs().max() > 1e-2 * other[2].abs().max()


def test_dropout_keeps_the_expected_fraction(device):
    p = 0.3
    masks = [ops.lora_dropout_mask(torch.tensor([seed], device=device), (211, 307), p)
             for seed in (1, 2)]
    n = masks[0].numel()
    for mask in masks:
        kept = mask.float().mean().item()
        assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    assert (masks[0] != masks[1]).float().mean().item() > 0.3  # seeds give independent masks


def test_gradcheck_dense_weight_and_bias_get_gradients(device):
    gen = torch.Generator().manual_seed(7)
    tensors = [torch.randn(shape, generator=gen).to(device) * 0.5
               for shape in ((3, 5), (4, 5), (2, 5), (4, 2), (4,))]
    for t in tensors:
        t.requires_grad_()

    def fn(x, w, a, b, bias):
        return ops.lora_linear(x, w, a, b, 0.7, bias=bias)

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-2, atol=2e-3, rtol=2e-3)


# dynamic=True: AOT autograd over symbolic shapes, what opcheck checked when the custom op
# carried the autograd formula (LoraLinearFunction carries it now).
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compiles_with_torch_compile_without_graph_breaks(dynamic, device):
    x, weight, state, dense, lora_a, lora_b, bias = make_lora_case(torch.float32, "nf4-nested-128", 8, device)
    lora_a.requires_grad_()

    def step(x, a):
        return ops.lora_linear(x, weight, a, lora_b, 2.0, bias=bias, quant_state=state).square().sum()

    eager = step(x, lora_a)
    (eager_grad,) = torch.autograd.grad(eager, lora_a)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    loss = compiled(x, lora_a)
    (grad,) = torch.autograd.grad(loss, lora_a)
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(grad, eager_grad)


def test_the_function_called_directly_is_lora_linear(device):
    """What another trainer calls: LoraLinearFunction.apply on a FrozenWeight, bit for bit the
    public op, gradients included (the dense weight's through its own input)."""
    x, weight, state, dense, lora_a, lora_b, bias = make_lora_case(torch.float32, "dense", 4, device)
    x = x.reshape(M, K)
    grad_y = torch.randn(M, N, generator=torch.Generator().manual_seed(2)).to(device)
    results = []
    for direct in (False, True):
        leaves = [t.detach().requires_grad_() for t in (x, weight, lora_a, lora_b, bias)]
        x_, w_, a_, b_, bias_ = leaves
        if direct:
            frozen = ops.FrozenWeight.of(w_)
            seed = torch.empty(1, dtype=torch.int64, device=device)
            y = ops.LoraLinearFunction.apply(x_, frozen, frozen.tensor, a_, b_, 1.5, bias_, 0.0,
                                             seed)
        else:
            y = ops.lora_linear(x_, w_, a_, b_, 1.5, bias=bias_)
        y.backward(grad_y)
        results.append([y.detach()] + [leaf.grad for leaf in leaves])
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_gradients_are_named_against_the_signature():
    from lowrank.ops.gradients import InputGradients

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, factor, offset):
            return x * factor + offset

    with pytest.raises(TypeError, match=r"has no inputs \['scale'\]"):
        InputGradients(Scale, "x", "scale")  # a typo is an error at import, not a shifted gradient
    gradients = InputGradients(Scale, "x", "offset")
    assert gradients.by_position(offset=1, x=0) == (0, None, 1)
    with pytest.raises(TypeError, match="'factor', which is not among"):
        gradients.by_position(factor=2)


def test_lora_ops_pass_torch_library_checks(device):
    x, weight, state, dense, lora_a, lora_b, bias = make_lora_case(torch.float32, "dense", 4, device)
    seed = torch.zeros(1, dtype=torch.int64, device=device)
    # The custom ops are launch primitives without autograd (LoraLinearFunction differentiates;
    # gradcheck and the torch.compile tests check it), so no input here requires grad.
    args = (x.reshape(M, K), *ops.FrozenWeight.of(weight).flat(), lora_a, lora_b, 2.0, bias, 0.0,
            seed)
    torch.library.opcheck(ops.lora_forward, args)


def test_accepts_a_params4bit_from_a_loaded_model(tmp_path):
    from bitsandbytes.nn import Linear4bit

    model = load_tiny_4bit_llama(tmp_path, torch.float32, dtype=torch.float32)
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, Linear4bit)
    x = torch.randn(5, 96)
    lora_a, lora_b = torch.randn(8, 96) * 0.1, torch.randn(64, 8) * 0.1
    ours = ops.lora_linear(x, layer.weight, lora_a, lora_b, 2.0)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        expected = layer(x) + 2.0 * (x @ lora_a.t()) @ lora_b.t()  # bitsandbytes + PEFT's formula
    assert_op_close(ours, expected.double(), torch.float32, "y")


def test_bad_arguments_are_named(device):
    x, weight, state, dense, lora_a, lora_b, bias = make_lora_case(torch.float32, "dense", 4, device)
    cases = [
        (dict(x=x[..., :-1]), ValueError, "x has 96 features but the weight expects 97"),
        (dict(lora_a=lora_a[:, :-1]), ValueError, r"lora_A must be \(r, 97\)"),
        (dict(lora_b=lora_b[:, :3]), ValueError, r"lora_B must be \(83, 4\)"),
        (dict(x=x.to(torch.int32), weight=weight.to(torch.int32)), TypeError, "x dtype torch.int32"),
        (dict(weight=weight.half()), TypeError, "dense weight dtype torch.float16 differs"),
        (dict(bias=bias[:-1]), ValueError, r"bias must be \(83,\)"),
        (dict(dropout=1.0), ValueError, r"dropout must be in \[0, 1\)"),
        (dict(lora_a=lora_a.to("meta")), ValueError, "must be on one device"),
    ]
    for change, error, message in cases:
        args = dict(x=x, weight=weight, lora_a=lora_a, lora_b=lora_b, bias=bias, dropout=0.0)
        args.update(change)
        with pytest.raises(error, match=message):
            ops.lora_linear(args["x"], args["weight"], args["lora_a"], args["lora_b"], 1.0,
                            bias=args["bias"], dropout=args["dropout"])


def test_non_nf4_and_mismatched_quant_states_are_refused(device):
    import bitsandbytes.functional as F

    x = torch.randn(3, K, device=device)
    lora_a, lora_b = torch.randn(4, K, device=device), torch.randn(N, 4, device=device)
    with torch.compiler.set_stance("force_eager"):
        packed, fp4_state = F.quantize_4bit(torch.randn(N, K, device=device), quant_type="fp4")
    with pytest.raises(ValueError, match="'fp4'"):
        ops.lora_linear(x, packed, lora_a, lora_b, 1.0, quant_state=fp4_state)
    packed, state = nf4.quantize(torch.randn(N, K, device=device))
    with pytest.raises(ValueError, match="x has 96 features"):
        ops.lora_linear(x[:, :-1], packed, lora_a[:, :-1], lora_b, 1.0, quant_state=state)
    packed, state = nf4.quantize(torch.randn(N, K, device=device), quant_storage=torch.bfloat16)
    with pytest.raises(ValueError, match="cannot take a gradient"):
        ops.lora_linear(x, packed.requires_grad_(), lora_a, lora_b, 1.0, quant_state=state)


def rounding_excess(actual, expected, magnitude, ulps):
    """How far ``actual`` (bf16) is from the fp64 ``expected``, as a multiple of ``ulps`` of bf16
    at each expected value plus 2^-15 of the element's ``magnitude`` (the sum of its products'
    absolute values: the split branch's error, about 2^-16, and fp32 accumulation, which
    cancellation can make large against a small result); at most 1 where the result is rounded
    ``ulps`` from near-fp32."""
    exponent = torch.floor(torch.log2(expected.abs().clamp(min=1e-30)))
    bound = ulps * torch.exp2(exponent - 7) + magnitude * 2.0**-15
    return ((actual.double() - expected).abs() / bound).max().item()


@pytest.mark.parametrize("route,m,dropout", [("fused", M, 0.0), ("fused", M, 0.3),
                                              ("cublas", M, 0.0), ("cublas-joined", M, 0.0),
                                              ("decode", 13, 0.0)])
def test_fp32_adapters_keep_the_branch_near_fp32(route, m, dropout, device, monkeypatch):
    """bf16 x with fp32 adapters (PEFT's default): the branch runs near-fp32 on every route
    (fp32 S and dS, each fp32 operand split into two bf16 parts), as PEFT's fp32 branch does.
    y and dX are bf16: rounded once (fused, decode: half an ulp from near-fp32) or twice (cuBLAS:
    x W^T rounded, then the branch added, as PEFT adds its fp32 branch to the bf16 base: one ulp);
    dA and dB are fp32, within 1e-4 of fp64. The adapters rounded to bf16 (the branch in bf16,
    as before) miss both bounds, so the test can fail. The branch is made as large as the base
    so that its rounding shows. Measured in the interpreter (whose bf16 casts truncate, so the
    split is half as accurate as on a GPU): y and dX at 0.50 to 0.98 of the bound (a result
    near a rounding tie comes close to 1; bf16 adapters: 8 to 14 times it), dA and dB 1.8e-5 to
    2.4e-5 (bf16 adapters: 3.3e-3 to 3.9e-3). cublas-joined: the cublas route's single GEMM
    [x | S] [W | sB]^T over an NF4 weight (dequantized to bf16, the dense values the reference
    takes), the split S and sB as its 3r last columns, and dX's [dY | dS] [W ; A], the split dS
    and A as its 3r last columns and rows."""
    from lowrank import routes
    from lowrank.ops import lora as lora_op

    joined = route == "cublas-joined"
    x, weight, state, dense, lora_a, lora_b, _ = make_lora_case(
        torch.bfloat16, "nf4-64" if joined else "dense", 16, device, m=m)
    if joined:
        route, dense = "cublas", nf4.dequantize(weight, state, dtype=torch.bfloat16).float()
        asked, asked_grad_input = [], []
        monkeypatch.setattr(lora_op, "joined_forward", lambda *args: asked.append(args) or True)
        monkeypatch.setattr(lora_op, "joined_grad_input",
                            lambda *args: asked_grad_input.append(args) or True)
    lora_b = lora_b * 10
    grad_y = torch.randn(m, 1, N, generator=torch.Generator().manual_seed(9)).to(device,
                                                                               torch.bfloat16)
    torch.manual_seed(7)
    mask = ops.lora_dropout_mask(ops.dropout_seed(device), (m, K), dropout).reshape(m, 1, K) \
        if dropout else None
    expected = lora_linear_fp64(x, dense, lora_a, lora_b, 3.0, None, grad_y, dropout, mask)
    magnitude = lora_linear_fp64(x.abs(), dense.abs(), lora_a.abs(), lora_b.abs(), 3.0, None,
                                 grad_y.abs(), dropout, mask)

    def run(a, b):
        torch.manual_seed(7)  # lora_linear draws the mask's seed as above
        with routes.forced(route):
            return run_lora_linear(x, weight, state, a, b, 3.0, None, grad_y, dropout)

    ulps = 1.0 if route == "cublas" else 0.5
    y, grad_x, grad_a, grad_b = run(lora_a, lora_b)
    assert rounding_excess(y, expected[0], magnitude[0], ulps) <= 1
    if route != "decode":  # the decode route is a forward: dX runs the default route
        assert rounding_excess(grad_x, expected[1], magnitude[1], ulps) <= 1
    assert_op_close(grad_a, expected[2], torch.float32, "dA", 1e-4)
    assert_op_close(grad_b, expected[3], torch.float32, "dB", 1e-4)
    rounded = run(lora_a.bfloat16(), lora_b.bfloat16())
    assert rounding_excess(rounded[0], expected[0], magnitude[0], ulps) > 1
    assert relative_error(rounded[2].double(), expected[2]) > 1e-3
    if joined:
        assert [args[3] for args in asked] == [48, 16]  # the split (3r columns), then bf16's r
        assert [args[3] for args in asked_grad_input] == [48, 16]


@triton.jit
def _row_offsets_kernel(rows_ptr, out_ptr, stride, BLOCK: tl.constexpr):
    index = tl.arange(0, BLOCK)
    tl.store(out_ptr + index, row_offsets(tl.load(rows_ptr + index), stride))


@pytest.mark.parametrize("stride,first_row", [(14336, 149_797 - 3), (128_256, 16_744 - 3)],
                         ids=["x-K=14336", "lm_head-N=128256"])
def test_row_offsets_pass_2_31_without_wrapping(stride, first_row, device):
    """The kernels' row bases (``_common.row_offsets``: x, dY, Y and dX rows, the dropout index)
    at sizes where M x K or M x N passes 2**31, without allocating them: the helper the kernels
    call, run on the row indices of such a matrix, gives the exact int64 offsets (int32 would
    wrap to negative ones)."""
    rows = torch.arange(first_row, first_row + 8, dtype=torch.int32, device=device)
    out = torch.empty(8, dtype=torch.int64, device=device)
    _row_offsets_kernel[(1,)](rows, out, stride, BLOCK=8)
    expected = [row * stride for row in range(first_row, first_row + 8)]
    assert out.tolist() == expected and max(expected) >= 2**31 > min(expected)


@triton.jit
def _dropout_keep_kernel(seed_ptr, keep_ptr, first_row, K, p, BLOCK_M: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    rows = first_row + tl.arange(0, BLOCK_M)
    keep = lora_kernels.dropout_keep(seed_ptr, rows, 0, K, p, BLOCK_K)
    tl.store(keep_ptr + tile, keep.to(tl.int8))


def test_dropout_mask_does_not_wrap_past_2_31(device):
    """The dropout mask's index (of a group of four elements) is int64: the rows 2**20 down an
    input of K = 2**14 (group 2**32 on) draw their own mask, where an int32 index would wrap to
    row 0's. The same ``dropout_keep`` the GEMM kernels call, at those rows, without an input
    that large; at row 0 it gives ``lora_dropout_mask``'s mask."""
    seed, k, p = torch.tensor([1234], device=device), 2**14, 0.5

    def keep(first_row):
        out = torch.empty(16, 64, dtype=torch.int8, device=device)
        _dropout_keep_kernel[(1,)](seed, out, first_row, k, p, BLOCK_M=16, BLOCK_K=64)
        return out.bool()

    assert torch.equal(keep(0), ops.lora_dropout_mask(seed, (16, k), p)[:, :64])
    assert (keep(2**20) != keep(0)).float().mean().item() > 0.3  # independent: about half differ


@triton.jit
def _philox_words_kernel(seed_ptr, words_ptr, GROUPS: tl.constexpr):
    r0, r1, r2, r3 = tl.randint4x(tl.load(seed_ptr), tl.arange(0, GROUPS).to(tl.int64))
    index = tl.arange(0, GROUPS)
    tl.store(words_ptr + index * 4, r0.to(tl.int64))
    tl.store(words_ptr + index * 4 + 1, r1.to(tl.int64))
    tl.store(words_ptr + index * 4 + 2, r2.to(tl.int64))
    tl.store(words_ptr + index * 4 + 3, r3.to(tl.int64))


def test_dropout_mask_is_one_philox_call_per_four_elements(device):
    """The mask, rebuilt in torch from Philox's four words per group (``tl.randint4x`` of group
    m * cdiv(K, 4) + k // 4, word k % 4, kept where >= p * 2**32), is the one the kernels draw:
    an odd K (37: the last group of a row has one element) and rows across tiles."""
    seed, m, k, p = torch.tensor([99], device=device), 21, 37, 0.3
    groups_per_row = (k + 3) // 4
    words = torch.empty(256 * 4, dtype=torch.int64, device=device)  # 256 >= 21 x 10 groups
    _philox_words_kernel[(1,)](seed, words, GROUPS=256)
    words = words[:m * groups_per_row * 4].view(m, groups_per_row * 4)[:, :k]
    expected = words >= torch.tensor(p, dtype=torch.float32).item() * 2**32  # p in fp32, as given
    assert torch.equal(ops.lora_dropout_mask(seed, (m, k), p), expected)


@pytest.mark.parametrize("dtype, branch", [(torch.float32, torch.float32),
                                           (torch.float16, torch.float16),
                                           (torch.bfloat16, torch.bfloat16),
                                           (torch.bfloat16, torch.float32)],
                         ids=["fp32", "fp16", "bf16", "bf16-fp32-branch"])
def test_output_grad_one_pass_matches_fp64(dtype, branch, device):
    """dS = s dY B and dB = s dY^T S from one pass over dY (kernels/lora_output_grad.py) into
    NaN-poisoned outputs, against fp64. Rank 20 (two rank chunks, the second ragged); in the
    interpreter's tiles 83 columns are three chunks and 37 rows two slabs (the last of 5 rows), so
    both partial sums are taken. dY strided (a column slice). The fp32 branch (fp32 S and B of a
    bf16 dY) within 1e-4 of fp64, near-fp32: bf16 S and B miss that bound, so the test can fail."""
    from lowrank.kernels import lora_output_grad as output_grad_kernels

    gen = torch.Generator().manual_seed(11)
    grad_y = torch.randn(M, N + 5, generator=gen).to(device, dtype)[:, 2:N + 2]
    s = torch.randn(M, 20, generator=gen).to(device, branch)
    b = torch.randn(N, 20, generator=gen).to(device, branch)
    target = output_grad_kernels._common.target(grad_y.device)
    chunks, slabs, rank_chunks, _ = output_grad_kernels.partition(
        M, N, 20, target, output_grad_kernels.output_grad_config(target, dtype, branch))
    if target.arch is None:
        assert (chunks, slabs, rank_chunks) == (3, 2, 2)

    def one_pass(s, b):
        grad_s = poisoned(s.shape, s.dtype, device)
        grad_b = poisoned(b.shape, torch.float32, device)
        output_grad_kernels.lora_output_grad(grad_y, s, b, 1.5, grad_s, grad_b)
        return grad_s, grad_b

    grad_s, grad_b = one_pass(s, b)
    tolerance = 1e-4 if branch != dtype else None
    assert_op_close(grad_s, 1.5 * grad_y.double() @ b.double(), branch, "dS", tolerance)
    assert_op_close(grad_b, 1.5 * grad_y.double().t() @ s.double(), torch.float32, "dB",
                    tolerance or TOLERANCE[dtype])
    if branch != dtype:
        rounded_s, rounded_b = one_pass(s.to(dtype), b.to(dtype))
        assert relative_error(rounded_s, 1.5 * grad_y.double() @ b.double()) > 1e-4
        assert relative_error(rounded_b, 1.5 * grad_y.double().t() @ s.double()) > 1e-4


def test_output_grad_one_pass_refuses_mixed_operands(device):
    from lowrank.kernels import lora_output_grad as output_grad_kernels

    grad_y, s = torch.zeros(M, N, device=device), torch.zeros(M, 4, device=device)
    with pytest.raises(ValueError, match="B S's dtype"):
        output_grad_kernels.lora_output_grad(grad_y, s, torch.zeros(N, 4, dtype=torch.float16,
                                                                   device=device),
                                             1.0, s.clone(), torch.zeros(N, 4, device=device))


def test_output_grad_op_passes_torch_library_checks(device):
    gen = torch.Generator().manual_seed(3)
    grad_y = torch.randn(M, N, generator=gen).to(device, torch.bfloat16)
    s = torch.randn(M, 4, generator=gen).to(device)  # fp32 adapters of a bf16 dY: the fp32 branch
    torch.library.opcheck(ops.lora_output_grad,
                          (grad_y, s, torch.randn(N, 4, generator=gen).to(device), 2.0))


def test_nf4_tiles_refuse_what_their_int32_offsets_cannot_reach():
    """``load_gemm_tile`` offsets a tile's elements from its first one in int32 (BLOCK_N x K):
    a wider K or a wider tile is refused before any launch, never wrapped."""
    from types import SimpleNamespace

    too_wide = SimpleNamespace(in_features=_weight.MAX_NF4_IN_FEATURES + 2)
    with pytest.raises(ValueError, match="in_features up to"):
        _weight.weight_args(torch.zeros(1, dtype=torch.uint8), too_wide)
    config = {"BLOCK_M": 64, "BLOCK_N": 2 * _weight.MAX_TILE_ROWS, "BLOCK_K": 64}
    with pytest.raises(ValueError, match="BLOCK_N <="):
        _weight.with_decoding([config], too_wide, 4096, target(torch.device("cpu")))
    # (MAX_TILE_ROWS + 1) x MAX_NF4_IN_FEATURES, the farthest offset, stays an int32.
    assert (_weight.MAX_TILE_ROWS + 1) * _weight.MAX_NF4_IN_FEATURES < 2**31
