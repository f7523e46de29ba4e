"""A first-order model of kernel time from the static report: ESTIMATES, NOT MEASUREMENTS.

Per launch, every SM runs its share of the CTAs (the most loaded SM sets the time, so a last
partial wave counts whole; a grouped GEMM's spare row tiles, which exit at once, not counted:
``working_ctas``), and each CTA is limited by the slowest of six throughputs, assumed to
overlap perfectly:

- issue: static SASS instructions (hot loop x its trip count, plus the rest once) x warps, at
  ``ISSUE_PER_CLOCK`` warp-instructions per clock per SM (one per scheduler), and only with
  ``LATENCY_WARPS`` resident warps per scheduler to hide latency: fewer (occupancy, or a grid too
  small to fill the SMs) issue proportionally less;
- tensor: the hot loop's MMA flops (read from the SASS shapes) at the device's peak, mma.sync
  derated on sm_90 where only wgmma reaches the peak;
- L2: bytes the hot loop's tile loads stream (every lane active; 32-bit gathers from small tables
  and the code-table lookups taken as L1 hits, see ``sass.memory_bytes``) at the L2-to-SM
  bandwidth;
- shared memory: bytes the hot loop moves through shared memory at 128 bytes per clock per SM;
- L1: the hot loop's NF4 code-table lookups (``sass.table_wavefronts``: one wavefront per
  128-byte line a warp's load touches, up to 16 for the 2 KB pair table at random codes, one for
  the 16 codes) plus its shared-memory traffic in 128-byte wavefronts, one wavefront per clock per
  SM: L1 and shared memory are one SRAM with one data path, so the two add;
- DRAM (for the whole launch): the bytes of every tensor it touches, once, at copy bandwidth
  (a grouped dX GEMM's dB partials, allocated for every possible row tile, only for the tiles
  with rows: ``build.tensor_bytes``).

Not modelled: latency beyond that issue rule, cache hit rates beyond "each tensor read once from
DRAM" and "32-bit gathers hit L1", clock throttling, launch overhead. The device
constants below are datasheet peaks or guesses (marked); measured times on a GPU correct them
(issue "GPU pass"): compare, then change the constants, never the readings.
"""

from dataclasses import dataclass

ISSUE_PER_CLOCK = 4  # warp-instructions per clock per SM: 4 schedulers, one each
LATENCY_WARPS = 4  # resident warps per scheduler that keep it issuing every clock (a guess)
SHARED_BYTES_PER_CLOCK = 128  # per SM


@dataclass(frozen=True)
class Device:
    name: str
    arch: int
    sms: int
    clock_hz: float  # boost clock under load
    tensor_flops: float  # dense bf16 with fp32 accumulation, peak
    mma_sync_fraction: float  # of the peak that mma.sync reaches (wgmma-only peak on sm_90)
    l2_bytes_per_s: float  # L2 -> SMs, all SMs (guess: no datasheet figure)
    dram_bytes_per_s: float  # achievable copy bandwidth (read + write)
    cublas_flops: float  # what cuBLAS reaches on a large bf16 GEMM (guess: a fraction of peak)


DEVICES = {
    "H100 SXM": Device("H100 SXM", 90, 132, 1.755e9, 989e12, 0.6, 7.0e12, 3.0e12, 750e12),
    "RTX 4090": Device("RTX 4090", 89, 128, 2.52e9, 165e12, 1.0, 5.0e12, 0.9e12, 150e12),
}


