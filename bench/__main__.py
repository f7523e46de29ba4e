"""Run lowrank's benchmarks on this machine's GPU: ``python -m bench [--quick] [--ops OP ...]``.

Writes one JSON result to bench/results/ and prints a summary table; ``python -m bench.report``
then regenerates BENCHMARKS.md from every stored result.
"""

import argparse
import sys

import torch

from bench import lora_linear, nf4_dequantize

# op name -> the module holding its cases: run(runner, floors, shapes), SHAPES and QUICK_SHAPES.
OPS = {"nf4_dequantize": nf4_dequantize, "lora_linear": lora_linear}


def summary(result):
    """The table printed at the end of a run: each case's time and its headline metrics."""
    floors = result["floors"]
    lines = [f"{result['device']['name']}: copy {floors['copy_bandwidth_gbps']:.0f} GB/s, "
             f"bf16 GEMM {floors['bf16_gemm_tflops']:.0f} TFLOP/s",
             f"{'op':<30}{'shape':<18}{'lowrank ms':>11}  metrics"]
    for case in result["cases"]:
        metrics = "  ".join(f"{name.replace('speedup_vs_', 'x ')} {value:.2f}"
                            for name, value in case["metrics"].items())
        lines.append(f"{case['op']:<30}{'x'.join(map(str, case['shape'])):<18}"
                     f"{case['timings_ms']['lowrank']['median']:>11.4f}  {metrics}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one shape per op")
    parser.add_argument("--ops", nargs="+", choices=sorted(OPS), default=sorted(OPS))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("No CUDA GPU found: lowrank's benchmarks time GPU kernels, so nothing was measured.")
        return 0

    from bench.harness import (GpuRunner, environment, measure_copy_bandwidth_gbps, measure_gemm_tflops,
                               write_result)

    result = {"schema": 1, **environment(),
              "floors": {"copy_bandwidth_gbps": measure_copy_bandwidth_gbps(),
                         "bf16_gemm_tflops": measure_gemm_tflops()},
              "cases": []}
    for op in args.ops:
        module = OPS[op]
        shapes = module.QUICK_SHAPES if args.quick else module.SHAPES
        result["cases"] += module.run(GpuRunner(), result["floors"], shapes)
    path = write_result(result)
    print(summary(result))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
