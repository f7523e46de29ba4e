"""Compile every kernel as its launcher launches it, for one GPU architecture, on a machine without
a GPU, and print one JSON object of what the compiler made of each.

    python tests/compile_kernels.py 90      # every launch (bench.static.launches), an
        # autotuned launch with the first config of its list only (its representative: CI time)
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
sm_86, sm_89 and sm_90 (``tests/test_compile_gpu.py``). Builds are cached, one process per
architecture at a time, so parallel test workers share them.
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
    failed, records = [], {"coverage": [], "bench": []}
    with build.locked(args.arch):
        for kind, found, read_sass in (("coverage", coverage, False), ("bench", bench, disassemble)):
            for launch in found:
                try:
                    records[kind] += build.build_all([launch], args.arch, read_sass)
                except Exception as error:  # reported per launch, with the compiler's message
                    failed.append(f"{launch.case} {launch.name}: {type(error).__name__}: {error}")
    launched = {launch.name for launch in coverage + bench}
    print(json.dumps({"arch": args.arch, "failed": failed, **records,
                      "unlaunched": [] if args.variant else sorted(all_kernels() - launched)}))


if __name__ == "__main__":
    main()
