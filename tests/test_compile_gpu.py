"""Every kernel, as its launcher launches it (specialized as Triton's JIT specializes it at run
time), compiles for sm_80, sm_86, sm_89 and sm_90, and passes the static gates of
``bench.static.gates``: within each architecture's shared memory and registers, no spills, two CTAs
per SM for the GEMMs on sm_89, wgmma for the large-M GEMMs on sm_90, and a ceiling on instructions
per decoded NF4 element. Needs no GPU: Triton compiles to cubin on the CPU, and the SASS is read
with the tools Triton bundles. Each gate is also shown to fail on a deliberately bad config.

An autotuned launch is built here with the first config of its list only: building every config
of every list for every launch covered would add minutes of CI. ``python -m bench.static`` builds
them all on the benchmark shapes, and tests/test_static_report.py holds its committed report to
the same gates.

Each architecture's builds are checked in ``PARTS`` test items (minutes of CPU each otherwise), so
that parallel test workers share them to the end; the other tests read them from the cache."""

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.static import gates
from bench.static.limits import ARCHS

SCRIPT = Path(__file__).with_name("compile_kernels.py")
PARTS = 4


def compile_report(arch, *options):
    run = subprocess.run([sys.executable, str(SCRIPT), str(arch), *options], capture_output=True,
                         text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


# The parts of the builds this process checked: {(arch, part): their report}.
PART_REPORTS = {}


@functools.cache
def report(arch):
    """Every launch built for ``arch``: the parts this process checked, if it checked them all,
    else read by a new process (from the cache on disk, built by whichever worker built them)."""
    parts = [PART_REPORTS.get((arch, part)) for part in range(PARTS)]
    if None in parts:
        return compile_report(arch)
    return {kind: [r for found in parts for r in found[kind]] for kind in ("coverage", "bench")}


def records(arch):
    return report(arch)["coverage"] + report(arch)["bench"]


@pytest.mark.parametrize("arch,part", [
    pytest.param(arch, part, id=f"sm_{arch}-part{part + 1}of{PARTS}")
    for arch in ARCHS for part in range(PARTS)])
def test_every_kernel_compiles_within_limits_for(arch, part):
    found = PART_REPORTS[arch, part] = compile_report(arch, "--shard", str(part), str(PARTS))
    assert found["unlaunched"] == [], \
        "kernels no launch reaches: add their launcher's calls to bench.static.launches"
    assert not found["failed"], "\n".join(found["failed"])
    assert len(found["coverage"]) > 0 and len(found["bench"]) > 0
    built = found["coverage"] + found["bench"]
    assert not gates.resources(built), "\n".join(gates.resources(built))


def test_a_build_compiling_elsewhere_is_busy_until_done(tmp_path):
    """The lock a build holds while it compiles: another holder is told ``Busy`` (and builds
    something else first) unless it waits."""
    from bench.static import build

    lock = tmp_path / "kernel.lock"
    with build.building(lock, wait=True):
        with pytest.raises(build.Busy), build.building(lock, wait=False):
            pass
    with build.building(lock, wait=False):
        pass


def test_the_parts_deal_out_every_build_once(monkeypatch):
    """Every launch is in exactly one part, with every other launch of the same compilation."""
    import os

    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))  # popped below
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import compile_kernels
    finally:
        sys.path.remove(str(SCRIPT.parent))
    from bench.static import build

    monkeypatch.setattr(build, "compile_key", lambda launch, arch: launch.split(":")[0])
    jobs = [("coverage", f"k{i % 7}:{i}", False) for i in range(30)]
    jobs += [("bench", f"k{i % 5}:bench{i}", True) for i in range(12)]
    parts = [compile_kernels.shard(jobs, 90, part, PARTS) for part in range(PARTS)]
    assert sorted(job for found in parts for job in found) == sorted(jobs)
    assert all(found for found in parts)
    for found in parts:
        assert all(job in found for job in jobs if job[1].split(":")[0] == found[0][1].split(":")[0])


def spilling_today(record):
    """The GEMMs that spill on main at c30119f (triton 3.9): on fp32 operands (IEEE fp32 tl.dot
    runs on the FMA units, and a 64-row fp32 tile per 4 warps needs more than 255 registers), and
    bf16 on ragged shapes (a size not divisible by 16, so no vector loads: more registers go to
    masks and addresses). The gate holds every other launch to no spills; the strict xfail below
    fails once these stop spilling, so the exception is removed then."""
    operands = {record["signature"].get(name) for name in ("x_ptr", "dy_ptr", "y_ptr")}
    sizes = [record["ints"][d] for d in ("M", "N", "K") if d in record["ints"]]
    ragged = any(size != 1 and size % 16 for size in sizes)
    # And on sm_90 the decode kernel with fp32 adapters of a 16-bit x (its shrink in IEEE fp32):
    # 8 bytes of stack, a thread-index value ptxas keeps across the shrink (with the base GEMM
    # before the shrink it spilled on sm_80 to 89 instead, and on sm_90 too after the cheaper
    # NF4 lookup).
    fp32_branch_decode = (record["kernel"] == "_lora_decode_kernel" and record["arch"] == 90
                          and record["signature"].get("a_ptr") == "*fp32")
    return gates.is_gemm(record) and ("*fp32" in operands or ragged or fp32_branch_decode)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda cc: f"sm_{cc}")
