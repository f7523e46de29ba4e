"""Run lowrank's benchmarks on this machine's GPU: ``python -m bench [--quick] [--ops OP ...]``.

Writes one JSON result to bench/results/ and prints a summary table; ``python -m bench.report``
then regenerates BENCHMARKS.md from every stored result.
"""

import argparse
import sys

import torch

from bench import nf4_dequantize

OPS = {"nf4_dequantize": nf4_dequantize.run}


def summary(result):
    floors = result["floors"]
    lines = [f"{result['device']['name']}: copy {floors['copy_bandwidth_gbps']:.0f} GB/s, "
             f"bf16 GEMM {floors['bf16_gemm_tflops']:.0f} TFLOP/s",
             f"{'op':<16}{'shape':<16}{'lowrank ms':>12}{'GB/s':>9}{'% copy':>8}{'x bnb':>8}"]
    for case in result["cases"]:
        m = case["metrics"]
        lines.append(f"{case['op']:<16}{'x'.join(map(str, case['shape'])):<16}"
                     f"{case['timings_ms']['lowrank']['median']:>12.4f}{m['lowrank_gbps']:>9.0f}"
                     f"{m['pct_copy_bandwidth']:>8.1f}{m['speedup_vs_bitsandbytes']:>8.2f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one shape per op")
    parser.add_argument("--ops", nargs="+", choices=sorted(OPS), default=sorted(OPS))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("No CUDA GPU found: lowrank's benchmarks time GPU kernels, so nothing was measured.")
        return 0

    from bench.harness import environment, measure_copy_bandwidth_gbps, measure_gemm_tflops, write_result

    result = {"schema": 1, **environment(),
              "floors": {"copy_bandwidth_gbps": measure_copy_bandwidth_gbps(),
                         "bf16_gemm_tflops": measure_gemm_tflops()},
              "cases": []}
    for op in args.ops:
        result["cases"] += OPS[op](result["floors"], quick=args.quick)
    path = write_result(result)
    print(summary(result))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
