"""Which way a linear op runs, chosen per call: the routes, the default rule, calibration.

Each LoRA / IA3 linear GEMM over the frozen weight (forward, and dX in backward) has routes:

- ``fused``: the fused kernels (``kernels/lora_linear.py``, ``kernels/ia3_linear.py``), NF4
  decoded in registers inside the GEMM.
- ``cublas``: the NF4 weight dequantized (``kernels/nf4_dequantize.py``) into a per-device
  workspace in x's dtype, reused from call to call, then torch's matmul (cuBLAS on a GPU) in x's
  dtype; a dense weight is used as it is. The adapter's part is one more GEMM accumulated into the
  output (``addmm_``), or, where that moves fewer bytes, folded into the frozen GEMM: the forward's
  [x | S] [W | sB]^T (``weight_beside``), dX's [dY | dS] [W ; A] (``stacked_weight``); see
  ``lowrank.ops.lora``. See ``dense_weight``.
- ``decode``: the split-K kernel (``kernels/lora_linear_decode.py``), for a forward of at most
  ``DECODE_MAX_M`` rows (the IA3 forward runs it with a zero adapter). dX has no decode route.

The choice is keyed by ``key``: (op, GPU architecture, M bucket, K, N, dtype, weight kind). It is,
in this order:

1. ``LOWRANK_ROUTE=fused|cublas|decode`` (or ``forced(route)`` in code), where the call has that
   route; a call without a decode route runs ``fused`` under ``decode``.
2. On CUDA with calibration on (``LOWRANK_CALIBRATE``, default ``1``): the route cached for the
   key, or, the first time a key is seen, the fastest candidate timed on that call's own inputs
   with CUDA events after warm-up (``cuda_event_timer``), written to the cache on disk.
3. Otherwise (calibration off, Triton's interpreter, or CUDA graph capture, where nothing may be
   timed): ``default_route``, the rule documented there.

Decisions are made inside the ops' custom ops, so they hold under torch.compile (the ops are
opaque to it) and are deterministic given the cache file. The cache is one JSON file per
fingerprint (GPU name, driver, torch, triton and lowrank versions) in ``cache_dir()``:
``$LOWRANK_CACHE_DIR``, else ``$XDG_CACHE_HOME/lowrank``, else ``~/.cache/lowrank``.
"""

import contextlib
import ctypes
import functools
import hashlib
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch
import triton

from lowrank.kernels import nf4_dequantize as nf4_dequantize_kernel
from lowrank.kernels.lora_linear_decode import DECODE_MAX_M

ROUTES = ("fused", "cublas", "decode")
ROUTE_ENV, CALIBRATE_ENV, CACHE_ENV = "LOWRANK_ROUTE", "LOWRANK_CALIBRATE", "LOWRANK_CACHE_DIR"
CACHE_FORMAT = 1

# The default rule (``default_route``): up to these M buckets the fused kernels, above them
# dequantize + cuBLAS, per architecture group, step (the forward; the backward's dX) and weight
# kind. ESTIMATES of the static model (BENCHMARKS.md, "Model estimates", not measurements),
# derived by ``bench.static.route_table`` from the newest bench/results/static-*.json:
# first-order crossovers of the LoRA forward and backward at K = 4096, N = 14336, the fused
# route's time taken per row of M, the cublas route's as one dequantize pass plus its time per
# row. Each step has its own bound (the ops tell ``default_route`` which step they run), as a
# calibrated table keys each step apart. H100 (sm_90), with the transposed 256-row wgmma tiles
# (the decoded weight wgmma's register operand, decoded straight into its register layout in the
# forward), the codes in shared memory and x's loads without row masks: fused forward 651 us at
# 4096 rows for NF4 and 673 nested, fused dX 653 / 653 (the packed words and absmax loaded a step
# ahead into registers); cublas forward 666 after a dequantize of 50 us, dX 653 after 50: the NF4
# forward fused at every M (its time per row under cublas's), the nested one up to about 30349
# rows; backward crossovers at about 244898 / 240443 rows; none for dense (cuBLAS always
# faster). RTX 4090
# (sm_89): fused 0.72 per row for NF4, nested and dense (2953 us, the tensor-core limit); cublas
# 0.80 after 168 us: fused always faster.
# Rounded down to the power-of-two buckets. tests/test_routes.py checks the table equals what
# the committed report implies; when it fails, ``python -m bench.static.route_table`` prints
# the new table and crossovers for here. Calibration replaces them on the user's GPU.
STEPS = ("forward", "backward")
FUSED_MAX_M = {
    "sm_90": {"forward": {"dense": 0, "nf4": None, "nf4-nested": None},
              "backward": {"dense": 0, "nf4": 131072, "nf4-nested": 131072}},
    "sm_89": {step: {"dense": None, "nf4": None, "nf4-nested": None}  # None: no bound
              for step in STEPS},
}