def trips(record):
    """Iterations of the hot loop per CTA, from the launch's integer arguments: the reduction
    dimension over its block (the decode kernel: its K-slice; the merge: the rank)."""
    ints, c, kernel = record["ints"], record["constexprs"], record["kernel"]
    value = {**ints, **{k: v for k, v in c.items() if isinstance(v, int)}}  # ints made constants
    over_k, over_n = ("K", "BLOCK_K"), ("N", "BLOCK_N")
    reduce_over = {"_lora_forward_kernel": over_k, "_ia3_forward_kernel": over_k,
                   "_ia3_grad_scale_kernel": over_k, "_lora_shrink_kernel": over_k,
                   "_lora_grad_input_kernel": over_n, "_ia3_grad_input_kernel": over_n,
                   "_lora_grad_a_kernel": ("M", "BLOCK_M"), "_grouped_shrink_kernel": over_k,
                   "_grouped_gemm_kernel": over_k,
                   # An expert's rows: the launch's model_ints (its offsets are a tensor).
                   "_grouped_weight_grad_kernel": ("rows_per_expert", "BLOCK_M"),
                   "_grouped_output_grad_kernel": ("rows_per_expert", "BLOCK_M"),
                   "_lora_output_grad_kernel": ("rows_per_slab", "BLOCK_M"),
                   "_lora_decode_kernel": ("k_per_split", "BLOCK_K"),
                   "_lora_mixed_shrink_kernel": over_k, "_lora_mixed_forward_kernel": over_k,
                   "_lora_mixed_partial_kernel": ("k_per_split", "BLOCK_K"),
                   # Segment tiles: as if every tile of the table had rows (the spare ones
                   # exit at once), so a little over the truth.
                   "_lora_mixed_segment_shrink_kernel": over_k,
                   "_lora_mixed_segment_forward_kernel": over_k,
                   # Its MMA loop, the LoRA expand over rank blocks (one at rank 16), is the hot
                   # loop; the sums over K-slices (the partials before it, S's inside it) are
                   # loops of their own that ptxas unrolls 4 times, read once: exact at 4 slices.
                   "_lora_decode_epilogue_kernel": ("R", "BLOCK_R")}
    if kernel in reduce_over:
        size, block = reduce_over[kernel]
        return -(-value[size] // value[block])
    return {"_lora_merge_kernel": value.get("R", 1)}.get(kernel, 1)


# The grouped GEMMs' grids: axis 0 is an upper bound on their row tiles, cdiv(rows, BLOCK_M) + E
# (``kernels/lora_grouped.tile_schedule``); a tile past the last loads its expert id and exits.
GROUPED_ROW_TILES = ("_grouped_gemm_kernel", "_grouped_shrink_kernel")


def working_ctas(record):
    """CTAs that do the launch's work: its grid's, but for a grouped GEMM only the row tiles its
    experts' rows fill (``experts`` x cdiv(``rows_per_expert``, BLOCK_M), from the launch's
    model_ints), not the spare ones, which exit before any load of a tile (counted as free)."""
    grid = list(record["grid"])
    ints = record["ints"]
    if record["kernel"] in GROUPED_ROW_TILES and "experts" in ints:
        block_m = record["constexprs"]["BLOCK_M"]
        grid[0] = min(grid[0], ints["experts"] * -(-ints["rows_per_expert"] // block_m))
    ctas = 1
    for extent in grid:
        ctas *= extent
    return ctas


def launch_time(record, device):
    """{"seconds", "bound", and the six limits in seconds} for one launch on ``device``; for a
    product torch runs (a "modelled" record, ``launches.torch_gemm``: no build to read) the
    slower of its flops at ``cublas_flops`` and its bytes at copy bandwidth."""
    if "modelled" in record:
        limits = {"tensor": record["modelled"]["flops"] / device.cublas_flops,
                  "DRAM": record["modelled"]["bytes"] / device.dram_bytes_per_s}
        bound = max(limits, key=limits.get)
        return {"seconds": limits[bound], "bound": bound, **limits}
    ctas = working_ctas(record)
    loop = record["loop"]
    n = trips(record) if loop else 0
    loop_instructions = loop["instructions"] if loop else 0
    warps = record["num_warps"]
    per_cta_clocks = {
        "issue": (record["instructions"] - loop_instructions + loop_instructions * n) * warps
                 / ISSUE_PER_CLOCK,
        "tensor": 0.0, "L2": 0.0, "shared": 0.0, "L1": 0.0}
    if loop:
        derate = device.mma_sync_fraction if loop["mma"] == "mma.sync" else 1.0
        per_sm_flops_per_clock = device.tensor_flops * derate / device.sms / device.clock_hz
        per_cta_clocks["tensor"] = loop["flops"] * n / per_sm_flops_per_clock
        l2_per_sm_per_clock = device.l2_bytes_per_s / device.sms / device.clock_hz
        per_cta_clocks["L2"] = loop["global_bytes"] * n / l2_per_sm_per_clock
        per_cta_clocks["shared"] = loop["shared_bytes"] * n / SHARED_BYTES_PER_CLOCK
        per_cta_clocks["L1"] = per_cta_clocks["shared"] + loop["table_wavefronts"] * n
    ctas_per_sm = -(-ctas // device.sms)
    resident_warps = min(ctas_per_sm, record["ctas_per_sm"]) * warps
    per_cta_clocks["issue"] /= min(1.0, resident_warps / ISSUE_PER_CLOCK / LATENCY_WARPS)
    limits = {k: ctas_per_sm * v / device.clock_hz for k, v in per_cta_clocks.items()}
    limits["DRAM"] = record["tensor_bytes"] / device.dram_bytes_per_s
    bound = max(limits, key=limits.get)
    return {"seconds": limits[bound], "bound": bound, **limits}


def launch_groups(records):
    """A case's records grouped by launch: an autotuned launch's records are its configs in list
    order (``config`` 0, 1, ...), an untuned one is a group of one."""
    groups = []
    for r in records:
        if r.get("config", 0) == 0:
            groups.append([])
        groups[-1].append(r)
    return groups


def case_estimate(records, device, ideal):
    """A benchmark case's estimate: its launches' times summed, against ``ideal``: ("gemm", flops)
    at cuBLAS's rate, or ("copy", bytes) at copy bandwidth. ratio = ideal time / modelled time.
    An autotuned launch counts at its best config by the model (what autotuning picks if the
    model is right); ``worst_us`` and ``worst_ratio`` take every launch at its worst config."""
    chosen, worst = [], []
    for group in launch_groups(records):
        timed = sorted(((launch_time(r, device), r) for r in group), key=lambda p: p[0]["seconds"])
        chosen.append(timed[0])
        worst.append(timed[-1])
    seconds = sum(t["seconds"] for t, _ in chosen)
    worst_seconds = sum(t["seconds"] for t, _ in worst)
    kind, amount = ideal
    ideal_seconds = amount / (device.cublas_flops if kind == "gemm" else device.dram_bytes_per_s)
    slowest = max(chosen, key=lambda pair: pair[0]["seconds"])
    return {"model_us": seconds * 1e6, "ideal": kind, "ideal_us": ideal_seconds * 1e6,
            "ratio": ideal_seconds / seconds, "worst_us": worst_seconds * 1e6,
            "worst_ratio": ideal_seconds / worst_seconds,
            "bound": f"{slowest[1]['kernel']}: {slowest[0]['bound']}",
            "launches": [{"kernel": r["kernel"], "config": r.get("config", 0),
                          "configs": r.get("configs", 1), "model_us": t["seconds"] * 1e6,
                          "bound": t["bound"]} for t, r in chosen]}


CHOSEN = " route=chosen"
# A training step's case (its name's op) and the steps it runs, each chosen apart (the route
# table keys the forward and dX calls apart): the chosen step rows summed.
TRAIN_STEPS = {"lora_linear_train": ("lora_linear_forward", "lora_linear_backward")}


def chosen_routes(estimates):
    """Per case with a " route=cublas" twin (the fused route's case is the name without it): a
    " route=chosen" estimate, the cheaper of the two by the model (``"route"`` says which), as
    a calibrated route table would pick if the model were right. A training step's case
    (``TRAIN_STEPS``) whose steps have twins too is their chosen rows summed
    (``summed_steps``), as the ops choose per step. ``estimates``: {case: case_estimate};
    returns the new ones."""
    chosen = {}
    for case, cublas in estimates.items():
        if case.endswith(" route=cublas"):
            base = case.removesuffix(" route=cublas")
            fused = estimates[base]
            route, best = min((("fused", fused), ("cublas", cublas)),
                              key=lambda pair: pair[1]["model_us"])
            chosen[base + CHOSEN] = {**best, "route": route}
    for case in list(chosen):
        op, rest = case.split(" ", 1)
        steps = [f"{step} {rest}" for step in TRAIN_STEPS.get(op, ())]
        if steps and all(step in chosen for step in steps):
            chosen[case] = summed_steps(estimates[case.removesuffix(CHOSEN)],
                                        [chosen[step] for step in steps])
    return chosen


def summed_steps(whole, steps):
    """One case's estimate (``whole``: its ideal) made of ``steps``' estimates run one after
    the other: their times and launches summed, its bound the slowest step's; ``"route"``: the
    steps' routes in order joined by " + " ("fused + cublas": a fused forward, a cublas dX
    backward), or one name where they agree."""
    model_us = sum(step["model_us"] for step in steps)
    worst_us = sum(step["worst_us"] for step in steps)
    routes = [step["route"] for step in steps]
    return {"model_us": model_us, "ideal": whole["ideal"], "ideal_us": whole["ideal_us"],
            "ratio": whole["ideal_us"] / model_us, "worst_us": worst_us,
            "worst_ratio": whole["ideal_us"] / worst_us,
            "bound": max(steps, key=lambda step: step["model_us"])["bound"],
            "launches": [launch for step in steps for launch in step["launches"]],
            "route": routes[0] if len(set(routes)) == 1 else " + ".join(routes)}


BASELINES = {"bnb_peft_": "bitsandbytes + PEFT"}  # case prefix of a baseline row: what it models
VERSUS_OF = "lora_linear_"  # the prefix of our row a baseline row stands beside


def versus(estimates):
    """{baseline case: comparison} for each baseline row (a case starting with a ``BASELINES``
    prefix) whose twin, the same name with ``VERSUS_OF`` for its prefix, exists: ours is the
    twin's " route=chosen" estimate where it has one (``chosen_routes``; add those first), else
    the twin. ratio = their model time / ours: above 1, ours is faster. ``estimates``: {case:
    case_estimate} of one device."""
    comparisons = {}
    for case, theirs in estimates.items():
        prefix = next((p for p in BASELINES if case.startswith(p)), None)
        if prefix is None:
            continue
        twin = VERSUS_OF + case.removeprefix(prefix)
        ours_case = twin + CHOSEN if twin + CHOSEN in estimates else twin
        if ours_case not in estimates:
            raise ValueError(f"the baseline row {case!r} has no row of ours to compare with "
                             f"({twin!r})")
        ours = estimates[ours_case]
        comparisons[case] = {"baseline": BASELINES[prefix], "ours": ours_case,
                             "route": ours.get("route"), "theirs_us": theirs["model_us"],
                             "ours_us": ours["model_us"], "ratio": theirs["model_us"] / ours["model_us"]}
    return comparisons
