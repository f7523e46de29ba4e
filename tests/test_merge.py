"""lowrank.ops' LoRA and IA3 merges (kernels/lora_merge.py, kernels/ia3_merge.py) against the
reference, fp64, bitsandbytes and the unmerged forward.

The weight is N x K = 83 x 97 (odd, ragged last NF4 block); rank 5. Dense merges round once from
an fp32 sum, so they are bit-equal to the reference and within half an ulp (plus the fp32 sum's
error) of fp64. NF4 merges must give the bytes bitsandbytes' quantize_4bit gives for the fp32
merged weight.
"""

import math

import pytest
import torch
from helpers import assert_op_close, assert_same_bits, bnb_quantize, poisoned

from lowrank import nf4, ops, reference
from lowrank._quant_state import code_books
from lowrank.kernels import ia3_merge as ia3_merge_kernel
from lowrank.kernels import lora_merge as lora_merge_kernel

N, K, R, M = 83, 97, 5, 37
SCALING = 0.7
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# A merge rounds W + s B A (or W * l) once to the dtype: half an ulp, plus the fp32 sum's error.
MERGE_TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
NF4_KINDS = {"nf4-64": (64, False), "nf4-nested-64": (64, True), "nf4-nested-128": (128, True)}
FORMS = {"output": False, "feedforward": True}


def make_adapters(device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen) * 0.05
    w[:, :3] *= 8  # blocks with different absmax
    lora_a = torch.randn(R, K, generator=gen) / math.sqrt(K)
    lora_b = torch.randn(N, R, generator=gen) * 0.05
    ia3 = {False: 0.5 + torch.rand(N, 1, generator=gen),
           True: 0.5 + torch.rand(1, K, generator=gen)}
    bias = torch.randn(N, generator=gen)
    return (w.to(device), lora_a.to(device), lora_b.to(device),
            {k: v.to(device) for k, v in ia3.items()}, bias.to(device))


def fp64_lora(dense, lora_a, lora_b):
    return dense.double() + SCALING * lora_b.double() @ lora_a.double()


def fp64_ia3(dense, ia3, feedforward):
    return dense.double() * ia3.double().reshape((1, -1) if feedforward else (-1, 1))


def merge(op, weight, adapters, feedforward, **kwargs):
    """Run ``merge_lora`` or ``merge_ia3`` (``op`` from ops or reference); return the weight part."""
    _, lora_a, lora_b, ia3, _ = adapters
    if op.__name__ == "merge_lora":
        return op(weight, lora_a, lora_b, SCALING, **kwargs)
    return op(weight, ia3[feedforward], feedforward, **kwargs)[0]


def exact(kind, dense, adapters, feedforward):
    _, lora_a, lora_b, ia3, _ = adapters
    return fp64_lora(dense, lora_a, lora_b) if kind == "lora" else fp64_ia3(dense, ia3[feedforward],
                                                                           feedforward)