def route_error(value, where):
    """The error for ``value``, given as ``where``, that is not one of ROUTES."""
    return ValueError(f"lowrank: {where}={value!r} is not a route; use one of {', '.join(ROUTES)}")


_forced = None  # what ``forced`` sets: process-wide, as the variable is


@contextlib.contextmanager
def forced(route):
    """Force ``route`` for the calls made inside the block, as ``LOWRANK_ROUTE`` does for a
    process, and over it. Process-wide, not per thread: autograd runs a GPU backward on threads of
    its own, and the block's backward must see it too. ``None`` lifts a force."""
    global _forced
    if route is not None and route not in ROUTES:
        raise route_error(route, "forced")
    before, _forced = _forced, route
    try:
        yield
    finally:
        _forced = before


def forced_route():
    """The route forced by ``forced`` or ``LOWRANK_ROUTE``, or None; an unknown value is an error."""
    if _forced is not None:
        return _forced
    value = os.environ.get(ROUTE_ENV, "")
    if value == "":
        return None
    if value not in ROUTES:
        raise route_error(value, ROUTE_ENV)
    return value


def calibration_on():
    """``LOWRANK_CALIBRATE``: 1 (the default) or 0; any other value is an error."""
    value = os.environ.get(CALIBRATE_ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"lowrank: {CALIBRATE_ENV}={value!r}; use 1 (time the routes on this GPU, "
                         "the default) or 0 (the default rule)")
    return value == "1"


@functools.lru_cache(maxsize=None)
def architecture(device):
    """'sm_90', 'gfx942', ... for a GPU; 'interpreter' for CPU tensors (Triton's interpreter)."""
    if device.type != "cuda":
        return "interpreter"
    properties = torch.cuda.get_device_properties(device)
    if torch.version.hip:
        return properties.gcnArchName.split(":")[0]
    return f"sm_{properties.major}{properties.minor}"


# A call's candidates must be the same for every M of its bucket (see ``m_bucket``).
if DECODE_MAX_M & (DECODE_MAX_M - 1):
    raise ImportError(f"lowrank.routes: DECODE_MAX_M = {DECODE_MAX_M} must be a power of two, the "
                      "bound of an M bucket")


def m_bucket(m):
    """The power of two at or above ``m``: calls whose M share it share a route. Buckets never
    straddle ``DECODE_MAX_M`` (a power of two), so a bucket has a decode route for all its M or
    for none."""
    return 1 << max(0, m - 1).bit_length()


def weight_kind(weight):
    """'dense', 'nf4' or 'nf4-nested' for a ``FrozenWeight``."""
    if weight.nf4 is None:
        return "dense"
    return "nf4" if weight.nested_code is None else "nf4-nested"


def key(op, device, m, k, n, dtype, kind):
    """The route table's key, as a string (the cache file's JSON keys): the op (with its form),
    the architecture of ``device`` (a torch.device), M's bucket, K, N, the dtype and the weight
    kind."""
    return "|".join((op, architecture(device), f"m{m_bucket(m)}", f"k{k}", f"n{n}",
                     str(dtype).removeprefix("torch."), kind))


def _architecture_group(arch):
    """The FUSED_MAX_M row of an architecture: NVIDIA GPUs below sm_90 (mma.sync, as sm_89) or
    the rest (sm_90 and newer, and GPUs the static model has no row for: dequantize + BLAS is the
    route whose worst case is known)."""
    if arch.startswith("sm_") and int(arch[3:]) < 90:
        return "sm_89"
    return "sm_90"


