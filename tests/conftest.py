"""Test set-up. On a machine without CUDA the kernels run in Triton's interpreter: TRITON_INTERPRET
must be set before triton (and so lowrank) is imported, which is why it is set here, first."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _interpret_bf16_dot_as_fp32():
    """Triton's interpreter stores bf16 as uint16 and its tl.dot multiplies the bit patterns
    (triton issue 11584). Widen bf16 operands to fp32 first: exact, test-only, and it changes
    nothing a GPU runs. Every other bf16 step (loads, casts, stores) is the interpreter's own."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    create_dot = interpreter.InterpreterBuilder.create_dot

    def widen(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        data = (handle.data.astype(np.uint32) << 16).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    def create_dot_bf16_as_fp32(self, a, b, d, *args):
        return create_dot(self, widen(a), widen(b), d, *args)

    interpreter.InterpreterBuilder.create_dot = create_dot_bf16_as_fp32


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpret_bf16_dot_as_fp32()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """Where kernels run in this session: the GPU if there is one, else the CPU (interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def poisoned(shape, dtype, device):
    """An output buffer full of NaN: any element a kernel fails to write stays NaN."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def load_tiny_4bit_llama(directory, compute_dtype, **from_pretrained_kwargs):
    """A one-layer Llama saved to ``directory`` and loaded back in 4-bit (NF4, double quant) on CPU,
    exactly as users load one: every linear becomes a bitsandbytes Linear4bit with a Params4bit."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    LlamaForCausalLM(config).save_pretrained(directory)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=compute_dtype)
    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization,
                                                device_map="cpu", **from_pretrained_kwargs)


def assert_same_bits(actual, expected):
    """Equal bit for bit (compared as bytes)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    mismatched = (actual.reshape(-1).view(torch.uint8) != expected.reshape(-1).view(torch.uint8)).sum()
    assert mismatched.item() == 0, f"{mismatched.item()} bytes differ"


def bnb_quantize(w, blocksize, double_quant, quant_storage=torch.uint8):
    """bitsandbytes' (packed, absmax, (offset, nested_absmax) or None) for ``w``.

    On CPU, bitsandbytes' C++ library double-quantizes absmax with an approximate search (about 3%
    of codes are not the nearest); its CUDA kernel and portable backend pick the nearest, as we
    do, so on CPU the nested oracle is the portable backend, called directly."""
    import bitsandbytes.functional as F

    with torch.compiler.set_stance("force_eager"):  # bitsandbytes compiles its CPU ops otherwise
        if w.is_cuda:
            packed, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                            quant_type="nf4", quant_storage=quant_storage)
            nested = (state.offset, state.state2.absmax) if double_quant else None
            return packed, state.absmax, nested
        packed, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=False,
                                        quant_type="nf4", quant_storage=quant_storage)
        if not double_quant:
            return packed, state.absmax, None
        offset = state.absmax.mean()
        portable = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
        codes, nested_absmax = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
            portable, state.absmax - offset, F.create_dynamic_map(), 256)
        return packed, codes, (offset, nested_absmax)
