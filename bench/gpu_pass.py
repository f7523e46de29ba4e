"""The GPU pass: everything lowrank measures, in one command on a lent GPU machine.

    python -m bench.gpu_pass OUTDIR [--stage quick|full] [--budget-s SECONDS]
    ./run gpu-pass OUTDIR [...]          # the same, with this machine's python3 (no virtualenv)

For a machine without network that has torch, triton, transformers, peft and pytest (bitsandbytes
as a carried wheel; pytest-xdist used where present): no virtualenv is made, nothing is downloaded. Each step runs
in its own process with a time limit cut from the budget, so a step that hangs or crashes costs
only itself; its log lands in OUTDIR as it runs, and the summary is printed last whatever happened.

``quick`` (one call of under 10 minutes): the environment (device, driver, versions, commit); the
tests of the kernel paths that have only ever been compiled (``FIRST_TESTS``) and every test marked
``gpu``, on CUDA; ``python -m bench --quick``; the quick memory ledger; then measured times beside
the static model's estimates of the same cases (the committed ``static-<commit>.json``, for the
model device of this GPU's architecture: an estimate for another device is labelled so).
``full`` (a second call): the rest of the suite on CUDA (the compile tests excepted: they build for
other GPUs on the CPU, as CI does), the full benchmarks and memory ledgers, and the static report
if none is committed for this commit.

OUTDIR gets environment.json, a <step>.log (and <step>.xml for tests) per step, the benchmark and
ledger JSON under results/ (copy them to bench/results/ and run ``python -m bench.report``), and
summary.json. The commit is ``git rev-parse HEAD``, or LOWRANK_COMMIT where the tree has no .git
(a copy of a checkout).
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The tests of kernel paths that have only been compiled, never run (as of the last static report):
# the dX's packed-word prefetch and its PTX word lookup, the register-order forward (2 stages, 4-byte
# x copies), IA3's register-order forward, the decode's split-K at 2 programs an SM with odd K and
# 64 x 32 tiles, the mixed-batch kernels, DoRA, the MoE experts. They run first.
FIRST_TESTS = ("tests/test_lora_linear.py", "tests/test_ia3_linear.py",
               "tests/test_lora_linear_decode.py", "tests/test_lora_mixed.py",
               "tests/test_dora_linear.py", "tests/test_moe.py")
# Compiled for sm_80-90 and gfx942 on the CPU: what CI checks; nothing of this GPU's.
CPU_ONLY_TESTS = ("tests/test_compile_gpu.py", "tests/test_compile_amd.py")
# Seconds kept back from the budget for the summary; a step with less than MIN_STEP_S left is skipped.
RESERVE_S = 15
MIN_STEP_S = 10


@dataclass
class Step:
    name: str
    command: list
    limit_s: int
    xml: bool = False  # a pytest step: its JUnit XML is read for the counts
    result: dict = field(default_factory=dict)


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("LOWRANK_COMMIT")


def environment():
    import torch

    versions = {name: _version(name) for name in
                ("torch", "triton", "transformers", "peft", "bitsandbytes", "pytest", "xdist")}
    info = {"commit": commit(), "python": sys.version.split()[0], "versions": versions,
            "cuda": torch.version.cuda, "gpu": None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                       "multiprocessors": props.multi_processor_count,
                       "memory_gib": round(props.total_memory / 2**30, 1),
                       "count": torch.cuda.device_count()}
        smi = _run_quiet(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                          "--format=csv,noheader"])
        info["nvidia_smi"] = smi.strip() if smi else None
    return info


def _version(name):
    if importlib.util.find_spec(name) is None:
        return None
    module = __import__(name)
    return getattr(module, "__version__", "installed")


def _run_quiet(command):
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None


def pytest_command(xml_path, *args):
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE",
               f"--junitxml={xml_path}"]
    if importlib.util.find_spec("xdist") is not None:
        command += ["-n", "8", "--dist", "worksteal"]  # one GPU is enough for 8 test processes
    return command + list(args)


def steps(stage, out):
    results = out / "results"
    python = [sys.executable, "-m"]
    if stage == "quick":
        return [
            Step("tests-first", pytest_command(out / "tests-first.xml", *FIRST_TESTS), 300, True),
            Step("tests-gpu-marked", pytest_command(out / "tests-gpu-marked.xml", "-m", "gpu",
                                                    "tests"), 120, True),
            Step("bench-quick", python + ["bench", "--quick", "--output", str(results)], 240),
            Step("memory-quick", python + ["bench.memory", "--quick", "--output", str(results)], 90),
        ]
    ignored = [f"--ignore={path}" for path in FIRST_TESTS + CPU_ONLY_TESTS]
    return [
        Step("tests-rest", pytest_command(out / "tests-rest.xml", "-m", "not gpu", *ignored,
                                          "tests"), 420, True),
        Step("bench-full", python + ["bench", "--output", str(results)], 1200),
        Step("memory-full", python + ["bench.memory", "--output", str(results)], 300),
        Step("memory-moe", python + ["bench.memory", "--moe", "--output", str(results)], 300),
        Step("memory-dora", python + ["bench.memory", "--dora", "--output", str(results)], 300),
    ]


def run_step(step, out, deadline):
    """Run one step with its log in OUTDIR, killed at its limit or the budget's end."""
    limit = min(step.limit_s, deadline - RESERVE_S - time.monotonic())
    if limit < MIN_STEP_S:
        step.result = {"status": "skipped (budget spent)"}
        return
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if commit():
        env["LOWRANK_COMMIT"] = commit()
    start = time.monotonic()
    with open(out / f"{step.name}.log", "w") as log:
        log.write(f"$ {' '.join(step.command)}\n")
        log.flush()
        process = subprocess.Popen(step.command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env=env, start_new_session=True)
        try:
            code = process.wait(timeout=limit)
            status = "passed" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)  # its children too (test workers, torchrun ranks)
            process.wait()
            status = f"timed out at {limit:.0f} s"
    step.result = {"status": status, "seconds": round(time.monotonic() - start, 1)}
    if step.xml:
        step.result["tests"] = junit_counts(out / f"{step.name}.xml")


