"""Test set-up. On a machine without CUDA the kernels run in Triton's interpreter: TRITON_INTERPRET
must be set before triton (and so lowrank) is imported, which is why it is set here, first. bf16 in
the interpreter is lowrank's own business (kernels/_interpreter.py): nothing here patches Triton."""

import os
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def bitsandbytes_dequantize_4bit_on_its_portable_path():
    """bitsandbytes' own 4-bit results are the oracle of many tests (its dequantize_4bit, and
    Linear4bit / PEFT's 4-bit layers through gemm_4bit, which dequantizes with it). On CPUs with
    AVX512 its C++ CPU kernel for dequantize_4bit returns wrong values for some shapes (e.g.
    (64, 96) and (70, 96): errors of 2 to 10), so there the oracle would be wrong. Its portable
    implementation decodes the format as written (code[nibble] x absmax of its block): the CPU
    kernel is replaced by it for the session, on every machine, so all see the same oracle.
    Only bitsandbytes changes; lowrank never calls it."""
    import bitsandbytes  # noqa: F401  (defines the op and registers its CPU kernel first)

    portable = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)

    def dequantize_4bit(*args):
        return torch.ops.bitsandbytes.dequantize_4bit.default.redispatch(portable, *args)

    library = torch.library.Library("bitsandbytes", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Overriding a previously registered kernel"
        library.impl("dequantize_4bit", dequantize_4bit, "CPU", allow_override=True)
    yield
    library._destroy()  # bitsandbytes' own CPU kernel is back


@pytest.fixture
def device():
    """Where kernels run in this session: the GPU if there is one, else the CPU (interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"
