"""The benchmark cases through pytest-benchmark: ``pytest bench/ --benchmark-only`` on a CUDA GPU
(``-k`` selects ops or shapes, e.g. ``-k "lora_linear and 4096x4096x14336"``).

pytest-benchmark's own table times lowrank's op of each case (the first function a case times: wall
clock, one CUDA synchronize per round). Every timing of the case, CUDA-event medians of lowrank and
all baselines with their metrics, is in the test's ``extra_info["cases"]`` (``--benchmark-json``).
``python -m bench`` is the main entry point; this one is for those who collect results with pytest.
"""

import pytest
import torch

from bench.__main__ import OPS, plan, shape_name
from bench.harness import GpuRunner, measure_copy_bandwidth_gbps, measure_gemm_tflops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks time GPU kernels")


class PytestBenchmarkRunner(GpuRunner):
    def __init__(self, benchmark):
        self.benchmark = benchmark
        self.timed_by_pytest_benchmark = False

    def time(self, fn, inputs):
        if not self.timed_by_pytest_benchmark:
            self.timed_by_pytest_benchmark = True

            def call():
                fn(*next(inputs))
                torch.cuda.synchronize()

            self.benchmark.pedantic(call, rounds=50, warmup_rounds=5)
        return GpuRunner.time(fn, inputs)


@pytest.fixture(scope="session")
def floors():
    return {"copy_bandwidth_gbps": measure_copy_bandwidth_gbps(),
            "bf16_gemm_tflops": measure_gemm_tflops()}


@pytest.mark.parametrize("op, shape", plan(sorted(OPS), quick=False),
                         ids=lambda value: shape_name(value) if isinstance(value, tuple) else value)
def test_benchmark(benchmark, floors, op, shape):
    benchmark.extra_info["cases"] = OPS[op].run(PytestBenchmarkRunner(benchmark), floors, [shape])