def junit_counts(path):
    """passed / failed / errors / skipped of a pytest JUnit file, and the failing tests' ids."""
    if not path.exists():
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failing": []}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in
                        ("failure", "error", "skipped")), None)
        key = {"failure": "failed", "error": "errors", "skipped": "skipped"}.get(outcome, "passed")
        counts[key] += 1
        if outcome in ("failure", "error"):
            counts["failing"].append(f"{case.get('classname')}::{case.get('name')}")
    return counts


# Measured benchmark cases (op, the forward's path) and the static model's case of the same computation.
MODEL_CASES = {("lora_linear_forward", "train"): "lora_linear_forward {kind} {shape} route=chosen",
               ("lora_linear_forward", "decode"): "lora_linear_decode {kind} {shape}",
               ("lora_linear_forward_backward", None): "lora_linear_train {kind} {shape} route=chosen"}
# The static model's device for each architecture it models.
MODEL_DEVICES = {"9.0": "H100 SXM", "8.9": "RTX 4090"}


def model_beside_measured(results_dir, info):
    """Each measured case the static model estimates: (case, measured us, model us, ratio)."""
    capability = (info.get("gpu") or {}).get("capability")
    device = MODEL_DEVICES.get(capability)
    report = ROOT / "bench" / "results" / f"static-{(info.get('commit') or '')[:10]}.json"
    if device is None or not report.exists():
        why = (f"no static report for commit {info.get('commit')}" if device else
               f"the static model has no device of capability {capability}")
        return {"note": why, "rows": []}
    estimates = json.loads(report.read_text())["model"]["cases"][device]
    rows = []
    for path in sorted(results_dir.glob("*.json")):
        result = json.loads(path.read_text())
        for case in result.get("cases", []):
            params = case.get("params", {})
            pattern = (MODEL_CASES.get((case["op"], params.get("path")))
                       or MODEL_CASES.get((case["op"], None)))
            if pattern is None:
                continue
            kind = ("dense" if params.get("base") == "dense" else
                    "nf4-nested" if params.get("double_quant") else "nf4")
            name = pattern.format(kind=kind, shape="x".join(map(str, case["shape"])))
            if name in estimates:
                measured = case["timings_ms"]["lowrank"]["median"] * 1e3
                model = estimates[name]["model_us"]
                rows.append({"case": name, "measured_us": round(measured, 1),
                             "model_us": round(model, 1), "measured_over_model":
                             round(measured / model, 3)})
    note = "model estimates for the " + device + (
        "" if device in (info["gpu"] or {}).get("name", "") else
        f" (this GPU is a {info['gpu']['name']}: same architecture, other clocks and bandwidth)")
    return {"note": note, "rows": rows}


