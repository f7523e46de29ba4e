"""Compile a captured launch for a GPU architecture on the CPU, and read what the compiler made:
registers, local memory (spills), shared memory, occupancy, and the hot loop's SASS.

Builds go to Triton's cache under ``CACHE`` (keyed by Triton on the kernel's source, its
specialization and options), and each build's reading to ``CACHE/records`` keyed the same way, so
a second run compiles and disassembles nothing that has not changed. ``LOWRANK_STATIC_CACHE``
moves the cache (default: .cache/static in the repository, git-ignored).
"""

import hashlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bench.static import sass
from bench.static.launches import specialize

CACHE = Path(os.environ.get("LOWRANK_STATIC_CACHE",
                            Path(__file__).resolve().parents[2] / ".cache" / "static"))
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@dataclass(frozen=True)
class Arch:
    """Per-SM limits of a compute capability (CUDA C++ Programming Guide, its compute capability
    table): shared memory per SM and the most one block may opt in to, warps and blocks per SM."""

    shared_per_sm: int
    shared_per_block: int
    max_warps: int
    max_ctas: int
    registers: int = 65536
    max_registers_per_thread: int = 255
    reserved_shared_per_cta: int = 1024  # the driver's, on sm_80 and later


ARCHS = {80: Arch(164 * 1024, 163 * 1024, 64, 32), 86: Arch(100 * 1024, 99 * 1024, 48, 16),
         89: Arch(100 * 1024, 99 * 1024, 48, 24), 90: Arch(228 * 1024, 227 * 1024, 64, 32)}


def occupancy(arch, registers, num_warps, shared):
    """(CTAs resident per SM, what limits them: "registers", "shared", "warps" or "blocks")."""
    limits = ARCHS[arch]
    per_warp = -(-registers * 32 // 256) * 256  # registers are allocated per warp, 256 at a time
    bounds = {"registers": limits.registers // max(1, per_warp * num_warps),
              "shared": limits.shared_per_sm // (shared + limits.reserved_shared_per_cta),
              "warps": limits.max_warps // num_warps, "blocks": limits.max_ctas}
    limiter = min(bounds, key=bounds.get)
    return bounds[limiter], limiter


def jsonable(value):
    return value if isinstance(value, (bool, int, float, str, type(None))) else str(value)


def tool(name, *args):
    return subprocess.run([str(BIN / name), *args], capture_output=True, text=True, check=True).stdout


def build_key(launch, arch, spec, disassemble):
    text = json.dumps([triton.__version__, launch.kernel.cache_key, arch, disassemble,
                       sorted(spec.signature.items()),
                       sorted((str(k), jsonable(v)) for k, v in spec.constexprs.items()),
                       sorted((str(k), v) for k, v in spec.attrs.items()),
                       sorted((k, jsonable(v)) for k, v in spec.options.items())])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def weight_elements(constexprs, nf4):
    """Weight elements one hot-loop iteration (GEMMs: a BLOCK_N x BLOCK_K tile) or one program
    (the element-wise kernels) decodes; None when it decodes no NF4."""
    if not nf4:
        return None
    if "BLOCK_N" in constexprs and "BLOCK_K" in constexprs:
        return constexprs["BLOCK_N"] * constexprs["BLOCK_K"]
    if "BLOCK_BYTES" in constexprs:
        return 2 * constexprs["BLOCK_BYTES"]
    return constexprs.get("BLOCK")


def build(launch, arch, disassemble=True):
    """The reading of ``launch`` compiled for sm_``arch`` (a dict, see ``read``). Without
    ``disassemble`` only resources are read (no SASS, so no hot loop or MMA kind)."""
    spec = specialize(launch, arch)
    path = CACHE / "records" / f"{launch.name}-sm{arch}-{build_key(launch, arch, spec, disassemble)}.json"
    if path.exists():
        return json.loads(path.read_text())
    source = ASTSource(fn=launch.kernel, signature=spec.signature, constexprs=spec.constexprs,
                       attrs=spec.attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=spec.options)
    record = read(compiled, arch, spec, launch.kernel.arg_names, disassemble)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return record


def read(compiled, arch, spec, arg_names, disassemble):
    metadata = compiled.metadata
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = tool("cuobjdump", "-res-usage", cubin.name)
        listing = tool("nvdisasm", "-c", cubin.name) if disassemble else None
    resources = dict(zip(("registers", "stack", "static_shared", "local"),
                         map(int, re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage).groups())))
    shared = metadata.shared + resources["static_shared"]
    ctas, limiter = occupancy(arch, resources["registers"], metadata.num_warps, shared)
    constexprs = {name: jsonable(spec.constexprs[(i,)]) for i, name in enumerate(arg_names)
                  if (i,) in spec.constexprs}
    record = {"arch": arch, "num_warps": metadata.num_warps, "num_stages": metadata.num_stages,
              "enable_fp_fusion": spec.options.get("enable_fp_fusion"), **resources,
              "shared": shared, "ctas_per_sm": ctas, "occupancy_limiter": limiter,
              "constexprs": constexprs, "constant_ones": spec.constant_ones(),
              "divisible_by_16": spec.divisible(arg_names)}
    if listing is not None:
        record.update(read_sass(listing, metadata.num_warps, constexprs))
    return record


def read_sass(listing, num_warps, constexprs):
    """MMA kind, spill instructions, and the hot loop: its mix per warp, the flops and bytes it
    moves per CTA, and instructions per decoded NF4 weight element."""
    everything = sass.instructions(listing)
    loop = sass.hot_loop(listing)
    nf4 = bool(constexprs.get("NF4")) or "BLOCK_BYTES" in constexprs
    elements = weight_elements(constexprs, nf4)
    gemm = "BLOCK_N" in constexprs and "BLOCK_K" in constexprs
    body = loop if gemm and loop is not None else everything  # element-wise: per program
    out = {"mma": sass.mma_kind(everything), "instructions": len(everything),
           "spill_instructions": sum(op in ("STL", "LDL") for op, _, _ in everything),
           "weight_elements": elements, "loop": None}
    if loop is not None:
        global_bytes, shared_bytes = sass.memory_bytes(loop, num_warps)
        out["loop"] = {"instructions": len(loop), "mma": sass.mma_kind(loop), "mix": sass.mix(loop),
                       "flops": sass.mma_flops(loop, num_warps), "global_bytes": global_bytes,
                       "shared_bytes": shared_bytes}
    # Per thread: each of the CTA's threads runs the body once and decodes elements / threads.
    out["instructions_per_element"] = (len(body) * num_warps * 32 / elements) if elements else None
    return out
