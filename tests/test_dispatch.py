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
