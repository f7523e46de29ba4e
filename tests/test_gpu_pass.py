"""The GPU pass (``bench.gpu_pass``, ``./run gpu-pass``) on the CPU: its plan, its step runner, its
reading of test results and benchmark JSON, and the finder that makes this checkout importable on a
lent machine. What it measures needs a GPU."""

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

from bench import gpu_pass

ROOT = Path(__file__).resolve().parents[1]


def test_every_named_test_file_exists():
    for path in gpu_pass.FIRST_TESTS + gpu_pass.CPU_ONLY_TESTS:
        assert (ROOT / path).is_file(), path


def test_quick_runs_the_never_run_kernels_first_and_full_runs_the_rest_on_cuda(tmp_path):
    quick = {step.name: step for step in gpu_pass.steps("quick", tmp_path)}
    assert list(quick)[0] == "tests-first"
    assert all(path in quick["tests-first"].command for path in gpu_pass.FIRST_TESTS)
    assert quick["tests-gpu-marked"].command[-3:] == ["-m", "gpu", "tests"]
    full = {step.name: step for step in gpu_pass.steps("full", tmp_path)}
    ignored = {arg.split("=", 1)[1] for arg in full["tests-rest"].command if arg.startswith("--ignore=")}
    assert ignored == set(gpu_pass.FIRST_TESTS + gpu_pass.CPU_ONLY_TESTS)
    for steps in (quick, full):  # every result lands in OUTDIR, none in bench/results
        for step in steps.values():
            if "bench" in step.command or "bench.memory" in step.command:
                assert step.command[-2:] == ["--output", str(tmp_path / "results")]


def test_dry_run_writes_the_plan_and_the_summary(tmp_path, capsys):
    assert gpu_pass.main([str(tmp_path), "--dry-run"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["steps"]) == [step.name for step in gpu_pass.steps("quick", tmp_path)]
    assert summary["environment"]["versions"]["torch"]
    assert capsys.readouterr().out.splitlines()[-1].startswith("measured vs model")


def test_without_a_gpu_the_pass_refuses_to_run(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_pass, "environment", lambda: {"gpu": None, "versions": {}})
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        gpu_pass.main([str(tmp_path)])


def step(tmp_path, code, limit_s=60):
    return gpu_pass.Step("probe", [sys.executable, "-c", code], limit_s)


def test_a_failing_step_is_recorded_with_its_log(tmp_path):
    probe = step(tmp_path, "print('probe ran'); raise SystemExit(3)")
    gpu_pass.run_step(probe, tmp_path, time.monotonic() + 120)
    assert probe.result["status"] == "failed (exit 3)"
    assert "probe ran" in (tmp_path / "probe.log").read_text()


def gone(pid):
    """The process has exited (a zombie waiting for init counts: it runs nothing)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_a_step_past_its_limit_is_killed_with_its_children(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_pass, "MIN_STEP_S", 0)
    child = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(60)']); open(sys.argv[1], 'w').write(str(p.pid)); "
            "time.sleep(60)")
    probe = gpu_pass.Step("probe", [sys.executable, "-c", code, str(child)], 2)
    start = time.monotonic()
    gpu_pass.run_step(probe, tmp_path, time.monotonic() + 120)
    assert probe.result["status"] == "timed out at 2 s" and time.monotonic() - start < 20
    pid = int(child.read_text())  # a test worker or a torchrun rank would outlive its parent
    for _ in range(50):
        if gone(pid):
            break
        time.sleep(0.1)
    assert gone(pid)


def test_a_step_without_budget_left_is_skipped(tmp_path):
    probe = step(tmp_path, "raise SystemExit(0)")
    gpu_pass.run_step(probe, tmp_path, time.monotonic() + gpu_pass.RESERVE_S + 1)
    assert probe.result == {"status": "skipped (budget spent)"}


def test_junit_counts(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text('<testsuites><testsuite name="pytest">'
                   '<testcase classname="tests.a" name="ok"/>'
                   '<testcase classname="tests.a" name="bad"><failure message="x"/></testcase>'
                   '<testcase classname="tests.b" name="broken"><error message="y"/></testcase>'
                   '<testcase classname="tests.b" name="skip"><skipped message="z"/></testcase>'
                   '</testsuite></testsuites>')
    assert gpu_pass.junit_counts(xml) == {"passed": 1, "failed": 1, "errors": 1, "skipped": 1,
                                          "failing": ["tests.a::bad", "tests.b::broken"]}
    assert gpu_pass.junit_counts(tmp_path / "missing.xml") is None


def test_measured_cases_sit_beside_the_committed_model_estimates(tmp_path):
    report = sorted((ROOT / "bench" / "results").glob("static-*.json"))[-1]
    static = json.loads(report.read_text())
    name = "lora_linear_train nf4-nested 4096x4096x14336 route=chosen"
    model_us = static["model"]["cases"]["H100 SXM"][name]["model_us"]
    case = {"op": "lora_linear_forward_backward", "shape": [4096, 4096, 14336],
            "params": {"base": "nf4", "double_quant": True},
            "timings_ms": {"lowrank": {"median": 2 * model_us / 1e3}}, "metrics": {}}
    (tmp_path / "bench.json").write_text(json.dumps({"cases": [case]}))
    info = {"commit": static["commit"], "gpu": {"name": "NVIDIA H200", "capability": "9.0"}}
    comparison = gpu_pass.model_beside_measured(tmp_path, info)
    assert comparison["rows"] == [{"case": name, "measured_us": round(2 * model_us, 1),
                                   "model_us": round(model_us, 1), "measured_over_model": 2.0}]
    assert "H100 SXM" in comparison["note"] and "H200" in comparison["note"]
    info["commit"] = "0" * 40
    assert gpu_pass.model_beside_measured(tmp_path, info)["rows"] == []


def test_the_site_folder_finds_lowrank_kernels_in_this_checkout():
    path = ROOT / "bench" / "gpu_pass_site" / "sitecustomize.py"
    spec = importlib.util.spec_from_file_location("gpu_pass_sitecustomize", path)
    module = importlib.util.module_from_spec(spec)
    appended = len(sys.meta_path)
    spec.loader.exec_module(module)
    try:
        found = module.KernelsFinder.find_spec("lowrank.kernels")
        assert Path(found.origin) == ROOT / "kernels" / "__init__.py"
        assert found.submodule_search_locations == [str(ROOT / "kernels")]
        assert module.KernelsFinder.find_spec("lowrank") is None
    finally:
        del sys.meta_path[appended:]
