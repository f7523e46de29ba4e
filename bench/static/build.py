"""Compile a captured launch for a GPU architecture on the CPU, and read what the compiler made:
registers, local memory (spills), shared memory, occupancy, and the hot loop's SASS.

Builds go to Triton's cache under ``CACHE`` (keyed by Triton on the kernel's source, its
specialization and options), and each build's reading to ``CACHE/records`` keyed the same way, so
a second run compiles and disassembles nothing that has not changed. ``LOWRANK_STATIC_CACHE``
moves the cache (default: .cache/static in the repository, git-ignored). Processes building at
once share the work: each build is locked while it compiles (``building``), so no two compile the
same kernel, and one that finds a build locked can build others first (``Busy``).
"""

import contextlib
import fcntl
import hashlib
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bench.static import sass
from bench.static.launches import specialize
from bench.static.limits import occupancy

CACHE = Path(os.environ.get("LOWRANK_STATIC_CACHE",
                            Path(__file__).resolve().parents[2] / ".cache" / "static"))
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
# Triton reads its cache folder when it compiles, so this holds for every build below.
os.environ.setdefault("TRITON_CACHE_DIR", str(CACHE / "triton"))
RECORD_VERSION = 7  # bumped when a record gains or changes a field: older ones are read again


def jsonable(value):
    return value if isinstance(value, (bool, int, float, str, type(None))) else str(value)


def tool(name, *args):
    return subprocess.run([str(BIN / name), *args], capture_output=True, text=True, check=True).stdout


class Busy(Exception):
    """Another process is compiling this build (``build`` without ``wait``)."""


