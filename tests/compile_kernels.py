"""Compile every registered kernel config for one GPU architecture, on a machine without a GPU.

    python tests/compile_kernels.py 90      # prints one JSON object

Run as its own process because Triton's interpreter (TRITON_INTERPRET=1, which the test session
uses) replaces ``@triton.jit`` kernels with interpreted ones that cannot be compiled. Each kernel
module lists its launch configs in ``COMPILE_CASES``; a ``*_kernel`` that no case names is reported
as unregistered, so a new kernel cannot skip this check.
"""

import importlib
import json
import os
import pkgutil
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import lowrank.kernels  # noqa: E402


def kernel_modules():
    for info in pkgutil.iter_modules(lowrank.kernels.__path__):
        yield importlib.import_module(f"lowrank.kernels.{info.name}")


def main(arch):
    cases, kernels = [], set()
    for module in kernel_modules():
        cases += getattr(module, "COMPILE_CASES", [])
        kernels |= {f"{module.__name__}.{name}" for name, obj in vars(module).items()
                    if isinstance(obj, JITFunction) and name.endswith("_kernel")
                    and obj.fn.__module__ == module.__name__}
    registered = {f"{case.kernel.fn.__module__}.{case.kernel.fn.__name__}" for case in cases}
    results = []
    target = GPUTarget("cuda", arch, 32)
    for case in cases:
        try:
            # In the kernel's argument order, which older Triton versions rely on.
            signature = {name: case.signature[name] for name in case.kernel.arg_names}
            source = ASTSource(fn=case.kernel, signature=signature, constexprs=case.constexprs)
            compiled = triton.compile(source, target=target, options=case.options)
            results.append({"name": case.name, "shared": compiled.metadata.shared, "error": None})
        except Exception as error:  # reported per case, with the compiler's message
            results.append({"name": case.name, "shared": None, "error": f"{type(error).__name__}: {error}"})
    print(json.dumps({"arch": arch, "triton": triton.__version__, "results": results,
                      "unregistered": sorted(kernels - registered)}))


if __name__ == "__main__":
    main(int(sys.argv[1]))
