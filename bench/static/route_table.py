"""``lowrank.routes.FUSED_MAX_M`` derived from the static report's model estimates (ESTIMATES,
not measurements), so that the default route table can be recomputed when the kernels or the
model change: ``python -m bench.static.route_table`` prints the table the newest
``bench/results/static-*.json`` implies (tests/test_routes.py checks the committed table equals
it).

First order, per architecture group (its model device) and weight kind, from the forward and
the backward rows at the training shape (M0 = 4096 rows): the fused route's time is taken as
proportional to M (fused_us / M0 per row), the cublas route's as its dequantize launches (a fixed
cost per call, whatever M) plus the rest proportional to M. They cross at M* = dequantize /
(fused per row - cublas per row); the fused route wins below it. Each step has its own bound
(``routes.default_route`` is told which step a call is; the backward's other launches, dS, dB
and dA, are the same on both routes, so its crossover is dX's): the largest power of two at or
below its M* (``routes.default_route`` compares M's power-of-two bucket with it), 0 where the
cublas route wins at every M (its per-row cost is lower and it has no fixed cost: dense
weights), None where the fused route's per-row cost is not above cublas's (fused at every M).
"""

import sys

from bench.static.launches import TRAIN_SHAPE
from lowrank.routes import STEPS

# The model device standing for each architecture group of ``routes.FUSED_MAX_M``.
GROUP_DEVICES = {"sm_90": "H100 SXM", "sm_89": "RTX 4090"}
KINDS = ("dense", "nf4", "nf4-nested")


def crossover(fused, cublas, rows):
    """M* of one weight kind on one device (see the module's doc), from the two routes' forward
    estimates at ``rows`` rows (``model.case_estimate`` dicts); None: fused at every M."""
    fixed = sum(launch["model_us"] for launch in cublas["launches"]
                if launch["kernel"] == "_nf4_dequantize_kernel")
    fused_per_row = fused["model_us"] / rows
    cublas_per_row = (cublas["model_us"] - fixed) / rows
    if fused_per_row <= cublas_per_row:
        return None
    return fixed / (fused_per_row - cublas_per_row)


def bound(m_star):
    """The largest power of two at or below ``m_star`` (0 below 1; None stays None)."""
    if m_star is None:
        return None
    return 0 if m_star < 1 else 1 << (int(m_star).bit_length() - 1)


def fused_max_m(report):
    """{group: {step: {kind: bound}}}, ``routes.FUSED_MAX_M``'s form, from a static report's
    estimates, plus {group: {kind: {step: M*}}} (the unrounded crossovers of the forward and the
    backward, for the table's comment)."""
    m, k, n = TRAIN_SHAPE
    table, crossovers = {}, {}
    for group, device in GROUP_DEVICES.items():
        cases = report["model"]["cases"][device]
        table[group] = {step: {} for step in STEPS}
        crossovers[group] = {kind: {} for kind in KINDS}
        for kind in KINDS:
            for step in STEPS:
                case = f"lora_linear_{step} {kind} {m}x{k}x{n}"
                if f"{case} route=cublas" not in cases:
                    raise ValueError(f"the static report {report['commit'][:10]} has no cublas "
                                     f"route row for {case} (built before the route rows): run "
                                     "python -m bench.static")
                m_star = crossover(cases[case], cases[f"{case} route=cublas"], m)
                table[group][step][kind] = bound(m_star)
                crossovers[group][kind][step] = m_star
    return table, crossovers


def main():
    from bench.report import load_static

    report = load_static()
    if report is None:
        print("no bench/results/static-*.json: run python -m bench.static", file=sys.stderr)
        return 1
    table, crossovers = fused_max_m(report)
    print(f"static report {report['commit'][:10]}: FUSED_MAX_M = {table}")
    print("crossovers (rows, forward / backward): " + "; ".join(
        f"{group} " + ", ".join(f"{kind} " + " / ".join(
            "none" if m is None else f"{m:.0f}" for m in steps.values())
            for kind, steps in kinds.items())
        for group, kinds in crossovers.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
