"""lowrank.nf4 (kernels) and lowrank.reference's NF4 against bitsandbytes, bit for bit.

bitsandbytes is the oracle: packed bytes, absmax (plain and nested), offset and dequantized values
must be equal, not close. On CPU bitsandbytes' 4-bit quantizer is its portable PyTorch backend; for
the 8-bit double quantization of absmax its C++ CPU library uses an approximate search that picks
a non-nearest code for about 3% of values, while its CUDA kernel and its portable backend pick the
nearest code, as we do: on CPU the nested oracle is therefore the portable backend, called directly.
"""

import copy

import bitsandbytes.functional as F
import pytest
from helpers import assert_same_bits, bnb_quantize, decode_nf4, load_tiny_4bit_llama, poisoned
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch

from lowrank import nf4, reference

BLOCKSIZES = (32, 64, 128, 256, 4096)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
QUANTIZERS = {"kernels": nf4.quantize, "reference": reference.nf4_quantize}


def weight(layout, blocksize, dtype, device, seed):
    """A random weight whose element count is odd and not a multiple of ``blocksize``."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "1d":
        w = torch.randn(2 * blocksize + 37, generator=gen)
    elif layout == "2d":
        w = torch.randn(7, blocksize // 2 + 3, generator=gen)
    else:  # "strided": a transposed view, not contiguous
        w = torch.randn(blocksize // 4 + 5, 9, generator=gen).t()
        assert not w.is_contiguous()
    w[..., :3] *= 8.0  # outliers, so blocks have different absmax
    return w.to(dtype=dtype, device=device)


def bnb_dequantize(packed, quant_state, dtype):
    state = copy.copy(quant_state)
    state.dtype = dtype
    with torch.compiler.set_stance("force_eager"):
        out = F.dequantize_4bit(packed, state, quant_type="nf4")
    # Values are compared as they are; shapes follow quant_state.shape, as ours do. bitsandbytes
    # returns other shapes in two corners: (1, n) for a 1-D weight from its C++ CPU path (which
    # the tests replace: see conftest), and a transposed output when the packed tensor has one
    # row (a shim for an old layout).
    return out.reshape(state.shape)


def assert_state_matches(state, w, blocksize, bnb_absmax, bnb_nested):
    assert state.quant_type == "nf4" and state.blocksize == blocksize
    assert state.shape == w.shape and state.dtype == w.dtype
    assert_same_bits(state.code, F.get_4bit_type("nf4", device=w.device))
    assert_same_bits(state.absmax, bnb_absmax)
    assert state.nested == (bnb_nested is not None)
    if bnb_nested is not None:
        offset, nested_absmax = bnb_nested
        assert_same_bits(state.offset, offset)
        assert_same_bits(state.state2.absmax, nested_absmax)
        assert state.state2.blocksize == 256
        assert_same_bits(state.state2.code, F.create_dynamic_map().to(w.device))


def test_code_books_are_bitsandbytes_own():
    from lowrank._quant_state import code_books

    nf4_code, nf4_bounds, nested_code, nested_bounds = code_books(torch.device("cpu"))
    assert_same_bits(nf4_code, F.get_4bit_type("nf4", device="cpu"))
    assert_same_bits(nested_code, F.create_dynamic_map())
    assert nf4_bounds.numel() == 15 and nested_bounds.numel() == 255
    assert bool((nf4_bounds[1:] > nf4_bounds[:-1]).all())


@pytest.mark.parametrize("implementation", QUANTIZERS)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["1d", "2d", "strided"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_quantize_matches_bitsandbytes(implementation, blocksize, layout, dtype, double_quant, device):
    w = weight(layout, blocksize, dtype, device, seed=blocksize)
    packed, state = QUANTIZERS[implementation](w, blocksize=blocksize, double_quant=double_quant)
    bnb_packed, bnb_absmax, bnb_nested = bnb_quantize(w, blocksize, double_quant)
    assert_same_bits(packed, bnb_packed)
    assert_state_matches(state, w, blocksize, bnb_absmax, bnb_nested)


@pytest.mark.parametrize("implementation", QUANTIZERS)
def test_nested_absmax_over_many_nested_blocks(implementation, device):
    # 311 blocks of 32: two nested blocks of 256 absmax values, the second ragged.
    w = torch.randn(61, 163, generator=torch.Generator().manual_seed(1)).to(device)
    w[:, :40] *= 30.0
    w[5] = 0.0  # all-zero blocks: absmax 0, every code that of 0.0
    packed, state = QUANTIZERS[implementation](w, blocksize=32, double_quant=True)
    bnb_packed, bnb_absmax, bnb_nested = bnb_quantize(w, 32, True)
    assert state.state2.absmax.numel() == 2
    assert_same_bits(packed, bnb_packed)
    assert_state_matches(state, w, 32, bnb_absmax, bnb_nested)


@pytest.mark.parametrize("implementation", QUANTIZERS)
def test_quant_storage_bf16(implementation, device):
    w = torch.randn(9, 44, generator=torch.Generator().manual_seed(2)).to(device)  # 198 bytes
    packed, state = QUANTIZERS[implementation](w, blocksize=64, quant_storage=torch.bfloat16)
    bnb_packed, _, _ = bnb_quantize(w, 64, True, quant_storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    assert_same_bits(packed, bnb_packed)
    assert_same_bits(nf4.dequantize(packed, state), bnb_dequantize(bnb_packed, state, torch.float32))


NON_FINITE = {"nan": (float("nan"), float("nan")), "inf": (float("inf"), -float("inf"))}


@pytest.mark.parametrize("implementation", QUANTIZERS)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", NON_FINITE)
def test_nan_and_inf_quantize_as_bitsandbytes(implementation, kind, dtype, double_quant, device):
    """A NaN makes its block's absmax NaN (torch's max propagates it; the kernels' tl.max would
    skip it, and the block would decode to finite values); an inf makes it inf. Bytes and absmax
    as bitsandbytes' quantizer gives them (its portable backend on CPU), NaN where it has NaN, and
    decoding gives NaN and inf where the reference decode of that format does."""
    w = torch.randn(5, 70, generator=torch.Generator().manual_seed(3))  # 5 blocks of 64 + 30
    w[0, 5], w[4, 69] = NON_FINITE[kind]  # a full block and the ragged last one
    w[2, 60] = NON_FINITE[kind][0]
    w = w.to(dtype=dtype, device=device)
    packed, state = QUANTIZERS[implementation](w, blocksize=64, double_quant=double_quant)
    bnb_packed, bnb_absmax, bnb_nested = bnb_quantize(w, 64, double_quant)
    assert_same_bits(packed, bnb_packed)
    same = dict(rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(state.absmax, bnb_absmax, **same)
    if double_quant:  # absmax's mean is NaN: every nested value is
        torch.testing.assert_close(state.offset, bnb_nested[0], **same)
        torch.testing.assert_close(state.state2.absmax, bnb_nested[1], **same)
    decoded = nf4.dequantize(packed, state, dtype=torch.float32)
    torch.testing.assert_close(decoded, reference.nf4_dequantize(bnb_packed, state, torch.float32),
                               **same)
    if not double_quant:  # the blocks holding them (0, 3 and the ragged 5) and only those
        assert (~state.absmax.isfinite()).nonzero().flatten().tolist() == [0, 3, 5]
        assert decoded.reshape(-1)[64:192].isfinite().all()


DEQUANTIZERS = {
    "kernels-out": lambda packed, state, dtype: nf4.dequantize(
        packed, state, out=poisoned(state.shape, dtype, packed.device)),
    "kernels": lambda packed, state, dtype: nf4.dequantize(packed, state, dtype=dtype),
    "reference": reference.nf4_dequantize,
}


@pytest.mark.parametrize("implementation", DEQUANTIZERS)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("layout", ["1d", "2d", "strided"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_dequantize_matches_bitsandbytes(implementation, blocksize, layout, double_quant, out_dtype,
                                         device):
    # The quant state is bitsandbytes' own, as a model loaded in 4-bit would carry it.
    w = weight(layout, blocksize, torch.bfloat16, device, seed=blocksize + 1)
    with torch.compiler.set_stance("force_eager"):
        packed, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                        quant_type="nf4")
    out = DEQUANTIZERS[implementation](packed, state, out_dtype)
    assert_same_bits(out, bnb_dequantize(packed, state, out_dtype))


def test_dequantize_reads_a_loaded_4bit_model_in_place(tmp_path):
    """The Params4bit of a model loaded with load_in_4bit is used as is: same values, no copy."""
    from bitsandbytes.nn import Linear4bit

    model = load_tiny_4bit_llama(tmp_path, torch.bfloat16)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 7
    for layer in layers:
        param = layer.weight
        out = poisoned(param.quant_state.shape, torch.bfloat16, "cpu")
        assert nf4.dequantize(param, param.quant_state, out=out) is out
        assert_same_bits(out, bnb_dequantize(param.data, param.quant_state, torch.bfloat16))
    from lowrank._quant_state import check_quant_state

    param = layers[0].weight
    assert check_quant_state(param, param.quant_state).data_ptr() == param.data_ptr()


def repacked_for_cpu(packed, state):
    """A copy of (packed, state) repacked as bitsandbytes' Linear4bit.forward repacks them for its
    AVX512-BF16 CPU kernel in eval mode (the conversion itself is plain torch: any CPU runs it)."""
    return F._convert_weight_packed_for_cpu(packed.clone(), copy.deepcopy(state))


REPACKED_READERS = {
    "kernels": lambda packed, state: nf4.dequantize(packed, state),
    "reference": reference.nf4_dequantize,
}


@pytest.mark.parametrize("implementation", REPACKED_READERS)
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "nested"])
def test_dequantize_reads_a_weight_bitsandbytes_repacked_for_its_cpu_kernel(
        implementation, double_quant, dtype, storage):
    # 96 x 128 in blocks of 64: three tiles of 32 rows, two blocks a row.
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(5))
    w[:, :3] *= 8.0
    with torch.compiler.set_stance("force_eager"):
        packed, state = F.quantize_4bit(w.to(dtype), blocksize=64, compress_statistics=double_quant,
                                        quant_type="nf4", quant_storage=storage)
    repacked, repacked_state = repacked_for_cpu(packed, state)
    assert repacked_state.packing_format_for_cpu and repacked.shape == (96, 64)
    kept = repacked.clone(), repacked_state.absmax.clone()
    out = REPACKED_READERS[implementation](repacked, repacked_state)
    # The weight bitsandbytes computes with from then on: the same codes, each absmax rounded to
    # bf16; in the dtype it was quantized from (the repacked state says bf16).
    assert_same_bits(out, decode_nf4(packed, state, absmax_dtype=torch.bfloat16).to(dtype))
    # Read, not rewritten: bitsandbytes' forward still finds its layout.
    assert_same_bits(repacked, kept[0])
    assert_same_bits(repacked_state.absmax, kept[1])
    assert repacked_state.packing_format_for_cpu and repacked_state.dtype == torch.bfloat16
    # The bytes are those bitsandbytes' own inverse gives back (which, unlike the read, rewrites
    # the state and requantizes the absmax).
    from lowrank._quant_state import read_nf4

    standard, _ = read_nf4(repacked, repacked_state)
    inverse, _ = F._convert_weight_packed_for_cpu_inverse(repacked.clone(),
                                                          copy.deepcopy(repacked_state))
    assert_same_bits(standard, inverse)
    assert_same_bits(standard, packed)


def test_a_repacked_state_that_cannot_be_is_refused_by_name():
    with torch.compiler.set_stance("force_eager"):
        packed, state = F.quantize_4bit(torch.randn(64, 128), blocksize=64, quant_type="nf4")
    repacked, repacked_state = repacked_for_cpu(packed, state)
    repacked_state.absmax = repacked_state.absmax.t()
    with pytest.raises(ValueError, match="absmax must be"):
        nf4.dequantize(repacked, repacked_state)
    repacked_state.shape = torch.Size((70, 128))
    with pytest.raises(ValueError, match="shape 70 x 128 cannot be in that layout"):
        nf4.dequantize(repacked, repacked_state)
    repacked_state.shape = torch.Size((32, 128))
    with pytest.raises(ValueError, match="has 4096 bytes, but its shape 32 x 128 needs 2048"):
        nf4.dequantize(repacked, repacked_state)


def test_round_trip_is_stable(device):
    """Quantizing a dequantized NF4 weight gives back the same bytes (a fixed point)."""
    w = torch.randn(31, 77, generator=torch.Generator().manual_seed(3)).to(device)
    packed, state = nf4.quantize(w, blocksize=64, double_quant=False)
    again, state_again = nf4.quantize(nf4.dequantize(packed, state), blocksize=64, double_quant=False)
    assert_same_bits(again, packed)
    assert_same_bits(state_again.absmax, state.absmax)


# Bad input: a clear error naming the problem, never a wrong answer.

def fp4_state(device):
    w = torch.randn(8, 16, device=device)
    with torch.compiler.set_stance("force_eager"):
        return F.quantize_4bit(w, blocksize=64, quant_type="fp4")


@pytest.mark.parametrize("implementation", ["kernels", "reference"])
def test_fp4_is_refused(implementation, device):
    packed, state = fp4_state(device)
    dequantize = nf4.dequantize if implementation == "kernels" else reference.nf4_dequantize
    with pytest.raises(ValueError, match="'fp4'"):
        dequantize(packed, state)


def test_bad_quantize_arguments_are_named(device):
    w = torch.randn(4, 64, device=device)
    with pytest.raises(TypeError, match="torch.int32"):
        nf4.quantize(w.to(torch.int32))
    with pytest.raises(ValueError, match="blocksize 48"):
        nf4.quantize(w, blocksize=48)
    with pytest.raises(TypeError, match="quant_storage torch.int64"):
        nf4.quantize(w, quant_storage=torch.int64)
    with pytest.raises(ValueError, match="do not fill whole torch.float32"):
        nf4.quantize(torch.randn(3, 3, device=device), quant_storage=torch.float32)
    with pytest.raises(ValueError, match="empty"):
        nf4.quantize(torch.randn(0, 4, device=device))


def test_bad_dequantize_arguments_are_named(device):
    packed, state = nf4.quantize(torch.randn(6, 40, device=device), blocksize=32)
    with pytest.raises(ValueError, match="needs 120"):
        nf4.dequantize(packed[:-1], state)
    with pytest.raises(ValueError, match=r"shape \(6, 40\)"):
        nf4.dequantize(packed, state, out=torch.empty(40, 6, device=device))
    with pytest.raises(TypeError, match="out has dtype torch.float32 but dtype=torch.float16"):
        nf4.dequantize(packed, state, out=torch.empty(6, 40, device=device), dtype=torch.float16)
    with pytest.raises(TypeError, match="output dtype torch.int8"):
        nf4.dequantize(packed, state, dtype=torch.int8)
    with pytest.raises(TypeError, match="QuantState"):
        nf4.dequantize(packed, {"absmax": state.absmax})
    with pytest.raises(ValueError, match="must be on one device"):
        nf4.dequantize(packed.to("meta"), state)


def test_ops_pass_torch_library_checks(device):
    from lowrank import ops

    w = torch.randn(5, 70, device=device)
    torch.library.opcheck(ops.nf4_quantize, (w.reshape(-1), 64))
    packed, absmax = ops.nf4_quantize(w.reshape(-1), 64)
    offset = absmax.mean()
    torch.library.opcheck(ops.nf4_quantize_absmax, (absmax, offset))
    out = torch.empty(350, device=device)
    weight = ops.FrozenWeight(packed, (350,), absmax, blocksize=64)
    torch.library.opcheck(ops.nf4_dequantize, (*weight.flat(), out))


def test_dequantize_traces_with_torch_compile(device):
    packed, state = nf4.quantize(torch.randn(3, 90, device=device), blocksize=64)
    compiled = torch.compile(lambda p: nf4.dequantize(p, state) * 2, fullgraph=True, backend="eager")
    assert_same_bits(compiled(packed), nf4.dequantize(packed, state) * 2)


@pytest.mark.gpu
def test_llama_sized_weight_matches_bitsandbytes_cuda():
    w = torch.randn(4096, 14336, device="cuda", dtype=torch.bfloat16)
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert_same_bits(nf4.dequantize(packed, state), F.dequantize_4bit(packed, state, quant_type="nf4"))
    ours, our_state = nf4.quantize(w, blocksize=64, double_quant=True)
    assert_same_bits(ours, packed)
    assert_state_matches(our_state, w, 64, state.absmax, (state.offset, state.state2.absmax))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 700), blocksize=st.sampled_from([32, 64, 128]), double_quant=st.booleans(),
       scale=st.floats(1e-6, 1e4), seed=st.integers(0, 2**31 - 1))
def test_any_size_matches_bitsandbytes(n, blocksize, double_quant, scale, seed, device):
    w = (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale).to(device)
    packed, state = nf4.quantize(w, blocksize=blocksize, double_quant=double_quant)
    bnb_packed, bnb_absmax, bnb_nested = bnb_quantize(w, blocksize, double_quant)
    assert_same_bits(packed, bnb_packed)
    assert_state_matches(state, w, blocksize, bnb_absmax, bnb_nested)
    assert_same_bits(nf4.dequantize(packed, state), bnb_dequantize(bnb_packed, state, torch.float32))
