"""Every kernel compiles for AMD's gfx942 (MI300X) with Triton's HIP backend, on the CPU: one
launch per kernel and weight kind, specialized as Triton's JIT would specialize it on a ROCm build
(the launchers choose as they do there: no inline PTX, ``torch.version.hip`` set). The inline PTX
paths have portable ``tl.load`` twins; this holds them to compiling where PTX cannot run. Every
distinct build of the compile coverage (about 350) takes ~3 minutes on 2 cores, too long for CI:
one launch per kernel and weight kind is sampled. Run as its own process, as
``tests/compile_kernels.py`` is (why: its docstring)."""

import os
import subprocess
import sys
from pathlib import Path


def test_every_kernel_compiles_for_gfx942():
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert "kernels built for gfx942" in run.stdout


def weight_kind(case):
    return next((kind for kind in ("nf4-nested", "nf4", "dense") if kind in case.split()), "")


def main():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: bench
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from bench.static import launches
    from lowrank.kernels._common import Target

    torch.version.hip = "6.4"  # the launchers choose as on a ROCm build of torch
    gfx942 = GPUTarget("hip", "gfx942", 64)
    backend = make_backend(gfx942)
    sampled, failed = {}, []
    for launch in launches.coverage_launches(Target(94, 304, inline_ptx=False), every_config=False):
        sampled.setdefault((launch.name, weight_kind(launch.case)), launch)
    for (name, kind), launch in sampled.items():
        kernel = launch.kernel
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        kwargs = {**launch.kwargs, "debug": launch.kwargs.get("debug", kernel.debug) or False}
        bound, specialization, options = binder(*launch.args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound,
                                                                  specialization, options)
        try:
            triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                                     attrs=attrs), target=gfx942, options=options.__dict__)
        except Exception as error:  # every failure listed, not only the first
            failed.append(f"{name} ({launch.case}): {str(error)[-400:]}")
    print("\n".join(failed))
    kernels = {name for name, _ in sampled}
    print(f"{len(sampled) - len(failed)} of {len(sampled)} builds ({len(kernels)} kernels built for gfx942)")
    sys.exit(1 if failed or len(kernels) < 20 else 0)


if __name__ == "__main__":
    main()
