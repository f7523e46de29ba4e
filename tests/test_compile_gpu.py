"""Every kernel, in every config its launcher may use, compiles for sm_80, sm_86, sm_89 and sm_90 and
fits the architecture's shared memory per block. Needs no GPU: Triton compiles to PTX and cubin on
the CPU. The interpreter alone would not show that a kernel compiles."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Shared memory a block may use (opt-in maximum), in bytes.
SHARED_MEMORY_PER_BLOCK = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
SCRIPT = Path(__file__).with_name("compile_kernels.py")


@pytest.mark.parametrize("arch", SHARED_MEMORY_PER_BLOCK, ids=lambda cc: f"sm_{cc}")
def test_every_kernel_compiles_for(arch):
    run = subprocess.run([sys.executable, str(SCRIPT), str(arch)], capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["unregistered"] == [], "kernels without COMPILE_CASES: add them to the registry"
    assert len(report["results"]) > 0
    failed = [f"{r['name']}: {r['error']}" for r in report["results"] if r["error"]]
    assert not failed, "\n".join(failed)
    limit = SHARED_MEMORY_PER_BLOCK[arch]
    too_big = [f"{r['name']}: {r['shared']} bytes > {limit}" for r in report["results"]
               if r["shared"] > limit]
    assert not too_big, "\n".join(too_big)
