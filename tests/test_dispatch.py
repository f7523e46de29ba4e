"""Dispatch, in one place: CUDA -> kernels; CPU with TRITON_INTERPRET=1 -> kernels in the
interpreter; CPU otherwise -> the reference. And lowrank.kernels is never a top-level module."""

import os
import subprocess
import sys

import pytest
import torch

from lowrank import _dispatch
from lowrank.kernels import INTERPRETER


def run_python(code, env_changes, cwd=None):
    env = {**os.environ, **env_changes}
    env = {k: v for k, v in env.items() if v is not None}
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.strip()


def test_cpu_tensors_run_kernels_only_under_the_interpreter():
    assert _dispatch.use_kernels(x=torch.zeros(1)) == INTERPRETER
    if not torch.cuda.is_available():
        assert INTERPRETER, "the test session runs the kernels in the interpreter"


@pytest.mark.gpu
def test_cuda_tensors_run_kernels():
    assert _dispatch.use_kernels(x=torch.zeros(1, device="cuda"))
    assert _dispatch.backend_name("cuda") == "triton"


def test_device_mismatch_and_unknown_devices_are_named():
    with pytest.raises(ValueError, match="packed on cpu, out on meta"):
        _dispatch.use_kernels(packed=torch.zeros(1), absmax=None, out=torch.zeros(1, device="meta"))
    with pytest.raises(NotImplementedError, match="'meta'"):
        _dispatch.use_kernels(x=torch.zeros(1, device="meta"))


def test_cpu_without_interpreter_uses_the_reference_with_the_same_results():
    code = """
import torch, bitsandbytes.functional as F
from lowrank import nf4
from lowrank._dispatch import backend_name
w = torch.randn(37, 71, generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16)
packed, state = nf4.quantize(w, blocksize=64)
with torch.compiler.set_stance("force_eager"):
    bnb_packed, _ = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    expected = F.dequantize_4bit(bnb_packed, state, quant_type="nf4")
print(backend_name("cpu"), torch.equal(packed, bnb_packed), torch.equal(nf4.dequantize(packed, state), expected))
"""
    assert run_python(code, {"TRITON_INTERPRET": None}) == "reference True True"


def test_kernels_install_under_lowrank_only(tmp_path):
    code = """
import importlib.util, lowrank.kernels.nf4_dequantize
print(importlib.util.find_spec("kernels") is None)
"""
    assert run_python(code, {}, cwd=tmp_path) == "True"


BF16_IN_THE_INTERPRETER = """
import logging
logging.basicConfig(level=logging.INFO, format="%(message)s")
import torch, triton, triton.language as tl
import lowrank
from lowrank import ops, reference

gen = torch.Generator().manual_seed(0)
x = torch.randn(37, 70, generator=gen).bfloat16()
w = (torch.randn(45, 70, generator=gen) * 0.1).bfloat16()
a, b = torch.randn(3, 70, generator=gen) * 0.1, torch.randn(45, 3, generator=gen) * 0.1
l = 0.5 + torch.rand(45, generator=gen)

def error(actual, expected):
    return ((actual.float() - expected).abs().max() / expected.abs().max()).item()

@triton.jit
def row_sums(x_ptr, out_ptr, N: tl.constexpr):
    row = tl.program_id(0)
    tl.store(out_ptr + row, tl.sum(tl.load(x_ptr + row * N + tl.arange(0, N)), axis=0))

x16 = x.clone().requires_grad_()
y = ops.lora_linear(x16, w, a, b, 0.5)
y.float().square().sum().backward()
x32 = x.float().requires_grad_()
y32 = reference.lora_linear(x32, w.float(), a, b, 0.5)
y32.square().sum().backward()
sums = torch.empty(37, dtype=torch.bfloat16)
row_sums[(37,)](x[:, :64].contiguous(), sums, N=64)
print(lowrank._dispatch.backend_name("cpu"), error(y, y32.detach()), error(x16.grad, x32.grad),
      error(ops.ia3_linear(x, w, l), reference.ia3_linear(x.float(), w.float(), l)),
      error(sums, x[:, :64].float().sum(1)))
"""


def test_bf16_is_right_in_the_interpreter_with_lowrank_alone(tmp_path):
    """The interpreter's own bf16 tl.dot / tl.sum compute on raw bits (off by ~1e10): lowrank must
    be right in that mode by itself, in a fresh process with nothing but ``import lowrank``. bf16
    against fp32 on the same bf16 inputs: within bf16 rounding of the outputs."""
    script = tmp_path / "bf16.py"  # a file: @triton.jit reads the kernel's source
    script.write_text(BF16_IN_THE_INTERPRETER)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    backend, *errors = run.stdout.split()  # lora_linear y and dx, ia3_linear y, a tl.sum
    assert backend == "triton-interpreter"
    assert all(float(error) < 1e-2 for error in errors), errors
    from lowrank.kernels._interpreter import NOTICE

    assert run.stderr.count(NOTICE) == 1  # said once


def test_the_interpreter_is_left_alone_without_it():
    """Without TRITON_INTERPRET nothing of Triton's is wrapped: a GPU compiles Triton's own."""
    code = """
import lowrank
from triton.runtime import interpreter
print(interpreter.InterpreterBuilder.create_dot.__qualname__)
print(interpreter.ReduceOps.sum.__qualname__)
"""
    assert run_python(code, {"TRITON_INTERPRET": None}).split() == [
        "InterpreterBuilder.create_dot", "ReduceOps.sum"]