@contextlib.contextmanager
def building(path, wait):
    """The lock file ``path`` held while a kernel compiles: parallel test workers, or a report run
    beside the tests, then compile each kernel once and read the other's build from the cache.
    One lock per compilation (``build``), so processes building the same launches in parallel
    split them. Raises ``Busy`` when the lock is taken and not ``wait``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise Busy(path.name) from None
        yield


def build_key(launch, arch, spec, disassemble):
    text = json.dumps([RECORD_VERSION, triton.__version__, launch.kernel.cache_key, arch, disassemble,
                       sorted(spec.signature.items()),
                       sorted((str(k), jsonable(v)) for k, v in spec.constexprs.items()),
                       sorted((str(k), v) for k, v in spec.attrs.items()),
                       sorted((k, jsonable(v)) for k, v in spec.options.items())])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def compile_key(launch, arch):
    """What one compilation of ``launch`` for ``arch`` is keyed by, its SASS read or not."""
    return build_key(launch, arch, specialize(launch, arch), None)


def weight_elements(constexprs, nf4):
    """NF4 weight elements one hot-loop iteration (GEMMs: a BLOCK_N x BLOCK_K tile) or one program
    (dequantize) decodes; None for the other kernels."""
    if not nf4:
        return None
    if "BLOCK_N" in constexprs and "BLOCK_K" in constexprs:
        return constexprs["BLOCK_N"] * constexprs["BLOCK_K"]
    if "BLOCK_BYTES" in constexprs:  # the dequantize kernel
        return 2 * constexprs["BLOCK_BYTES"]
    return None  # the merges: their per-element work is mostly requantization


def build(launch, arch, disassemble=True, wait=True):
    """The reading of ``launch`` compiled for sm_``arch`` (a dict, see ``read``). Without
    ``disassemble`` only resources are read (no SASS, so no hot loop or MMA kind). Without
    ``wait``, raises ``Busy`` instead of waiting for another process compiling the same kernel."""
    spec = specialize(launch, arch)
    key = build_key(launch, arch, spec, disassemble)
    path = CACHE / "records" / f"{launch.name}-sm{arch}-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    # One lock per compilation: its record with or without SASS alike, as Triton caches it.
    lock = CACHE / "locks" / f"{launch.name}-sm{arch}-{build_key(launch, arch, spec, None)}.lock"
    with building(lock, wait):
        if path.exists():  # built by the process that held the lock
            return json.loads(path.read_text())
        source = ASTSource(fn=launch.kernel, signature=spec.signature, constexprs=spec.constexprs,
                           attrs=spec.attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=spec.options)
        record = read(compiled, arch, spec, launch.kernel.arg_names, disassemble)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Renamed into place whole: a process that finds the record never reads half of it.
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as out:
            out.write(json.dumps(record))
        os.replace(out.name, path)
    return record


def build_all(launches, arch, disassemble=True, wait=True):
    """A record per launch (identical builds compiled once), with what the model needs of the
    launch itself: its case, grid, integer arguments, the bytes of the tensors it touches
    (``tensor_bytes``), and which of its launcher's configs it is (``config`` of ``configs``:
    autotuned when several). ``wait``: as for ``build``."""
    records = []
    for launch, touched in zip(launches, tensor_bytes(launches)):
        ints = {name: value for name, value in zip(launch.kernel.arg_names, launch.args)
                if isinstance(value, int) and not isinstance(value, bool)}
        ints.update(launch.model_ints)
        records.append({"case": launch.case, "kernel": launch.name, "grid": list(launch.grid),
                        "config": launch.config, "configs": launch.configs,
                        "ints": ints, "tensor_bytes": touched,
                        **build(launch, arch, disassemble, wait)})
    return records


def tensor_bytes(launches):
    """Per launch, the bytes of the tensors it touches, each once: their storages, but a grouped
    dX GEMM's dB partials (``row_tile_fractions``) only for the row tiles with rows, in that
    launch and in the later ones that read them (the partials' sum). ``launches`` hold their
    tensors, so no storage is freed and its address reused between two of them."""
    fractions, found = {}, []
    for launch in launches:
        fractions.update(row_tile_fractions(launch))
        tensors = {t.data_ptr(): t.untyped_storage().nbytes() * fractions.get(t.data_ptr(), 1.0)
                   for t in launch.args if isinstance(t, torch.Tensor)}
        found.append(sum(tensors.values()))
    return found


def row_tile_fractions(launch):
    """{address: fraction} for the per-row-tile buffer a launch writes: the grouped dX GEMM's dB
    partials (``_grouped_gemm_kernel`` with OUTPUT_GRAD, ``kernels/lora_grouped.grouped_grad_input``),
    allocated for the tile schedule's cdiv(rows, BLOCK_M) + E row tiles (an upper bound: the count
    is on the device), of which only the tiles with rows, E x cdiv(rows per expert, BLOCK_M) as
    ``model.working_ctas`` counts them (the launch's model_ints), write theirs and have them read.
    Empty for every other launch."""
    ints = launch.model_ints
    if (launch.name != "_grouped_gemm_kernel" or not launch.kwargs.get("OUTPUT_GRAD")
            or "experts" not in ints):
        return {}
    partials = dict(zip(launch.kernel.arg_names, launch.args))["grad_b_partial_ptr"]
    tiles = ints["experts"] * -(-ints["rows_per_expert"] // launch.kwargs["BLOCK_M"])
    return {partials.data_ptr(): min(1.0, tiles / partials.shape[0])}


def read(compiled, arch, spec, arg_names, disassemble):
    metadata = compiled.metadata
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = tool("cuobjdump", "-res-usage", cubin.name)
        listing = tool("nvdisasm", "-c", cubin.name) if disassemble else None
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    resources = dict(zip(("registers", "stack", "static_shared", "local"), map(int, found.groups())))
    shared = metadata.shared + resources["static_shared"]
    ctas, limiter = occupancy(arch, resources["registers"], metadata.num_warps, shared)
    constexprs = {name: jsonable(spec.constexprs[(i,)]) for i, name in enumerate(arg_names)
                  if (i,) in spec.constexprs}
    record = {"arch": arch, "num_warps": metadata.num_warps, "num_stages": metadata.num_stages,
              "enable_fp_fusion": spec.options.get("enable_fp_fusion"), **resources,
              "shared": shared, "ctas_per_sm": ctas, "occupancy_limiter": limiter,
              "constexprs": constexprs, "constant_ones": spec.constant_ones(),
              "signature": {k: v for k, v in spec.signature.items() if v != "constexpr"},
              "divisible_by_16": spec.divisible(arg_names)}
    if listing is not None:
        record.update(read_sass(listing, metadata.num_warps, constexprs))
    return record


def read_sass(listing, num_warps, constexprs):
    """MMA kind, spill instructions, and the hot loop: its mix per warp, the flops and bytes it
    moves and its table lookups' L1 wavefronts per CTA, and instructions per decoded NF4 weight element."""
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
                       "shared_bytes": shared_bytes,
                       "table_wavefronts": sass.table_wavefronts(loop, num_warps)}
    # Per thread: each of the CTA's threads runs the body once and decodes elements / threads.
    out["instructions_per_element"] = (len(body) * num_warps * 32 / elements) if elements else None
    return out
