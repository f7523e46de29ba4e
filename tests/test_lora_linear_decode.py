"""The small-M (decode) forward of lowrank.ops.lora_linear: split-K kernels against the fp64 reference.

K = 320 is not a multiple of the decode BLOCK_K (NF4: 128), and on CPU it is cut into several
K-slices (the last one ragged), so the partial sums and their reduction are exercised; a multiple
of 64, it keeps the tiles real layers take, and K = 300 and 301 (runs of one absmax shorter than
32 elements, odd K) take the others. N = 83 leaves a partial N block. Shapes, tolerances and
helpers are those of test_lora_linear.py.
"""

import dataclasses

import pytest
import torch
import triton
import triton.language as tl
from helpers import (N, assert_op_close, assert_same_bits, check_lora_linear_against_fp64,
                     decode_nf4, lora_linear_fp64, make_lora_case, make_weight, poisoned,
                     run_lora_linear, with_nan_after)

from lowrank import ops
from lowrank.kernels import _common
from lowrank.kernels._weight import decoding_flags, weight_args
from lowrank.kernels.nf4_dequantize import load_nested_offset, shared_codes
from lowrank.kernels import lora_linear as lora_kernels
from lowrank.kernels import lora_linear_decode as decode_kernels

K_DECODE = 320


@pytest.mark.parametrize("m", [1, decode_kernels.DECODE_MAX_M])
@pytest.mark.parametrize("kind", ["dense", "nf4-64", "nf4-nested-128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_forward_and_backward_match_fp64_reference(dtype, kind, m, device):
    check_lora_linear_against_fp64(dtype, kind, 16, True, device, m=m, k=K_DECODE)


@pytest.mark.parametrize("rank", [1, 40])
def test_ranks_without_bias(rank, device):
    check_lora_linear_against_fp64(torch.bfloat16, "nf4-nested-128", rank, False, device, m=5, k=K_DECODE)


@pytest.mark.parametrize("kind", ["nf4-64", "nf4-nested-128"])
def test_k_a_multiple_of_the_tile_matches_fp64_reference(kind, device):
    """K = 384, three NF4 tiles of 128: the partial GEMM's x loads without a column mask
    (EVEN_K), each K-slice whole; 11 rows, so rows past M read row M - 1 again."""
    check_lora_linear_against_fp64(torch.bfloat16, kind, 16, True, device, m=11, k=384)


@pytest.mark.parametrize("k", [300, 301])
def test_short_absmax_runs_and_odd_k_match_fp64_reference(k, device):
    """The NF4 tile of K not a multiple of 32 (``decode_tile``): runs of 4 elements, odd K."""
    check_lora_linear_against_fp64(torch.float16, "nf4-64", 16, True, device,
                                   m=decode_kernels.DECODE_MAX_M, k=k)


def test_the_split_covers_k_with_no_empty_slice():
    sms = _common.target(torch.device("cpu")).multiprocessors
    for n_tiles in (1, 2, 3, 7, 16, 40):
        for k_steps in (1, 2, 3, 5, 64, 115):
            for costs in (None, (9216, 512), (9216, 8192)):
                splits, steps = decode_kernels.split_k(n_tiles, k_steps, sms, costs)
                assert (splits - 1) * steps < k_steps <= splits * steps
    # What the other tests here rely on: their K is cut into several slices, the last one ragged.
    block_k = decode_kernels.decode_tile(_common.target(torch.device("cpu")), None,
                                          torch.bfloat16, K_DECODE)["BLOCK_K"]
    splits, steps = decode_kernels.split_k(2, -(-K_DECODE // block_k), sms)
    assert splits > 1 and K_DECODE % (steps * block_k) != 0


def test_the_split_evens_out_the_sms_where_the_partials_are_cheap():
    """H100 (132 SMs), 4096 x 14336 in NF4 tiles of 128 x 128 (112 tiles, 32 steps): 4 slices
    put 4 programs of 8 steps on some SMs (32 steps), 8 slices 7 of 4 (28); at 1 row the
    partial sums are small and 8 it is, at 16 rows they cost more than they even out; the plain
    rule (no costs) keeps the fewest."""
    nf4 = type("NF4", (), {"blocksize": 64, "absmax": torch.zeros(1)})()
    h100, rtx4090 = _common.Target(90, 132, inline_ptx=True), _common.Target(89, 128)
    tile = decode_kernels.decode_tile(h100, nf4, torch.bfloat16, 4096)
    assert (tile["BLOCK_N"], tile["BLOCK_K"]) == (128, 128)
    assert decode_kernels.split_k(112, 32, 132) == (2, 16)  # DRAM-bound: 2 programs an SM
    one_row = decode_kernels.split_costs(h100, nf4, tile, 1)
    assert one_row == (128 * 64 + 128 * 2 * 4, 512)
    assert decode_kernels.split_k(112, 32, 132, one_row) == (8, 4)
    assert decode_kernels.split_k(112, 32, 132, decode_kernels.split_costs(h100, nf4, tile, 16)) \
        == (4, 8)
    # DRAM bounds the GEMV on sm_89 and with a dense weight: the plain rule.
    assert decode_kernels.split_costs(rtx4090, nf4, tile, 1) is None
    assert decode_kernels.split_costs(h100, None, tile, 1) is None


def test_short_absmax_runs_are_not_pipelined():
    """A K not a multiple of 32 (short runs of one absmax, or odd) decodes unpipelined: its
    staged absmax gathers took the kernel over 48 KB of shared memory (partial_stages)."""
    nf4, sm90 = object(), _common.Target(90, 132, inline_ptx=True)
    assert [decode_kernels.partial_stages(sm90, nf4, {"SCALE_GROUP": group})
            for group in (0, 2, 16, 32, 64, 128)] == [1, 1, 1, 2, 2, 2]
    assert decode_kernels.partial_stages(sm90, None, {"SCALE_GROUP": 0}) == 2  # dense
    # AMD: one stage (LDS), the dense weight two.
    mi300x = _common.Target(94, 304)
    assert decode_kernels.partial_stages(mi300x, nf4, {"SCALE_GROUP": 64}) == 1
    assert decode_kernels.partial_stages(mi300x, None, {"SCALE_GROUP": 0}) == 2


def test_short_absmax_runs_and_amd_take_smaller_tiles():
    """128 x 128 NF4 tiles of K not a multiple of 32 spilled registers, and on AMD took 132 KB of
    LDS (``decode_tile``)."""
    sm90, mi300x = _common.Target(90, 132, inline_ptx=True), _common.Target(94, 304)
    nf4 = object()
    tiles = [decode_kernels.decode_tile(sm90, nf4, torch.bfloat16, k)
             for k in (4096, 4160, 4112, 4097)]
    assert [(tile["BLOCK_N"], tile["BLOCK_K"]) for tile in tiles] \
        == [(128, 128)] * 2 + [(64, 32)] * 2
    tiles = [decode_kernels.decode_tile(mi300x, nf4, torch.bfloat16, k) for k in (4096, 4097)]
    assert [(tile["BLOCK_N"], tile["BLOCK_K"]) for tile in tiles] == [(128, 64), (64, 32)]
    assert decode_kernels.decode_tile(sm90, None, torch.bfloat16, 4097)["BLOCK_N"] == 64  # dense


def test_packed_words_are_loaded_ahead_where_aligned_and_nested_on_sm90_only():
    """``prefetch_words``: a W 4-byte aligned; nested only where NESTED_MAX_REGISTERS holds it to
    4 CTAs per SM (sm_90) and in the interpreter (which runs the path the tests check)."""
    plain = type("NF4", (), {"nested_code": None})()
    nested = type("NF4", (), {"nested_code": torch.zeros(1)})()
    packed = torch.zeros(64, dtype=torch.uint8)
    sm90, sm89 = _common.Target(90, 132, inline_ptx=True), _common.Target(89, 128)
    cpu = _common.target(torch.device("cpu"))
    assert [decode_kernels.prefetch_words(t, nf4, packed) for t, nf4 in
            ((sm90, plain), (sm89, plain), (sm90, nested), (sm89, nested), (cpu, nested))] \
        == [True, True, True, False, True]
    assert not decode_kernels.prefetch_words(sm90, plain, packed[1:])  # not 4-byte aligned
    assert not decode_kernels.prefetch_words(sm90, None, packed)  # dense
    assert decode_kernels.decode_configs(sm90, torch.bfloat16, nested, 4096)[0]["maxnreg"] \
        == decode_kernels.NESTED_MAX_REGISTERS


@triton.jit
def _decode_tile_kernel(w_ptr, out_ptr, absmax_ptr, pairs_ptr, nested_code_ptr, nested_absmax_ptr,
                        offset_ptr, N, K, block_shift, nested_shift, NESTED: tl.constexpr,
                        SCALE_GROUP: tl.constexpr, INLINE_PTX: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    outs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    codes = shared_codes(pairs_ptr, INLINE_PTX)
    tile = decode_kernels.load_decode_tile(
        w_ptr, outs, tl.program_id(1) * BLOCK_K, N, K, absmax_ptr, codes, nested_code_ptr,
        nested_absmax_ptr, load_nested_offset(offset_ptr, NESTED), block_shift, nested_shift,
        NESTED, SCALE_GROUP, INLINE_PTX, BLOCK_K)
    tl.store(out_ptr + outs[:, None] * K + cols[None, :], tile,
             mask=(outs[:, None] < N) & (cols[None, :] < K))


@pytest.mark.parametrize("k", [K_DECODE, 300])
@pytest.mark.parametrize("kind", ["nf4-64", "nf4-nested-128"])
def test_decode_tile_is_bit_exact(kind, k, device):
    """The GEMV's lookup (the 16 codes) gives the fp32 weight the format stands for, bit for bit
    (so its bf16 rounding is bitsandbytes'): 83 rows (a partial N tile), K = 320 and 300 (a
    partial K tile; runs of 4 elements), every tile of the launch config's size."""
    gen = torch.Generator().manual_seed(7)
    weight, state, _ = make_weight(kind, torch.bfloat16, device, gen, k=k)
    frozen = ops.FrozenWeight.of(weight, state)
    flags, decoding, _ = weight_args(frozen.tensor, frozen.nf4)
    target = _common.target(torch.device(device))
    tile = decode_kernels.decode_tile(target, frozen.nf4, torch.bfloat16, k)
    out = poisoned((N, k), torch.float32, device)
    grid = (-(-N // tile["BLOCK_N"]), -(-k // tile["BLOCK_K"]))
    decoding_constexprs = decoding_flags(frozen.nf4, k, tile["BLOCK_K"], target)
    _decode_tile_kernel[grid](frozen.tensor, out, *decoding[:5], N, k, *decoding[5:],
                              NESTED=flags["NESTED"], SCALE_GROUP=decoding_constexprs["SCALE_GROUP"],
                              INLINE_PTX=decoding_constexprs["INLINE_PTX"],
                              BLOCK_N=tile["BLOCK_N"], BLOCK_K=tile["BLOCK_K"])
    assert_same_bits(out.cpu(), decode_nf4(frozen.tensor.cpu(), state).float())


@pytest.mark.parametrize("kind", ["dense", "nf4-nested-128"])
def test_kernels_write_every_output_element(kind, device):
    dtype, rank, m = torch.bfloat16, 20, 7
    x, weight, state, dense, lora_a, lora_b, bias = make_lora_case(dtype, kind, rank, device, m=m,
                                                              k=K_DECODE)
    x, a, b = x.reshape(m, K_DECODE), lora_a.to(dtype), lora_b.to(dtype)
    frozen = ops.FrozenWeight.of(weight, state)
    weight, nf4_args = frozen.tensor, frozen.nf4
    y, s = poisoned((m, N), dtype, device), poisoned((m, rank), dtype, device)
    seed = torch.zeros(1, dtype=torch.int64, device=device)
    decode_kernels.lora_decode_forward(x, weight, a, b, bias, y, s, seed, 0.0, 1.5, nf4_args)
    assert_op_close(s, x.double() @ a.double().t(), dtype, "S")
    expected = x.double() @ dense.double().t() + bias.double() + 1.5 * s.double() @ b.double().t()
    assert_op_close(y, expected, dtype, "Y")


def test_reads_nothing_past_the_quantization_state(device):
    """K = 320 ends mid-tile (BLOCK_K 128): the last tile's absmax groups past K, of the last row,
    would lie past the absmax array, where memory may hold NaN (here it does; in a long test
    session, another test's NaN-poisoned buffer did), and NaN x 0 poisoned its outputs. Nested
    NF4 reads its absmax through the same mask."""
    dtype, rank, m = torch.float16, 16, decode_kernels.DECODE_MAX_M
    x, weight, state, dense, lora_a, lora_b, bias = make_lora_case(dtype, "nf4-64", rank, device,
                                                              m=m, k=K_DECODE)
    x, a, b = x.reshape(m, K_DECODE), lora_a.to(dtype), lora_b.to(dtype)
    frozen = ops.FrozenWeight.of(weight, state)
    frozen = dataclasses.replace(frozen, tensor=with_nan_after(frozen.tensor),
                                 absmax=with_nan_after(frozen.absmax))
    y, s = poisoned((m, N), dtype, device), poisoned((m, rank), dtype, device)
    seed = torch.zeros(1, dtype=torch.int64, device=device)
    decode_kernels.lora_decode_forward(x, frozen.tensor, a, b, bias, y, s, seed, 0.0, 1.5,
                                       frozen.nf4)
    expected = x.double() @ dense.double().t() + bias.double() + 1.5 * s.double() @ b.double().t()
    assert_op_close(y, expected, dtype, "Y")


def test_dropout_mask_is_the_same_as_in_backward(device):
    dtype, p, m = torch.float32, 0.3, 6
    x, weight, state, dense, lora_a, lora_b, bias = make_lora_case(dtype, "nf4-64", 8, device, m=m,
                                                              k=K_DECODE)
    grad_y = torch.randn(m, 1, N, generator=torch.Generator().manual_seed(5)).to(device, dtype)
    torch.manual_seed(1234)
    mask = ops.lora_dropout_mask(ops.dropout_seed(device), (m, K_DECODE), p).reshape(m, 1, K_DECODE)
    torch.manual_seed(1234)
    ours = run_lora_linear(x, weight, state, lora_a, lora_b, 2.0, bias, grad_y, dropout=p)
    expected = lora_linear_fp64(x, dense, lora_a, lora_b, 2.0, bias, grad_y, dropout=p, mask=mask)
    for name, got, want in zip(("y", "dx", "dA", "dB"), ours, expected):
        assert_op_close(got, want, dtype, name)
    other = lora_linear_fp64(x, dense, lora_a, lora_b, 2.0, bias, grad_y, dropout=p, mask=~mask)
    assert (ours[0].double() - other[0]).abs().max() > 1e-3 * other[0].abs().max()


def test_dispatch_by_rows(monkeypatch, device):
    calls = []
    for module, name in ((decode_kernels, "lora_decode_forward"), (lora_kernels, "lora_forward")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, _f=original, _n=name: calls.append(_n) or _f(*args))
    for m, path in ((1, "lora_decode_forward"), (decode_kernels.DECODE_MAX_M, "lora_decode_forward"),
                    (decode_kernels.DECODE_MAX_M + 1, "lora_forward")):
        x, weight, state, _, lora_a, lora_b, bias = make_lora_case(torch.float32, "dense", 4, device, m=m)
        calls.clear()
        ops.lora_linear(x, weight, lora_a, lora_b, 1.0, bias=bias)
        assert calls == [path], f"M = {m}"