OPS = {"lora": (ops.merge_lora, reference.merge_lora), "ia3": (ops.merge_ia3, reference.merge_ia3)}
CASES = [("lora", False), ("ia3", False), ("ia3", True)]
CASE_IDS = ["lora", "ia3-output", "ia3-feedforward"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,feedforward", CASES, ids=CASE_IDS)
def test_dense_merge_matches_reference_and_fp64(kind, feedforward, dtype, device):
    adapters = make_adapters(device)
    weight = adapters[0].to(dtype)
    ours, ref = (merge(op, weight, adapters, feedforward) for op in OPS[kind])
    assert_same_bits(ours, ref)
    assert_op_close(ours, exact(kind, weight, adapters, feedforward), dtype, "merged",
                 MERGE_TOLERANCE[dtype])


@pytest.mark.parametrize("kind,feedforward,nf4_kind", [
    ("lora", False, "nf4-64"), ("lora", False, "nf4-nested-64"), ("lora", False, "nf4-nested-128"),
    ("ia3", False, "nf4-nested-64"), ("ia3", True, "nf4-64")], ids=lambda v: str(v))
def test_nf4_merge_matches_bitsandbytes_quantize_of_the_fp32_merge(kind, feedforward, nf4_kind,
                                                                   device):
    blocksize, nested = NF4_KINDS[nf4_kind]
    adapters = make_adapters(device)
    packed, state = nf4.quantize(adapters[0].to(torch.bfloat16), blocksize, double_quant=nested)
    original = packed.clone(), state.absmax.clone()
    merged_packed, merged_state = merge(OPS[kind][0], packed, adapters, feedforward,
                                        quant_state=state)
    # The fp32 merged weight, and bitsandbytes' quantization of it.
    merged_fp32 = merge(OPS[kind][1], packed, adapters, feedforward, quant_state=state,
                        dtype=torch.float32)
    dense = nf4.dequantize(packed, state, dtype=torch.float32)
    assert_op_close(merged_fp32, exact(kind, dense, adapters, feedforward), torch.float32, "fp32",
                 MERGE_TOLERANCE[torch.float32])
    bnb_packed, bnb_absmax, bnb_nested = bnb_quantize(merged_fp32, blocksize, nested)
    assert_same_bits(merged_packed, bnb_packed)  # every byte equal
    assert_same_bits(merged_state.absmax, bnb_absmax)
    assert merged_state.nested == nested and merged_state.blocksize == blocksize
    assert merged_state.dtype == state.dtype and merged_state.shape == state.shape
    if nested:
        assert_same_bits(merged_state.offset, bnb_nested[0])
        assert_same_bits(merged_state.state2.absmax, bnb_nested[1])
    # The reference gives the same, and the input is left as it was.
    ref_packed, ref_state = merge(OPS[kind][1], packed, adapters, feedforward, quant_state=state)
    assert_same_bits(merged_packed, ref_packed)
    assert_same_bits(merged_state.absmax, ref_state.absmax)
    assert_same_bits(packed, original[0])
    assert_same_bits(state.absmax, original[1])


@pytest.mark.parametrize("kind,feedforward,dtype", [
    ("lora", False, torch.float32), ("lora", False, torch.float16), ("lora", False, torch.bfloat16),
    ("ia3", False, torch.bfloat16), ("ia3", True, torch.float16)], ids=lambda v: str(v))
def test_nf4_merge_to_16_bit_is_lossless(kind, feedforward, dtype, device):
    """NF4 weight -> dense ``dtype`` ("merge and unload"): one rounding of the exact merge."""
    adapters = make_adapters(device)
    packed, state = nf4.quantize(adapters[0], 64, double_quant=True)
    ours, ref = (merge(op, packed, adapters, feedforward, quant_state=state, dtype=dtype)
                 for op in OPS[kind])
    assert_same_bits(ours, ref)
    dense = nf4.dequantize(packed, state, dtype=torch.float32)
    assert_op_close(ours, exact(kind, dense, adapters, feedforward), dtype, "merged",
                 MERGE_TOLERANCE[dtype])


@pytest.mark.parametrize("weight_kind", ["dense", "nf4-nested-64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merged_lora_forward_equals_unmerged_forward(dtype, weight_kind, device):
    w, lora_a, lora_b, _, bias = make_adapters(device)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    bias = bias.to(dtype)
    if weight_kind == "dense":
        weight, state = w.to(dtype), None
    else:
        weight, state = nf4.quantize(w, 64, double_quant=True)
    unmerged = ops.lora_linear(x, weight, lora_a, lora_b, SCALING, bias=bias, quant_state=state)
    merged = ops.merge_lora(weight, lora_a, lora_b, SCALING, quant_state=state, dtype=dtype)
    assert_op_close(torch.nn.functional.linear(x, merged, bias), unmerged.double(), dtype, "y")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("weight_kind", ["dense", "nf4-nested-64"])
def test_merged_ia3_forward_equals_unmerged_forward(weight_kind, form, device):
    feedforward, dtype = FORMS[form], torch.bfloat16
    w, _, _, ia3, bias = make_adapters(device)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    bias = bias.to(dtype)
    if weight_kind == "dense":
        weight, state = w.to(dtype), None
    else:
        weight, state = nf4.quantize(w, 64, double_quant=True)
    unmerged = ops.ia3_linear(x, weight, ia3[feedforward], bias, feedforward, quant_state=state)
    merged, merged_bias = ops.merge_ia3(weight, ia3[feedforward], feedforward, bias,
                                        quant_state=state, dtype=dtype)
    assert (merged_bias is bias) == feedforward
    assert_op_close(torch.nn.functional.linear(x, merged, merged_bias), unmerged.double(), dtype, "y")


def test_nf4_requantized_merge_stays_within_nf4_error_of_the_16_bit_merge(device):
    """The lossy path: dequantized NF4 merge vs the 16-bit merge of the same weights, relative to
    the largest weight: of the order of one NF4 step (the codes are ~0.1 apart at absmax 1)."""
    w, lora_a, lora_b, _, _ = make_adapters(device)
    packed, state = nf4.quantize(w, 64, double_quant=True)
    merged_packed, merged_state = ops.merge_lora(packed, lora_a, lora_b, SCALING, quant_state=state)
    lossless = ops.merge_lora(packed, lora_a, lora_b, SCALING, quant_state=state,
                              dtype=torch.float32)
    lossy = nf4.dequantize(merged_packed, merged_state, dtype=torch.float32)
    error = ((lossy - lossless).abs().max() / lossless.abs().max()).item()
    assert 1e-3 < error < 0.1, error


def test_nf4_unmerge_is_the_kept_original(device):
    """NF4 unmerge = keep the original bytes and state (merge leaves them untouched). Requantizing
    the merged weight minus s B A instead does not give them back."""
    w, lora_a, lora_b, _, _ = make_adapters(device)
    packed, state = nf4.quantize(w, 256, double_quant=True)
    kept = packed.clone(), state.absmax.clone(), state.state2.absmax.clone(), state.offset.clone()
    merged_packed, merged_state = ops.merge_lora(packed, lora_a, lora_b, SCALING, quant_state=state)
    for before, after in zip(kept, (packed, state.absmax, state.state2.absmax, state.offset)):
        assert_same_bits(after, before)
    requantized, _ = ops.merge_lora(merged_packed, lora_a, lora_b, -SCALING,
                                    quant_state=merged_state)
    assert (requantized != packed).sum().item() > 0


def rounding_bound(dtype, magnitude):
    """Two roundings to ``dtype`` of values of this ``magnitude``: eps relative, and up to two
    steps of the subnormal grid where values are that small (the IA3 divide by l >= 0.5 can
    double the product's)."""
    info = torch.finfo(dtype)
    return info.eps * magnitude * 1.01 + 2 * info.smallest_normal * info.eps


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_lora_merge_unmerge_round_trip_bound(dtype, device):
    w, lora_a, lora_b, _, _ = make_adapters(device)
    weight = w.to(dtype)
    original = weight.clone()
    assert ops.merge_lora_(weight, lora_a, lora_b, SCALING) is weight
    assert_same_bits(weight, ops.merge_lora(original, lora_a, lora_b, SCALING))
    assert ops.unmerge_lora_(weight, lora_a, lora_b, SCALING) is weight
    # One rounding in the add and one in the subtract: |W'' - W| <= eps (|W| + |s B A|), or one
    # subnormal step where the values are subnormal.
    delta = (SCALING * lora_b.double() @ lora_a.double()).abs()
    bound = rounding_bound(dtype, original.double().abs() + delta)
    assert bool(((weight.double() - original.double()).abs() <= bound).all())


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_ia3_merge_unmerge_round_trip_bound(dtype, form, device):
    feedforward = FORMS[form]
    w, _, _, ia3, bias = make_adapters(device)
    weight, bias = w.to(dtype), bias.to(dtype)
    originals = weight.clone(), bias.clone()
    merged = ops.merge_ia3(weight, ia3[feedforward], feedforward, bias)
    result = ops.merge_ia3_(weight, ia3[feedforward], feedforward, bias)
    assert result[0] is weight and result[1] is bias
    assert_same_bits(weight, merged[0])
    assert_same_bits(bias, merged[1])
    ops.unmerge_ia3_(weight, ia3[feedforward], feedforward, bias)
    # A multiply and a correctly rounded divide: |W'' - W| <= eps |W| (likewise the bias).
    for after, before in zip((weight, bias), originals):
        bound = rounding_bound(dtype, before.double().abs())
        assert bool(((after.double() - before.double()).abs() <= bound).all())


def test_in_place_merge_of_a_strided_weight(device):
    """A dense weight that is a transposed view is read and written through its strides."""
    w, lora_a, lora_b, ia3, _ = make_adapters(device)
    storage = w.t().contiguous()  # K x N
    weight = storage.t()  # N x K, not contiguous
    expected = reference.merge_lora(weight, lora_a, lora_b, SCALING)
    ops.merge_lora_(weight, lora_a, lora_b, SCALING)
    assert_same_bits(weight.contiguous(), expected)
    expected = reference.merge_ia3(weight, ia3[True], True)[0]
    ops.merge_ia3_(weight, ia3[True], True)
    assert_same_bits(weight.contiguous(), expected)


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_kernels_write_every_output_element(kind, device):
    """The launchers into NaN-poisoned dense outputs and garbage-filled NF4 outputs."""
    w, lora_a, lora_b, ia3, _ = make_adapters(device)
    packed, state = nf4.quantize(w, 256, double_quant=False)  # fewer, larger interpreted programs
    frozen = ops.FrozenWeight.of(packed, state)
    packed, nf4_args = frozen.tensor, frozen.nf4

    def launch(weight, decoding, out, **outputs):
        if kind == "lora":
            lora_merge_kernel.lora_merge(weight, lora_a, lora_b, SCALING, out, nf4=decoding,
                                         **outputs)
        else:
            ia3_merge_kernel.ia3_merge(weight, ia3[False].reshape(-1), (N, K), False, False, out,
                                       nf4=decoding, **outputs)

    out = poisoned((N, K), torch.bfloat16, device)
    launch(w, None, out)
    expected = (reference.merge_lora(w, lora_a, lora_b, SCALING, dtype=torch.bfloat16)
                if kind == "lora" else reference.merge_ia3(w, ia3[False], dtype=torch.bfloat16)[0])
    assert_same_bits(out, expected)
    out = torch.full_like(packed, 0xAB)
    out_absmax = poisoned(state.absmax.shape, torch.float32, device)
    launch(packed, nf4_args, out, out_absmax=out_absmax, bounds=code_books(out.device)[1])
    op = reference.merge_lora if kind == "lora" else reference.merge_ia3
    args = (lora_a, lora_b, SCALING) if kind == "lora" else (ia3[False],)
    result = op(packed, *args, quant_state=state)
    expected_packed, expected_state = result if kind == "lora" else result[0]
    assert_same_bits(out, expected_packed.reshape(-1))
    assert_same_bits(out_absmax, expected_state.absmax)


def test_merge_ops_pass_torch_library_checks(device):
    w, lora_a, lora_b, ia3, _ = make_adapters(device)
    out = torch.empty(N, K, device=device)
    weight_args = ops.FrozenWeight.of(w).flat()
    torch.library.opcheck(ops.lora_merge, (*weight_args, lora_a, lora_b, SCALING, out, None))
    torch.library.opcheck(ops.ia3_merge, (*weight_args, ia3[True], True, False, out, None))
    packed, state = nf4.quantize(w, 1024, double_quant=False)
    out, out_absmax = torch.empty_like(packed.reshape(-1)), torch.empty_like(state.absmax)
    torch.library.opcheck(ops.lora_merge, (*ops.FrozenWeight.of(packed, state).flat(), lora_a,
                                           lora_b, SCALING, out, out_absmax))


def test_bad_arguments_are_named(device):
    import bitsandbytes.functional as F

    w, lora_a, lora_b, ia3, bias = make_adapters(device)
    packed, state = nf4.quantize(w, 64)
    params4bit = packed.clone()
    params4bit.quant_state = state  # what a bitsandbytes Params4bit carries
    with torch.compiler.set_stance("force_eager"):
        fp4_packed, fp4_state = F.quantize_4bit(w, quant_type="fp4")
    cases = [
        (lambda: ops.merge_lora(w, lora_a, lora_b[:, :3], SCALING), ValueError,
         r"merge_lora: lora_B must be \(83, 5\)"),
        (lambda: ops.merge_lora(w, lora_a[:, 1:], lora_b, SCALING), ValueError,
         r"lora_A must be \(r, 97\)"),
        (lambda: ops.merge_lora(w, lora_a, lora_b, SCALING, dtype=torch.int8), TypeError,
         "dtype torch.int8 is not supported"),
        (lambda: ops.merge_lora(w.to(torch.int32), lora_a, lora_b, SCALING), TypeError,
         "weight dtype torch.int32"),
        (lambda: ops.merge_lora(fp4_packed, lora_a, lora_b, SCALING, quant_state=fp4_state),
         ValueError, "'fp4'"),
        (lambda: ops.merge_lora_(params4bit, lora_a, lora_b, SCALING), ValueError,
         "merge_lora_: merging in place needs a dense weight"),
        (lambda: ops.unmerge_ia3_(params4bit, ia3[False]), ValueError,
         "unmerge_ia3_: merging in place needs a dense weight"),
        (lambda: ops.merge_ia3(w, ia3[True]), ValueError,
         r"merge_ia3: ia3 must have shape \(83,\) or \(83, 1\)"),
        (lambda: ops.merge_ia3(w, ia3[False], bias=bias[1:]), ValueError, r"bias must be \(83,\)"),
        (lambda: ops.merge_ia3(w, ia3[False].to("meta")), ValueError, "must be on one device"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
