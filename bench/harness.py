"""What every benchmark shares: timing, the device's floors, the correctness guard, result files.

Times are medians (with 20/80 quantiles) of CUDA-event timings from ``triton.testing.do_bench``,
after warm-up, on rotating input sets larger than the L2 cache so no call finds its inputs there.
Each run also measures the device's copy bandwidth and a cuBLAS bf16 GEMM, so results can be read
as ratios that compare across GPUs.
"""

import datetime
import itertools
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).with_name("results")
SCHEMA_VERSION = 1
QUANTILES = (0.5, 0.2, 0.8)


class IncorrectResult(AssertionError):
    """An op's output disagrees with the reference: it is not timed."""


def check_outputs(name, actual, expected, atol=0.0, rtol=0.0):
    """The guard run before timing: refuse to time an op whose output is wrong."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        raise IncorrectResult(f"{name}: got {actual.dtype}{tuple(actual.shape)}, expected "
                              f"{expected.dtype}{tuple(expected.shape)}")
    if not torch.allclose(actual, expected, atol=atol, rtol=rtol, equal_nan=False):
        worst = (actual.float() - expected.float()).abs().nan_to_num(float("inf")).max().item()
        raise IncorrectResult(f"{name}: output differs from the reference (max abs error {worst}, "
                              f"atol {atol}, rtol {rtol}); not timing it")


def check_all(fns, args, expected, relative=2e-2, skip=("bf16_gemm_floor",)):
    """The guard for every way a case computes one output (``fns``: name -> fn(*args)); the floor,
    which computes less, is skipped. bf16 sums over K: allow ``relative`` of the largest value."""
    atol = relative * expected.abs().max().item()
    for name, fn in fns.items():
        if name not in skip:
            check_outputs(name, fn(*args), expected, atol=atol, rtol=relative / 2)


def headline_metrics(timings, floors, bytes_read=None, flops=None):
    """Speed-ups of lowrank over every other timing; lowrank as a % of the device's copy bandwidth
    (from the bytes it must read) or of its bf16 GEMM rate (from the flops it must do)."""
    ms = timings["lowrank"]["median"]
    metrics = {f"speedup_vs_{name}": t["median"] / ms for name, t in timings.items()
               if name != "lowrank"}
    if bytes_read is not None:  # bytes per ms / 1e6 = GB/s
        metrics["pct_copy_bandwidth"] = 100 * bytes_read / ms / 1e6 / floors["copy_bandwidth_gbps"]
    if flops is not None:  # flops per ms / 1e9 = TFLOP/s
        metrics["pct_bf16_gemm_rate"] = 100 * flops / ms / 1e9 / floors["bf16_gemm_tflops"]
    return metrics


def timed_case(runner, op, shape, params, calls, inputs, floors, flops, backward):
    """One case's record: every call of ``calls`` ({name: fn}) timed on ``inputs``, the headline
    metrics, and (with backward) each call's peak memory."""
    timings = {name: runner.time(call, inputs) for name, call in calls.items()}
    case = {"op": op, "shape": shape, "params": params, "timings_ms": timings,
            "metrics": headline_metrics(timings, floors, flops=flops)}
    if backward:
        case["peak_memory_bytes"] = {name: runner.peak_memory_bytes(call, inputs)
                                     for name, call in calls.items()}
    return case


def rotating(make_inputs, bytes_per_set):
    """Enough input sets to exceed twice the L2 cache, cycled through call by call."""
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    count = max(2, -(-2 * l2 // max(bytes_per_set, 1)))
    return itertools.cycle([make_inputs() for _ in range(count)])


def time_ms(fn, inputs):
    """Median, 20% and 80% quantiles in ms of ``fn(*next(inputs))``."""
    import triton.testing

    median, p20, p80 = triton.testing.do_bench(lambda: fn(*next(inputs)), warmup=25, rep=200,
                                               quantiles=list(QUANTILES))
    return {"median": median, "p20": p20, "p80": p80}


def peak_memory_bytes(fn, inputs):
    """Peak bytes allocated during one ``fn(*next(inputs))``, above what was allocated before."""
    args = next(inputs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn(*args)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


class GpuRunner:
    """How cases run: on the GPU, with CUDA-event timings. Cases only touch the device through a
    runner, so the test suite can run every case on CPU with a dry runner that times nothing."""

    device = "cuda"
    rotating = staticmethod(rotating)
    time = staticmethod(time_ms)
    peak_memory_bytes = staticmethod(peak_memory_bytes)


def measure_copy_bandwidth_gbps(n_bytes=1 << 30):
    """Device-to-device copy: bytes read plus bytes written per second, in GB/s."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), itertools.repeat(()))["median"]
    return 2 * n_bytes / ms / 1e6


def measure_gemm_tflops(size=8192):
    """cuBLAS bf16 GEMM of size x size x size, in TFLOP/s."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(torch.matmul, itertools.repeat((a, b)))["median"]
    return 2 * size**3 / ms / 1e9


def _version(module):
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def _commit():
    """HEAD's hash; LOWRANK_COMMIT where the tree has no .git (a copy of a checkout, as a lent GPU
    machine gets), else None."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("LOWRANK_COMMIT")


def environment():
    """Device, driver, versions, commit and date: what makes a result comparable."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "device": {"name": props.name, "capability": f"{props.major}.{props.minor}",
                   "multiprocessors": props.multi_processor_count,
                   "memory_gib": round(props.total_memory / 2**30, 1),
                   "driver": torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version")
                   else None},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "cuda": torch.version.cuda, "triton": _version("triton"),
                     "bitsandbytes": _version("bitsandbytes"), "lowrank": _version("lowrank")},
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


REQUIRED = {"schema": int, "device": dict, "versions": dict, "commit": (str, type(None)),
            "date": str, "floors": dict, "cases": list}
REQUIRED_CASE = {"op": str, "shape": list, "params": dict, "timings_ms": dict, "metrics": dict}
OPTIONAL_CASE = {"peak_memory_bytes": dict}


def validate(result):
    """Raise ValueError if ``result`` is not a result file this harness writes."""
    for key, kind in REQUIRED.items():
        if not isinstance(result.get(key), kind):
            raise ValueError(f"result: {key!r} missing or not {kind}")
    if result["schema"] != SCHEMA_VERSION:
        raise ValueError(f"result: schema {result['schema']} is not {SCHEMA_VERSION}")
    for field in ("copy_bandwidth_gbps", "bf16_gemm_tflops"):
        if not isinstance(result["floors"].get(field), (int, float)):
            raise ValueError(f"result: floors.{field} missing")
    for case in result["cases"]:
        for key, kind in REQUIRED_CASE.items():
            if not isinstance(case.get(key), kind):
                raise ValueError(f"result case: {key!r} missing or not {kind}")
        for key, kind in OPTIONAL_CASE.items():
            if key in case and not isinstance(case[key], kind):
                raise ValueError(f"result case: {key!r} is not {kind}")
        for name, timing in case["timings_ms"].items():
            if set(timing) != {"median", "p20", "p80"}:
                raise ValueError(f"result case {case['op']}: timing {name!r} needs median/p20/p80")


def write_result(result, directory=RESULTS_DIR):
    validate(result)
    directory.mkdir(parents=True, exist_ok=True)
    name = result["device"]["name"].replace(" ", "-")
    path = directory / f"{result['date'][:19].replace(':', '')}_{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
