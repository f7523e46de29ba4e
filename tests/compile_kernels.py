"""Compile every kernel as its launcher launches it, for one GPU architecture, on a machine without
a GPU, and print one JSON object of what the compiler made of each.

    python tests/compile_kernels.py 90      # every launch (bench.static.launches), an
        # autotuned launch with the first config of its list only (its representative: CI time)
    python tests/compile_kernels.py 90 --shard 0 4
        # a quarter of those builds (the first of 4 parts), so that test workers share them
    python tests/compile_kernels.py 80 86 89 90 --list-configs
        # builds nothing: the configs the benchmark launches take, every config of every list
        # (tests/test_static_report.py checks the committed static report built them all)
    python tests/compile_kernels.py 90 --variant lora_linear.forward_configs '{"BLOCK_M": 16, ...}' \\
        "lora_linear_forward dense" [--variant ...]
        # only the benchmark cases starting with "lora_linear_forward dense", with a launcher's
        # config function answering that config: the bad configs that show each gate can fail

Run as its own process because Triton's interpreter (TRITON_INTERPRET=1, which the test session
uses) replaces ``@triton.jit`` kernels with interpreted ones that cannot be compiled. The launches
are captured from the real launchers (``bench.static.launches``) and specialized by Triton's JIT
binder, so what is built is what runs. A ``*_kernel`` that no launch reaches is reported as
unlaunched, so a new kernel cannot skip this check. Each build is
``triton.compile(..., target=GPUTarget("cuda", arch, 32))`` in ``bench.static.build``, for sm_80,
sm_86, sm_89 and sm_90 (``tests/test_compile_gpu.py``). Builds are cached and locked one by one
(``bench.static.build``), so parallel test workers share them: a process leaves the builds another
is compiling for last, then reads them from the cache.
"""

import argparse
import contextlib
import importlib
import json
import os
import pkgutil
import sys
from pathlib import Path
from unittest import mock

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: bench

from triton.runtime.jit import JITFunction  # noqa: E402

import lowrank.kernels  # noqa: E402
from bench.static import build, launches  # noqa: E402

# The builds the gates read SASS from; the other architectures are checked on resources only.
DISASSEMBLE = (89, 90)


def all_kernels():
    names = set()
    for info in pkgutil.iter_modules(lowrank.kernels.__path__):
        module = importlib.import_module(f"lowrank.kernels.{info.name}")
        names |= {name for name, obj in vars(module).items() if isinstance(obj, JITFunction)
                  and name.endswith("_kernel") and obj.fn.__module__ == module.__name__}
    return names


@contextlib.contextmanager
def replaced_config(function, config):
    """A launcher's config function (``module.name``) answering ``config`` inside the block."""
    module_name, attribute = function.rsplit(".", 1)
    module = importlib.import_module(f"lowrank.kernels.{module_name}")
    with mock.patch.object(module, attribute, lambda *args: [dict(config)]):
        yield


def variant_launches(variants, target):
    """The benchmark launches of each (config function, config JSON, case prefix) for ``target``,
    cases renamed "variant I: case"."""
    found = []
    for i, (function, config, prefix) in enumerate(variants):
        calls = {f"variant {i}: {case}": call for case, call in launches.bench_calls().items()
                 if case.startswith(prefix)}
        with replaced_config(function, json.loads(config)):
            found += launches.run_calls(calls, target)
    return found


def shard(jobs, arch, part, parts):
    """The ``part``-th of ``parts`` shares of ``jobs`` ((kind, launch, read SASS)): the distinct
    compilations dealt out in turn, each with every launch that compiles the same kernel, so that
    no compilation is in two shares."""
    keys = [build.compile_key(launch, arch) for _, launch, _ in jobs]
    turn = {key: i % parts for i, key in enumerate(dict.fromkeys(keys))}
    return [job for job, key in zip(jobs, keys) if turn[key] == part]


def build_jobs(jobs, arch):
    """{kind: records} of ``jobs`` ((kind, launch, read SASS)) in order, and the launches that
    failed to build with the compiler's message. A build another process is compiling is left for
    a second pass, which waits for it: by then it is usually in the cache."""
    built, failed = {}, []
    for wait in (False, True):
        for index, (kind, launch, read_sass) in enumerate(jobs):
            if index in built:
                continue
            try:
                built[index] = build.build_all([launch], arch, read_sass, wait)
            except build.Busy:
                continue
            except Exception as error:  # reported per launch, with the compiler's message
                built[index] = []
                failed.append(f"{launch.case} {launch.name}: {type(error).__name__}: {error}")
    records = {"coverage": [], "bench": []}
    for index, (kind, _, _) in enumerate(jobs):
        records[kind] += built[index]
    return records, failed


def config_of(launch):
    """What identifies a launch's config in a build record: case, kernel, its index in the list,
    the list's length, the BLOCK_* constexprs and the launch options."""
    options = {k: v for k, v in launch.kwargs.items()
               if k.startswith("BLOCK_") or k in ("num_warps", "num_stages")}
    return [launch.case, launch.name, launch.config, launch.configs, options]


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("archs", type=int, nargs="+")
    parser.add_argument("--variant", nargs=3, action="append",
                        metavar=("MODULE.FUNCTION", "JSON", "CASES"))
    parser.add_argument("--list-configs", action="store_true")
    parser.add_argument("--shard", nargs=2, type=int, metavar=("PART", "PARTS"))
    args = parser.parse_args(argv)
    if args.list_configs:
        print(json.dumps({arch: [config_of(launch) for launch in launches.bench_launches(
            launches.gpu(arch))] for arch in args.archs}))
        return
    if len(args.archs) != 1:
        parser.error("builds are for one architecture at a time")
    args.arch = args.archs[0]
    disassemble = args.arch in DISASSEMBLE
    target = launches.gpu(args.arch)
    if args.variant:
        coverage, bench = [], variant_launches(args.variant, target)
    else:
        coverage = launches.coverage_launches(target, every_config=False)
        bench = launches.bench_launches(target, every_config=False)
    jobs = [("coverage", launch, False) for launch in coverage]
    jobs += [("bench", launch, disassemble) for launch in bench]
    if args.shard:
        jobs = shard(jobs, args.arch, *args.shard)
    records, failed = build_jobs(jobs, args.arch)
    launched = {launch.name for launch in coverage + bench}
    print(json.dumps({"arch": args.arch, "failed": failed, **records,
                      "unlaunched": [] if args.variant else sorted(all_kernels() - launched)}))


if __name__ == "__main__":
    main()