def summary_text(info, done, comparison):
    gpu = info.get("gpu") or {}
    lines = [f"GPU pass, commit {(info.get('commit') or 'unknown')[:10]}: "
             f"{gpu.get('name', 'no CUDA GPU')} (sm {gpu.get('capability', '-')}), "
             f"torch {info['versions']['torch']}, triton {info['versions']['triton']}, "
             f"bitsandbytes {info['versions']['bitsandbytes']}",
             f"{'step':<18}{'status':<30}{'s':>7}  tests"]
    for step in done:
        tests = step.result.get("tests")
        counts = ("" if not tests else
                  f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                  f"{tests['skipped']} skipped")
        lines.append(f"{step.name:<18}{step.result['status']:<30}"
                     f"{step.result.get('seconds', 0):>7.0f}  {counts}")
        for failing in (tests or {}).get("failing", [])[:20]:
            lines.append(f"    FAILED {failing}")
    if comparison["rows"]:
        lines.append(f"measured vs model ({comparison['note']}):")
        lines.append(f"{'case':<58}{'measured us':>12}{'model us':>10}{'ratio':>7}")
        for row in comparison["rows"]:
            lines.append(f"{row['case']:<58}{row['measured_us']:>12.1f}{row['model_us']:>10.1f}"
                         f"{row['measured_over_model']:>7.2f}")
    else:
        lines.append(f"measured vs model: {comparison['note']}")
    return "\n".join(lines)


def bench_summaries(results_dir):
    """The benchmark tables the bench runs printed (their logs' last table)."""
    from bench.__main__ import summary

    tables = []
    for path in sorted(results_dir.glob("*.json")):
        result = json.loads(path.read_text())
        if "floors" in result:
            tables.append(summary(result))
    return tables


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_pass", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--stage", choices=("quick", "full"), default="quick")
    parser.add_argument("--budget-s", type=float, default=540,
                        help="seconds for the whole call, summary included (default 540)")
    parser.add_argument("--dry-run", action="store_true",
                        help="write the plan and the summary without running the steps")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget_s
    out = args.outdir.resolve()
    (out / "results").mkdir(parents=True, exist_ok=True)
    info = environment()
    (out / "environment.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2), flush=True)
    if info["gpu"] is None and not args.dry_run:
        raise SystemExit("python -m bench.gpu_pass: no CUDA GPU here; the pass measures one "
                         "(--dry-run shows its plan)")
    if info["versions"]["bitsandbytes"] is None:
        print("bitsandbytes is not installed: the tests that use it as the oracle will fail "
              "(carry its wheel; see DEVELOPERS.md)", flush=True)
    done = []
    for step in steps(args.stage, out):
        if args.dry_run:
            step.result = {"status": "not run (dry run)", "command": " ".join(map(str, step.command))}
        else:
            print(f"--- {step.name} (limit {step.limit_s} s)", flush=True)
            run_step(step, out, deadline)
        done.append(step)
        (out / "summary.json").write_text(json.dumps(
            {"environment": info, "stage": args.stage,
             "steps": {s.name: s.result for s in done}}, indent=2) + "\n")
    comparison = model_beside_measured(out / "results", info)
    (out / "summary.json").write_text(json.dumps(
        {"environment": info, "stage": args.stage, "steps": {s.name: s.result for s in done},
         "measured_vs_model": comparison}, indent=2) + "\n")
    for table in bench_summaries(out / "results"):
        print(table)
    print(summary_text(info, done, comparison))
    return 0 if all(s.result["status"] in ("passed", "not run (dry run)") for s in done) else 1


if __name__ == "__main__":
    sys.exit(main())
