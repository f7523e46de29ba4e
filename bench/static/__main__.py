"""The static kernel report, on a machine without a GPU: ``python -m bench.static [--archs 90 89]``.

Builds every kernel the launchers launch on the benchmark shapes for sm_80, sm_86, sm_89 and sm_90
(as Triton's JIT would at run time), reads registers, spills, shared memory, occupancy and the hot
loop's SASS, models each benchmark case's time on H100 and RTX 4090 (``bench.static.model``:
estimates, not measurements), writes ``bench/results/static-<commit>.json`` and prints the table.
``python -m bench.report`` puts it in BENCHMARKS.md. Builds are cached: a second run takes seconds.
"""

import argparse
import datetime
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not interpreted ones

import json  # noqa: E402
from dataclasses import asdict  # noqa: E402

import triton  # noqa: E402

from bench.harness import RESULTS_DIR, _commit  # noqa: E402
from bench.static import build, gates, launches, model, table  # noqa: E402
from bench.static.limits import ARCHS  # noqa: E402

DEFAULT_MULTIPROCESSORS = 132  # the split-K grid of archs the model has no device for


def run(archs):
    cases = launches.bench_cases()
    calls = {case: call for case, (call, _) in cases.items()}
    devices = {device.arch: device for device in model.DEVICES.values()}
    records, modelled = {}, {}
    for arch in archs:
        sms = devices[arch].sms if arch in devices else DEFAULT_MULTIPROCESSORS
        modelled[arch] = []  # torch's products on the cublas route: model only, nothing built
        records[arch] = build.build_all(
            launches.run_calls(calls, launches.gpu(arch, sms), modelled=modelled[arch]), arch)
        print(f"sm_{arch}: {len(records[arch])} launches read", file=sys.stderr)
    estimates = {}
    for device in model.DEVICES.values():
        if device.arch in records:
            timed = records[device.arch] + modelled[device.arch]
            estimates[device.name] = {
                case: model.case_estimate([r for r in timed if r["case"] == case], device, ideal)
                for case, (_, ideal) in cases.items()}
            estimates[device.name].update(model.chosen_routes(estimates[device.name]))
    versus = {name: model.versus(found) for name, found in estimates.items()}
    everything = [r for found in records.values() for r in found]
    return {"schema": "static-1", "commit": _commit(), "triton": triton.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "archs": {str(arch): found for arch, found in records.items()},
            "modelled": {str(arch): found for arch, found in modelled.items()},
            "model": {"summary": model.__doc__.strip().split("\n\n")[0].replace("\n", " "),
                      "devices": {name: asdict(d) for name, d in model.DEVICES.items()},
                      "cases": estimates, "versus": versus},
            "gates": {"resources": gates.resources(everything), "spills": gates.spills(everything),
                      "two_ctas_per_sm (sm_89)": gates.two_ctas_per_sm(records.get(89, [])),
                      "wgmma (sm_90)": gates.wgmma(records.get(90, [])),
                      "nf4_instructions": gates.nf4_instructions(everything)}}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.static", description=__doc__)
    parser.add_argument("--archs", nargs="+", type=int, choices=tuple(ARCHS), default=tuple(ARCHS))
    parser.add_argument("--output", default=RESULTS_DIR)
    args = parser.parse_args(argv)
    report = run(args.archs)
    print(table.render(report))
    path = f"{args.output}/static-{(report['commit'] or 'unknown')[:10]}.json"
    with open(path, "w") as out:
        json.dump(report, out, indent=1)
        out.write("\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