def default_route(arch, m, kind, step, candidates):
    """The route without calibration, for a call of ``m`` rows of ``step`` ("forward", or
    "backward": dX) whose op offers ``candidates``: decode where the call has it (a forward,
    M <= DECODE_MAX_M); in the interpreter fused (the kernels are what it checks); on a GPU
    fused while M's bucket is within ``FUSED_MAX_M`` of its architecture group, step and weight
    kind, else cublas."""
    if step not in STEPS:
        raise ValueError(f"lowrank.routes: step={step!r}; use one of {', '.join(STEPS)}")
    if "decode" in candidates:
        return "decode"
    if arch == "interpreter":
        return "fused"
    bound = FUSED_MAX_M[_architecture_group(arch)][step][kind]
    return "fused" if bound is None or m_bucket(m) <= bound else "cublas"


def cuda_event_timer(candidates, warmup=2, repeats=7):
    """{route: median ms} of each ``candidates[route]()``, timed with CUDA events on the current
    stream after ``warmup`` calls each (the first compiles its kernels), interleaved round by
    round so that clock changes touch every route alike. A route that runs out of GPU memory in
    its warm-up (the cublas route's workspace, in a tight QLoRA budget) gets None: it cannot run
    here, and calibration must not end the training run that it serves."""
    runnable = {}
    for route, run in candidates.items():
        try:
            for _ in range(warmup):
                run()
            runnable[route] = run
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
    events = {route: [] for route in runnable}
    for _ in range(repeats):
        for route, run in runnable.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            events[route].append((start, end))
    torch.cuda.synchronize()
    return {route: statistics.median(s.elapsed_time(e) for s, e in events[route])
            if route in events else None for route in candidates}


def cache_dir():
    """Where calibrated tables live: ``$LOWRANK_CACHE_DIR``, else ``$XDG_CACHE_HOME/lowrank``,
    else ``~/.cache/lowrank``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lowrank"


def _driver_version():
    """The CUDA driver's version (cuDriverGetVersion), or 'unknown' where libcuda is not found."""
    if torch.version.hip:
        return f"hip-{torch.version.hip}"
    try:
        version = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version))
        return str(version.value)
    except OSError:
        return "unknown"


def fingerprint(device):
    """What a calibrated table is valid for: the GPU, its driver and the library versions."""
    from lowrank import __version__

    return {"gpu": torch.cuda.get_device_name(device), "driver": _driver_version(),
            "torch": torch.__version__, "triton": triton.__version__, "lowrank": __version__}


class RouteTable:
    """Calibrated routes by key, for one fingerprint, backed by a JSON file.

    ``timer``: ``{route: fn} -> {route: ms, or None for a route that could not run}``
    (``cuda_event_timer`` on a GPU; tests pass a fake).
    The file is read when the table is made and rewritten (merged with what other processes
    wrote meanwhile, replaced atomically) after each calibration.
    """

    def __init__(self, path, fingerprint, timer=cuda_event_timer):
        self.path, self.fingerprint, self.timer = Path(path), fingerprint, timer
        self.routes = self._read()

    def _read(self):
        try:
            stored = json.loads(self.path.read_text())
        except (OSError, ValueError):  # none yet, or cut short: calibrate again
            return {}
        if stored.get("format") != CACHE_FORMAT or stored.get("fingerprint") != self.fingerprint:
            return {}
        return stored.get("routes", {})

    def route(self, key, candidates):
        """The cached route of ``key``, or the winner of timing ``candidates`` ({route: fn}),
        cached. A cached route the call does not offer (a file edited by hand) is timed again."""
        entry = self.routes.get(key)
        if entry is not None and entry["route"] in candidates:
            return entry["route"]
        times = self.timer(candidates)
        ran = [route for route in candidates if times[route] is not None]
        if not ran:
            raise RuntimeError(f"lowrank.routes: no route of {key} could run here (out of GPU "
                               "memory in each)")
        winner = min(ran, key=lambda route: (times[route], ROUTES.index(route)))
        self.routes[key] = {"route": winner, "ms": {route: times[route] for route in candidates}}
        self._write()
        return winner

    def _write(self):
        merged = {**self._read(), **self.routes}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"format": CACHE_FORMAT, "fingerprint": self.fingerprint,
                           "routes": merged}, indent=1, sort_keys=True)
        with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False,
                                         suffix=".tmp") as file:
            file.write(text)
        os.replace(file.name, self.path)


_tables = {}


