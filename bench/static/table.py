"""The static report as text: the per-kernel table and the model's estimates, in Markdown (for
BENCHMARKS.md and the terminal). Reads the JSON ``python -m bench.static`` writes; imports no
Triton."""

TABLE_ARCHS = (90, 89)


def short_case(case):
    """"lora_linear_forward nf4-nested 4096x4096x14336" -> "lora_linear_forward nf4-nested"."""
    return " ".join(word for word in case.split() if "x" not in word or not word[0].isdigit())


def mix_summary(loop):
    """The hot loop per warp: total, tensor-core, global loads by width, cp.async, shared, ALU."""
    if not loop:
        return "-"
    mix = loop["mix"]
    loads = ",".join(f"{k.split('.', 1)[1]}:{v}" for k, v in sorted(mix.items()) if k.startswith("LDG."))
    grouped = {"tc": mix.get("tensor", 0), "ldg": loads or "0",
               "cp.async": sum(v for k, v in mix.items() if k.startswith("LDGSTS")),
               "lds/sts": sum(v for k, v in mix.items() if k.split(".")[0] in ("LDS", "STS", "LDSM")),
               "int": mix.get("int", 0) + mix.get("uniform", 0),
               "fp": mix.get("float", 0) + mix.get("convert", 0)}
    return f"{loop['instructions']}: " + " ".join(f"{k} {v}" for k, v in grouped.items())


def tile(r):
    """A GEMM's config: "BLOCK_MxBLOCK_NxBLOCK_K wWARPS sSTAGES", "" for other kernels."""
    c = r["constexprs"]
    if "BLOCK_M" not in c:
        return ""
    return (f"{c['BLOCK_M']}x{c.get('BLOCK_N', '-')}x{c.get('BLOCK_K', '-')} "
            f"w{r['num_warps']} s{r['num_stages']}")


def kernel_rows(report):
    """One row per (case, kernel, config of its list) of the benchmark launches, the archs side by
    side (an arch's list may be shorter: its row is then missing there)."""
    rows = {}
    for arch in TABLE_ARCHS:
        for r in report["archs"].get(str(arch), []):
            rows.setdefault((short_case(r["case"]), r["kernel"], r.get("config", 0)), {})[arch] = r
    return rows


def per_element(r, dense):
    """Instructions per NF4 element, and in brackets the part above the same kernel's loop on a
    dense weight (``dense``: its record, or None): what the decode itself costs."""
    value = r.get("instructions_per_element")
    if value is None:
        return "-"
    if dense is None or not dense["loop"] or not r["weight_elements"]:
        return f"{value:.1f}"
    floor = dense["loop"]["instructions"] * dense["num_warps"] * 32 / r["weight_elements"]
    return f"{value:.1f} ({value - floor:.1f})"


def cell(r, dense):
    return (f"{r['registers']} | {r['stack'] + r['local']} | {r['shared'] / 1024:.1f} | "
            f"{r['ctas_per_sm']} ({r['occupancy_limiter']}) | {r['mma'] or '-'} | "
            f"{per_element(r, dense)} | {mix_summary(r['loop'])}")


def render(report):
    lines = [f"Commit `{(report['commit'] or 'unknown')[:10]}`, triton {report['triton']}, "
             f"{report['date']}. Every kernel the launchers launch on the benchmark shapes (bf16), "
             "compiled on the CPU as Triton's JIT specializes it at run time, read from the cubin "
             "and its SASS. Columns per arch: registers, spilled bytes (stack + local), shared KB, "
             "CTAs per SM (limiter), MMA kind, hot-loop instructions per decoded NF4 element "
             "(per thread; in brackets, above the same loop on a dense weight: the decode's own "
             "cost), and the hot loop per warp: instructions, then tensor-core, global loads "
             "by width, cp.async, shared loads/stores, integer (incl. uniform), float (incl. "
             "conversions).", ""]
    for arch in TABLE_ARCHS:
        lines += [f"### sm_{arch}", "",
                  "| case | kernel | config | regs | spill B | smem KB | CTAs/SM | MMA "
                  "| instr/NF4 elem | hot loop |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        rows = kernel_rows(report)
        for (case, kernel, config), by_arch in rows.items():
            if arch in by_arch:
                op, kind, *detail = case.split()
                twin = rows.get((" ".join([op, "dense", *detail]), kernel, config), {})
                r = by_arch[arch]
                label = f"{config + 1}/{r['configs']}: " if r.get("configs", 1) > 1 else ""
                lines.append(f"| {case} | {kernel} | {label}{tile(r)} | {cell(r, twin.get(arch))} |")
        lines.append("")
    lines += ["### Model estimates (not measurements)", "",
              report["model"]["summary"], "",
              "Autotuned launches count at their best config by the model; the worst columns "
              "take every launch at the worst config of its list.", "",
              "| case | device | model us | ideal | ideal us | ratio | worst us | worst ratio "
              "| bound (slowest kernel: limit) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for device, cases in report["model"]["cases"].items():
        for case, e in cases.items():
            ideal = "cuBLAS" if e["ideal"] == "gemm" else "copy"
            worst_us, worst_ratio = e.get("worst_us", e["model_us"]), e.get("worst_ratio", e["ratio"])
            case = f"{case} ({e['route']})" if "route" in e else case  # the chosen route
            lines.append(f"| {case} | {device} | {e['model_us']:.0f} | {ideal} | {e['ideal_us']:.0f} | "
                         f"{e['ratio']:.2f} | {worst_us:.0f} | {worst_ratio:.2f} | {e['bound']} |")
    lines += versus_rows(report["model"].get("versus", {}))
    lines += ["", "Model constants: " + "; ".join(
        f"{name}: " + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                                for k, v in constants.items() if k != "name")
        for name, constants in report["model"]["devices"].items()), ""]
    gates = report.get("gates", {})
    if gates:
        lines += ["Gates (tests/test_compile_gpu.py) on these builds: " + "; ".join(
            f"{gate}: {'pass' if not failures else f'{len(failures)} failing'}"
            for gate, failures in gates.items()), ""]
    return "\n".join(lines)


def versus_rows(versus):
    """The baseline rows against ours (``model.versus``: {device: {case: comparison}}), devices
    side by side: each one's time, ours (its route) and theirs / ours. None in reports made
    before these rows existed: no lines."""
    devices = [device for device, found in versus.items() if found]
    if not devices:
        return []
    lines = ["", "#### vs bitsandbytes + PEFT (model estimates, not measurements)", "",
             "Their ops (`bench.static.launches.bnb_peft_ops`) each at the slower of its flops at "
             "the cuBLAS rate and its bytes at copy bandwidth, bitsandbytes' kernels included "
             "(generous to them); ours: the chosen route's row. Issue 17's target at M = 4096: "
             "theirs / ours >= 1.4.", "",
             "| case | " + " | ".join(f"{d}: theirs us | ours us (route) | theirs / ours"
                                     for d in devices) + " |",
             "|---|" + "---|---|---|" * len(devices)]
    for case in versus[devices[0]]:
        cells = []
        for device in devices:
            c = versus[device][case]
            route = f" ({c['route']})" if c["route"] else ""
            cells.append(f"{c['theirs_us']:.0f} | {c['ours_us']:.0f}{route} | {c['ratio']:.2f}")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return lines
