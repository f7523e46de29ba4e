"""The small-M (decode) forward of lowrank.ops.lora_linear: split-K kernels against the fp64 reference.

K = 300 is not a multiple of the decode BLOCK_K, and on CPU it is cut into several K-slices (the
last one ragged), so the partial sums and their reduction are exercised; N = 83 leaves a partial
N block. Shapes, tolerances and helpers are those of test_lora_linear.py.
"""

import pytest
import torch
from helpers import (N, assert_op_close, check_lora_linear_against_fp64, lora_linear_fp64,
                     make_lora_case, poisoned, run_lora_linear)

from lowrank import ops
from lowrank.kernels import lora_linear as lora_kernels
from lowrank.kernels import lora_linear_decode as decode_kernels

K_DECODE = 300


@pytest.mark.parametrize("m", [1, decode_kernels.DECODE_MAX_M])
@pytest.mark.parametrize("kind", ["dense", "nf4-64", "nf4-nested-128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_forward_and_backward_match_fp64_reference(dtype, kind, m, device):
    check_lora_linear_against_fp64(dtype, kind, 16, True, device, m=m, k=K_DECODE)


@pytest.mark.parametrize("rank", [1, 40])
def test_ranks_without_bias(rank, device):
    check_lora_linear_against_fp64(torch.bfloat16, "nf4-nested-128", rank, False, device, m=5, k=K_DECODE)


def test_the_split_covers_k_with_no_empty_slice():
    cpu = torch.device("cpu")
    for n_tiles in (1, 2, 3, 7, 16, 40):
        for k_steps in (1, 2, 3, 5, 64, 115):
            splits, steps = decode_kernels.split_k(n_tiles, k_steps, cpu)
            assert (splits - 1) * steps < k_steps <= splits * steps
    # What the other tests here rely on: their K is cut into several slices, the last one ragged.
    block_k = decode_kernels.DECODE_TILE["BLOCK_K"]
    splits, steps = decode_kernels.split_k(2, -(-K_DECODE // block_k), cpu)
    assert splits > 1 and K_DECODE % (steps * block_k) != 0


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
