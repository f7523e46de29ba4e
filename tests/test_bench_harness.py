"""The benchmark harness's logic, on CPU: result schema, report generation, the correctness guard,
and the plain "no GPU" exit. Timing itself needs a GPU and is never done in tests."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import report
from bench.__main__ import summary
from bench.harness import IncorrectResult, check_outputs, validate, write_result

FIXTURE = Path(__file__).parent / "data" / "bench_result_fixture.json"
REPO = Path(__file__).parent.parent


@pytest.fixture
def result():
    return json.loads(FIXTURE.read_text())


def test_guard_refuses_to_time_a_wrong_output():
    expected = torch.arange(6, dtype=torch.float32)
    check_outputs("op", expected.clone(), expected)
    wrong = expected.clone()
    wrong[3] += 1e-3
    with pytest.raises(IncorrectResult, match="max abs error"):
        check_outputs("op", wrong, expected)
    with pytest.raises(IncorrectResult, match="float16"):
        check_outputs("op", expected.half(), expected)
    with pytest.raises(IncorrectResult):
        check_outputs("op", torch.full_like(expected, float("nan")), expected)


def test_schema_accepts_the_fixture_and_rejects_broken_results(result):
    validate(result)
    for broken in ({k: v for k, v in result.items() if k != "floors"},
                   {**result, "schema": 99},
                   {**result, "cases": [{**result["cases"][0], "timings_ms": {"lowrank": {"median": 1}}}]}):
        with pytest.raises(ValueError):
            validate(broken)


def test_write_then_report(result, tmp_path):
    path = write_result(copy.deepcopy(result), directory=tmp_path)
    assert json.loads(path.read_text()) == result
    output = tmp_path / "BENCHMARKS.md"
    report.main(["--results", str(tmp_path), "--output", str(output)])
    text = output.read_text()
    assert "## Fixture GPU (synthetic, not a measurement) (sm_90)" in text
    assert "| nf4_dequantize | 4096x14336 |" in text
    assert "bitsandbytes 5.0000" in text and "speedup_vs_bitsandbytes 2.50" in text


def test_report_without_results_says_so(tmp_path):
    assert "No results yet" in report.render(report.load_results(tmp_path))


def test_summary_table(result):
    table = summary(result)
    assert "copy 1000 GB/s" in table and "4096x14336" in table and "2.50" in table


def test_committed_benchmarks_md_is_generated_from_stored_results():
    results = report.load_results()
    links = report.plot_links(results, report.RESULTS_DIR / "plots", REPO)
    assert (REPO / "BENCHMARKS.md").read_text() == report.render(results, links)
    for paths in links.values():
        assert all((REPO / path).is_file() for path in paths)


def test_without_a_gpu_the_suite_says_so_and_times_nothing(tmp_path):
    before = sorted((REPO / "bench" / "results").iterdir())
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-m", "bench", "--quick"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines() == [
        "No CUDA GPU found: lowrank's benchmarks time GPU kernels, so nothing was measured."]
    assert sorted((REPO / "bench" / "results").iterdir()) == before