def table(device):
    """The calibrated table of ``device`` (its fingerprint's file in ``cache_dir()``), made once
    per device and cache directory in a process."""
    slot = (torch.device(device), cache_dir())
    if slot not in _tables:
        stamp = fingerprint(device)
        digest = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]
        _tables[slot] = RouteTable(slot[1] / f"routes-{digest}.json", stamp)
    return _tables[slot]


def can_time(device):
    """Whether calls on ``device`` can be timed now: CUDA tensors outside CUDA graph capture
    (nothing can be timed while a graph is captured); never in Triton's interpreter."""
    return device.type == "cuda" and not torch.cuda.is_current_stream_capturing()


def choose(op, step, device, m, k, n, dtype, kind, candidates):
    """The route of one call of ``op``, a ``step`` ("forward" or "backward"): ``candidates`` maps
    the call's routes to functions that run it (each one returns the op's outputs and has no
    other effect)."""
    route = forced_route()
    if route is not None:
        return route if route in candidates else "fused"
    if calibration_on() and can_time(device):
        return table(device).route(key(op, device, m, k, n, dtype, kind), candidates)
    return default_route(architecture(device), m, kind, step, candidates)


def run(op, step, x, weight, candidates):
    """Run the chosen route of ``candidates`` for a call of ``op``, a ``step`` ("forward", or
    "backward": dX), on x (M rows; dY for a backward op) over the ``FrozenWeight`` ``weight``,
    keyed by the layer's K and N; returns what the route returns."""
    route = choose(op, step, x.device, x.shape[0], weight.in_features, weight.out_features,
                   x.dtype, weight_kind(weight), candidates)
    return candidates[route]()


_workspaces = {}


def workspace(device, dtype, numel):
    """A buffer of at least ``numel`` elements of ``dtype``, one per (device, stream, dtype),
    kept and reused (grown when a larger weight comes): the dequantized weight of the cublas route
    lives here between its dequantize and its GEMMs. Per stream, so that work on two streams never
    shares one."""
    device = torch.device(device)
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else None
    slot = (device, stream, dtype)
    buffer = _workspaces.get(slot)
    if buffer is None or buffer.numel() < numel:
        _workspaces.pop(slot, None)  # the old one goes first: never both at once
        buffer = _workspaces[slot] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


def dense_weight(weight, dtype):
    """The frozen weight as a dense (N x K) tensor in ``dtype`` for the cublas route: a dense
    weight as it is (any strides; ``check_*_args`` made its dtype x's), NF4 dequantized into the
    workspace. Valid until the next NF4 call on this device and stream."""
    if weight.nf4 is None:
        return weight.tensor
    return stacked_weight(weight, dtype, 0)


def stacked_weight(weight, dtype, rows):
    """NF4 ``weight`` dequantized into the first N rows of an (N + ``rows``) x K view of the
    workspace, in ``dtype``; the last ``rows`` rows are the caller's to fill (dX's single-GEMM
    form stacks A there). Valid until the next NF4 call on this device and stream."""
    n, k = weight.out_features, weight.in_features
    out = workspace(weight.tensor.device, dtype, (n + rows) * k)
    nested = None if weight.nested_code is None else (weight.nested_code, weight.nested_absmax,
                                                      weight.offset, weight.nested_blocksize)
    nf4_dequantize_kernel.nf4_dequantize(weight.tensor, weight.absmax, weight.code, out[:n * k],
                                         weight.blocksize, nested)
    return out.view(n + rows, k)


def weight_beside(weight, dtype, columns):
    """NF4 ``weight`` dequantized into the first K columns of an N x (K + ``columns``) view of the
    workspace, in ``dtype``; the last ``columns`` columns of each row are the caller's to fill
    (the forward's single-GEMM form puts s B there). Valid until the next NF4 call on this device
    and stream."""
    n, k = weight.out_features, weight.in_features
    out = workspace(weight.tensor.device, dtype, n * (k + columns)).view(n, k + columns)
    nested = None if weight.nested_code is None else (weight.nested_code, weight.nested_absmax,
                                                      weight.offset, weight.nested_blocksize)
    nf4_dequantize_kernel.nf4_dequantize(weight.tensor, weight.absmax, weight.code, out[:, :k],
                                         weight.blocksize, nested)
    return out