def test_no_spills_for(arch):
    failures = gates.spills([r for r in records(arch) if not spilling_today(r)])
    assert not failures, "\n".join(failures)


@pytest.mark.xfail(strict=True, reason="fp32 GEMMs and ragged-shape bf16 GEMMs spill today "
                   "(see spilling_today); fix them, then remove this mark and that exception")
@pytest.mark.parametrize("arch", (89, 90), ids=lambda cc: f"sm_{cc}")
def test_fp32_and_ragged_gemms_do_not_spill_for(arch):
    failures = gates.spills([r for r in records(arch) if spilling_today(r)])
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda cc: f"sm_{cc}")
def test_static_shared_memory_launches_without_opt_in_for(arch):
    failures = gates.launch_without_opt_in(records(arch))
    assert not failures, "\n".join(failures)


def test_the_launch_gate_holds_static_shared_memory_to_48_kb_without_opt_in():
    """Static + dynamic within 48 KB while the dynamic part is at most 48 KB (Triton's launcher
    opts in only above that); without static shared memory the gate has nothing to hold. sm_90's
    reserved 1 KB (gates.RESERVED_STATIC_SHARED) is not the kernel's: only what is beyond it."""
    record = {"case": "c", "kernel": "k", "arch": 89, "static_shared": 1024}
    assert gates.launch_without_opt_in([{**record, "shared": 48 * 1024 + 16}])
    assert not gates.launch_without_opt_in([{**record, "shared": 48 * 1024}])
    assert not gates.launch_without_opt_in([{**record, "shared": 49 * 1024 + 16}])  # opted in
    assert not gates.launch_without_opt_in([{**record, "static_shared": 0, "shared": 96 * 1024}])
    reserve_only = {**record, "arch": 90, "shared": 49 * 1024}
    assert not gates.launch_without_opt_in([reserve_only])
    assert gates.launch_without_opt_in([{**reserve_only, "static_shared": 2048,
                                         "shared": 50 * 1024}])  # the NF4 codes' 1 KB beyond it


def test_dense_gemms_fit_two_ctas_per_sm_on_sm89():
    failures = gates.two_ctas_per_sm([r for r in records(89) if not r["constexprs"].get("NF4")])
    assert not failures, "\n".join(failures)


def test_nf4_gemms_fit_two_ctas_per_sm_on_sm89():
    failures = gates.two_ctas_per_sm([r for r in records(89) if r["constexprs"].get("NF4")])
    assert not failures, "\n".join(failures)


def test_large_m_gemms_use_wgmma_on_sm90():
    assert not gates.wgmma(report(90)["bench"]), "\n".join(gates.wgmma(report(90)["bench"]))


@pytest.mark.parametrize("arch", (89, 90), ids=lambda cc: f"sm_{cc}")
def test_nf4_instructions_per_element_under_ceiling_for(arch):
    bench = report(arch)["bench"]
    assert any(r["instructions_per_element"] for r in bench)
    assert not gates.nf4_instructions(bench), "\n".join(gates.nf4_instructions(bench))


# Each gate against a config made bad on purpose: gate -> (arch, launcher config replaced, the
# config, the benchmark cases built with it).
FORWARD = "lora_linear.forward_configs"
BAD_CONFIGS = {
    "resources": (89, FORWARD, {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8,
                                "num_warps": 4, "num_stages": 6}, "lora_linear_forward dense"),
    "spills": (89, FORWARD, {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8,
                             "num_warps": 1, "num_stages": 1}, "lora_linear_forward dense"),
    "two_ctas_per_sm": (89, FORWARD, {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8,
                                      "num_warps": 4, "num_stages": 3}, "lora_linear_forward dense"),
    # Two warps: less than a warpgroup, so mma.sync although the tile has 64 rows.
    "wgmma": (90, FORWARD, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8,
                            "num_warps": 2, "num_stages": 3}, "lora_linear_forward dense"),
    "nf4_instructions": (90, FORWARD, {"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 8,
                                       "num_warps": 4, "num_stages": 3},
                         "lora_linear_forward nf4-nested"),
}


@functools.cache
def bad_builds(arch):
    """The bad configs' forward kernels built for ``arch``, one process for all: {gate: records}."""
    gates_here = [gate for gate, (gate_arch, *_) in BAD_CONFIGS.items() if gate_arch == arch]
    options = [arg for gate in gates_here
               for arg in ("--variant", BAD_CONFIGS[gate][1], json.dumps(BAD_CONFIGS[gate][2]),
                           BAD_CONFIGS[gate][3])]
    found = compile_report(arch, *options)
    assert not found["failed"], "\n".join(found["failed"])
    return {gate: [r for r in found["bench"] if r["case"].startswith(f"variant {i}:")
                   and r["kernel"] == "_lora_forward_kernel"] for i, gate in enumerate(gates_here)}


@pytest.mark.parametrize("gate", BAD_CONFIGS)
def test_gate_fails_on_a_bad_config(gate):
    built = bad_builds(BAD_CONFIGS[gate][0])[gate]
    assert built, "the bad config's forward kernel was not built"
    assert getattr(gates, gate)(built), f"gate {gate} passed a config made to fail it"
