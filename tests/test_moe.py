"""LoRA on mixture-of-experts experts: ``lowrank.ops.lora_grouped`` and its kernels against the
fp64 reference, and patched tiny MoE models (Qwen3-MoE, OLMoE) against PEFT's ``target_parameters``
(``ParamWrapper``).

Op shapes are odd (K = 29, N = 37, rank 3, 5 experts) with imbalanced routing: experts with no
rows, one with one row, one with most of them (more than one 64-row tile)."""

import pytest
import torch
from helpers import TOLERANCE, assert_op_close, poisoned

from lowrank import ops, reference
from lowrank.kernels import lora_grouped as grouped_kernels

E, K, N, RANK = 5, 29, 37, 3
COUNTS = (0, 70, 1, 0, 9)  # rows per expert: none, two tiles, one row, none, a ragged tile
SCALING = 0.7


def offsets_of(counts, device="cpu"):
    counts = torch.tensor(counts)
    return torch.cat((counts.new_zeros(1), counts.cumsum(0))).to(device, torch.int32)


def make_case(dtype, transposed, counts=COUNTS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = sum(counts)
    x = torch.randn(rows, K, generator=gen).to(dtype)
    shape = (E, K, N) if transposed else (E, N, K)
    weight = (torch.randn(shape, generator=gen) * 0.2).to(dtype)
    lora_a = torch.randn(E * RANK, K, generator=gen) * 0.3
    lora_b = torch.randn(N, RANK * E, generator=gen) * 0.3
    return x, weight, lora_a, lora_b, offsets_of(counts), torch.randn(rows, N, generator=gen).to(dtype)


def fp64_oracle(x, weight, lora_a, lora_b, offsets, grad_y, transposed):
    leaves = [t.detach().double().requires_grad_() for t in (x, lora_a, lora_b)]
    y = reference.lora_grouped(leaves[0], weight.double(), leaves[1], leaves[2], SCALING, offsets,
                               transposed)
    y.backward(grad_y.double())
    return y.detach(), *(t.grad for t in leaves)


@pytest.mark.parametrize("transposed", [False, True], ids=["E-N-K", "E-K-N"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_lora_grouped_against_fp64(dtype, transposed):
    x, weight, lora_a, lora_b, offsets, grad_y = make_case(dtype, transposed)
    x.requires_grad_()
    lora_a.requires_grad_()
    lora_b.requires_grad_()
    y = ops.lora_grouped(x, weight, lora_a, lora_b, SCALING, offsets, transposed)
    y.backward(grad_y)
    expected = fp64_oracle(x, weight, lora_a, lora_b, offsets, grad_y, transposed)
    assert_op_close(y, expected[0], dtype, "y")
    assert_op_close(x.grad, expected[1], dtype, "dx")
    # dA, dB: fp32 adapters, from products of x's dtype accumulated in fp32.
    assert_op_close(lora_a.grad, expected[2], torch.float32, "dA", TOLERANCE[dtype])
    assert_op_close(lora_b.grad, expected[3], torch.float32, "dB", TOLERANCE[dtype])
    # An expert without rows gets exactly zero gradient.
    rank_rows = lora_a.grad.view(E, RANK, K)
    assert rank_rows[0].eq(0).all() and rank_rows[3].eq(0).all()
    assert lora_b.grad.view(N, RANK, E)[:, :, 3].eq(0).all()


def test_lora_grouped_kernels_write_every_element():
    """Launchers into NaN-filled outputs: every row of every expert with rows is written, and the
    fp32 weight gradients of every expert (zeros for those without rows)."""
    dtype = torch.float32
    x, weight, lora_a, lora_b, offsets, grad_y = make_case(dtype, False, counts=(64, 0, 0, 1, 0))
    rows = x.shape[0]
    a, b = lora_a.stride(), lora_b.stride()
    s = poisoned((rows, RANK), dtype, "cpu")
    grouped_kernels.grouped_shrink(x, lora_a, (RANK * a[0], a[0], a[1]), s, offsets, 1.0)
    y = poisoned((rows, N), dtype, "cpu")
    grouped_kernels.grouped_gemm(x, weight, weight.stride(), s, lora_b, (b[1], b[0], E * b[1]), y,
                                 offsets, SCALING)
    grad_b = poisoned(lora_b.shape, torch.float32, "cpu")
    grouped_kernels.grouped_weight_grad(s, grad_y, grad_b, (1, E, RANK * E), offsets, SCALING)
    expected = fp64_oracle(x, weight, lora_a, lora_b, offsets, grad_y, False)
    assert_op_close(y, expected[0], dtype, "y")
    assert_op_close(grad_b, expected[3], dtype, "dB")


def test_lora_grouped_all_rows_on_one_expert_and_none():
    x, weight, lora_a, lora_b, offsets, grad_y = make_case(torch.float32, False,
                                                           counts=(0, 0, 11, 0, 0))
    y = ops.lora_grouped(x, weight, lora_a, lora_b, SCALING, offsets)
    assert_op_close(y, fp64_oracle(x, weight, lora_a, lora_b, offsets, grad_y, False)[0],
                    torch.float32, "y")
    empty = ops.lora_grouped(x[:0], weight, lora_a, lora_b, SCALING, offsets_of((0,) * E))
    assert empty.shape == (0, N)


def test_lora_grouped_refuses_bad_arguments():
    x, weight, lora_a, lora_b, offsets, _ = make_case(torch.float32, False)
    with pytest.raises(ValueError, match="PEFT's target_parameters layout"):
        ops.lora_grouped(x, weight, lora_a[:-1], lora_b, SCALING, offsets)
    with pytest.raises(ValueError, match="x has 28 features"):
        ops.lora_grouped(x[:, 1:], weight, lora_a, lora_b, SCALING, offsets)
    with pytest.raises(TypeError, match="offsets must be 6"):
        ops.lora_grouped(x, weight, lora_a, lora_b, SCALING, offsets[1:])
    with pytest.raises(TypeError, match="expert stack in x's dtype"):
        ops.lora_grouped(x, weight.half(), lora_a, lora_b, SCALING, offsets)


def test_expert_offsets():
    ids = torch.tensor([1, 1, 2, 4, 4, 4])
    assert ops.expert_offsets(ids, E).tolist() == [0, 0, 2, 3, 3, 6]
