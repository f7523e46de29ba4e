"""Test set-up. On a machine without CUDA the kernels run in Triton's interpreter: TRITON_INTERPRET
must be set before triton (and so lowrank) is imported, which is why it is set here, first."""

import os

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


@pytest.fixture
def device():
    """Where kernels run in this session: the GPU if there is one, else the CPU (interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def poisoned(shape, dtype, device):
    """An output buffer full of NaN: any element a kernel fails to write stays NaN."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
