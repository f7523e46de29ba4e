"""Every benchmark case, run dry on CPU: the same code as on a GPU (inputs, the correctness guard
against the reference, each baseline called, metrics, the result schema), with a runner that times
nothing. A case that breaks fails here, not on the next GPU run; no number is produced."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import report
from bench.__main__ import OPS, plan, summary
from bench.harness import SCHEMA_VERSION, validate

# Small shapes of each op's kind, odd sizes, kernels in the interpreter.
DRY_SHAPES = {"nf4_dequantize": [(37, 65)],
              "lora_linear": [(260, 70, 50), (3, 97, 83), (20, 97, 83)],
              "ia3_linear": [(37, 70, 50)],
              "merge": [(40, 64), (24, 130)],
              "train_step": [(2, 8, 32, 1, 48)],
              "lora_mixed": [(5, 70, 50, 3), (2, 70, 50, 1), (40, 70, 50, 2)],
              "dora_linear": [(37, 70, 50), (2, 8, 32, 1, 48)],
              # (tokens, experts, top-k, hidden, intermediate): Qwen3-MoE's module, gpt-oss's
              "lora_grouped": [(37, 5, 2, 40, 24), (37, 32, 4, 40, 24)]}
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
def test_cases_run_dry_and_make_a_valid_result(op, tmp_path):
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
        # each route forced, beside the chosen one (DoRA's layer cases; not its training step)
        if op in ("lora_linear", "ia3_linear") or case["op"].startswith("dora_linear"):
            assert {"lowrank_fused", "lowrank_cublas"} <= set(case["timings_ms"]), case["op"]
        assert all(value == value for value in case["metrics"].values())  # no NaN metric
    assert summary(result).count("\n") == len(cases) + 1
    plots = report.draw_plots(result, tmp_path)
    links = report.plot_links([result], tmp_path, tmp_path)
    assert [tmp_path / path for path in links[result["date"]]] == plots
    assert all(path.stat().st_size > 0 for path in plots)
    text = report.render([result], links)
    assert "dry run" in text and all(f"({path})" in text for path in links[result["date"]])


def test_lora_cases_cover_every_route_training_and_a_dense_base(monkeypatch):
    monkeypatch.setattr(OPS["lora_linear"], "DENSE_BASE_M", 260)
    runner = DryRunner()
    floors = {"copy_bandwidth_gbps": 1000.0, "bf16_gemm_tflops": 100.0}
    with torch.compiler.set_stance("force_eager"):
        cases = OPS["lora_linear"].run(runner, floors, DRY_SHAPES["lora_linear"])
    by_shape = {(case["op"], tuple(case["shape"])): case for case in cases
                if case["params"]["base"] == "nf4"}
    decode = by_shape[("lora_linear_forward", (3, 97, 83))]["timings_ms"]
    routes = {"lowrank_fused", "lowrank_cublas"}
    assert routes | {"lowrank_decode", "bnb_peft", "dequant_cublas"} <= set(decode)
    assert "lowrank_decode" not in by_shape[("lora_linear_forward", (20, 97, 83))]["timings_ms"]
    assert routes <= set(by_shape[("lora_linear_forward_backward", (260, 70, 50))]["timings_ms"])
    train = [case for case in cases if case["op"] == "lora_linear_forward_backward"]
    assert [case["params"]["base"] for case in train] == ["nf4", "dense"]
    for case in train:
        assert set(case["peak_memory_bytes"]) == set(case["timings_ms"])
        assert {"reference", "bf16_gemm_floor"} <= set(case["timings_ms"])
        assert "pct_bf16_gemm_rate" in case["metrics"]


def test_pytest_benchmark_collects_every_case_and_skips_without_a_gpu():
    repo = Path(__file__).parent.parent
    # Not as an xdist worker (pytest-benchmark turns itself off under xdist): a plain pytest.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    run = subprocess.run([sys.executable, "-m", "pytest", "bench", "-q", "-p", "no:cacheprovider",
                          "-p", "no:xdist", "--benchmark-only", "-rs"], cwd=repo,
                         capture_output=True, text=True, timeout=300,
                         env={**env, "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"{len(plan(sorted(OPS), quick=False))} skipped" in run.stdout
    assert "benchmarks time GPU kernels" in run.stdout


def test_shape_filter_keeps_what_is_asked_and_refuses_unknown_shapes():
    assert plan(["lora_linear"], False, ["1x4096x14336"]) == [("lora_linear", (1, 4096, 14336))]
    assert len(plan(sorted(OPS), True)) == sum(len(m.QUICK_SHAPES) for m in OPS.values())
    with pytest.raises(SystemExit, match="no case has shape 3x3"):
        plan(["lora_linear"], False, ["3x3"])
