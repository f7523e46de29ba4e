"""Every benchmark case, run dry on CPU: the same code as on a GPU (inputs, the correctness guard
against the reference, each baseline called, metrics, the result schema), with a runner that times
nothing. A case that breaks fails here, not on the next GPU run; no number is produced."""

import itertools

import pytest
import torch

from bench import report
from bench.__main__ import OPS, summary
from bench.harness import SCHEMA_VERSION, validate

# Small shapes of each op's kind, odd sizes, kernels in the interpreter.
DRY_SHAPES = {"nf4_dequantize": [(37, 65)],
              "lora_linear": [(260, 70, 50), (3, 97, 83), (20, 97, 83)]}
DRY_TIMING = {"median": 1.0, "p20": 0.5, "p80": 2.0}


class DryRunner:
    """The GpuRunner's interface on CPU: each timed function runs once (it must work), untimed."""

    device = "cpu"

    def __init__(self):
        self.calls = 0

    def rotating(self, make_inputs, bytes_per_set):
        return itertools.cycle([make_inputs() for _ in range(2)])

    def time(self, fn, inputs):
        fn(*next(inputs))
        self.calls += 1
        return dict(DRY_TIMING)

    def peak_memory_bytes(self, fn, inputs):
        fn(*next(inputs))
        return 0


def test_every_op_has_dry_shapes():
    assert set(DRY_SHAPES) == set(OPS)


@pytest.mark.parametrize("op", sorted(OPS))
def test_cases_run_dry_and_make_a_valid_result(op):
    runner = DryRunner()
    floors = {"copy_bandwidth_gbps": 1000.0, "bf16_gemm_tflops": 100.0}
    with torch.compiler.set_stance("force_eager"):  # bitsandbytes' CPU ops, run as they are
        cases = OPS[op].run(runner, floors, DRY_SHAPES[op])
    assert runner.calls == sum(len(case["timings_ms"]) for case in cases)
    result = {"schema": SCHEMA_VERSION, "device": {"name": "dry run", "capability": "0.0"},
              "versions": {"torch": torch.__version__, "triton": "dry", "bitsandbytes": "dry"}, "commit": None, "date": "2000-01-01T00:00:00+00:00",
              "floors": floors, "cases": cases}
    validate(result)
    for case in cases:
        assert "lowrank" in case["timings_ms"] and len(case["timings_ms"]) > 1, case["op"]
        assert all(value == value for value in case["metrics"].values())  # no NaN metric
    assert "dry run" in report.render([result])
    assert summary(result).count("\n") == len(cases) + 1


def test_lora_cases_cover_both_forward_paths_training_and_a_dense_base(monkeypatch):
    monkeypatch.setattr(OPS["lora_linear"], "DENSE_BASE_M", 260)
    runner = DryRunner()
    floors = {"copy_bandwidth_gbps": 1000.0, "bf16_gemm_tflops": 100.0}
    with torch.compiler.set_stance("force_eager"):
        cases = OPS["lora_linear"].run(runner, floors, DRY_SHAPES["lora_linear"])
    by_shape = {(case["op"], tuple(case["shape"])): case for case in cases
                if case["params"]["base"] == "nf4"}
    decode = by_shape[("lora_linear_forward", (3, 97, 83))]["timings_ms"]
    assert {"lowrank_tiled", "lowrank_decode", "bnb_peft", "dequant_cublas"} <= set(decode)
    assert "lowrank_decode" not in by_shape[("lora_linear_forward", (20, 97, 83))]["timings_ms"]
    train = [case for case in cases if case["op"] == "lora_linear_forward_backward"]
    assert [case["params"]["base"] for case in train] == ["nf4", "dense"]
    for case in train:
        assert set(case["peak_memory_bytes"]) == set(case["timings_ms"])
        assert {"reference", "bf16_gemm_floor"} <= set(case["timings_ms"])
        assert "pct_bf16_gemm_rate" in case["metrics"]
