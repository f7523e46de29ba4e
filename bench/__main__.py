"""Run lowrank's benchmarks on this machine's GPU:
``python -m bench [--quick] [--ops OP ...] [--shapes SHAPE ...]``.

Writes one JSON result to bench/results/ (``--output DIR``: there) and prints a summary table; ``python -m bench.report``
then regenerates BENCHMARKS.md from every stored result.
"""

import argparse
import sys
from pathlib import Path

import torch

from bench import (dora_linear, ia3_linear, lora_grouped, lora_linear, lora_mixed, merge,
                   nf4_dequantize, train_step)
from bench.harness import RESULTS_DIR

# op name -> the module holding its cases: run(runner, floors, shapes), SHAPES and QUICK_SHAPES.
OPS = {"nf4_dequantize": nf4_dequantize, "lora_linear": lora_linear, "ia3_linear": ia3_linear,
       "merge": merge, "train_step": train_step, "lora_mixed": lora_mixed,
       "dora_linear": dora_linear, "lora_grouped": lora_grouped}


def shape_name(shape):
    return "x".join(map(str, shape))


def summary(result):
    """The table printed at the end of a run: each case's time and its headline metrics."""
    floors = result["floors"]
    lines = [f"{result['device']['name']}: copy {floors['copy_bandwidth_gbps']:.0f} GB/s, "
             f"bf16 GEMM {floors['bf16_gemm_tflops']:.0f} TFLOP/s",
             f"{'op':<30}{'shape':<18}{'lowrank ms':>11}  metrics"]
    for case in result["cases"]:
        metrics = "  ".join(f"{name.replace('speedup_vs_', 'x ')} {value:.2f}"
                            for name, value in case["metrics"].items())
        lines.append(f"{case['op']:<30}{shape_name(case['shape']):<18}"
                     f"{case['timings_ms']['lowrank']['median']:>11.4f}  {metrics}")
    return "\n".join(lines)


def plan(ops, quick, shapes=None):
    """The (op, shape) pairs to run. ``shapes``: names like ``4096x4096x14336`` (as the summary
    prints them) to keep; one that no selected op has is an error, not an empty run."""
    pairs = [(op, tuple(shape)) for op in ops
             for shape in (OPS[op].QUICK_SHAPES if quick else OPS[op].SHAPES)]
    if shapes:
        unknown = set(shapes) - {shape_name(shape) for _, shape in pairs}
        if unknown:
            raise SystemExit(f"python -m bench: no case has shape {', '.join(sorted(unknown))}; "
                             f"shapes of {', '.join(ops)}: "
                             f"{' '.join(sorted({shape_name(s) for _, s in pairs}))}")
        pairs = [(op, shape) for op, shape in pairs if shape_name(shape) in shapes]
    return pairs


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a subset that runs in about two minutes")
    parser.add_argument("--ops", nargs="+", choices=sorted(OPS), default=sorted(OPS))
    parser.add_argument("--shapes", nargs="+", metavar="SHAPE",
                        help="only these shapes, written as the summary prints them (4096x4096x14336)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR,
                        help="the folder the JSON result is written to (default bench/results)")
    args = parser.parse_args(argv)
    pairs = plan(args.ops, args.quick, args.shapes)
    if not torch.cuda.is_available():
        print("No CUDA GPU found: lowrank's benchmarks time GPU kernels, so nothing was measured.")
        return 0

    from tqdm import tqdm

    from bench.harness import (GpuRunner, environment, measure_copy_bandwidth_gbps, measure_gemm_tflops,
                               write_result)

    result = {"schema": 1, **environment(),
              "floors": {"copy_bandwidth_gbps": measure_copy_bandwidth_gbps(),
                         "bf16_gemm_tflops": measure_gemm_tflops()},
              "cases": []}
    progress = tqdm(pairs, desc="bench", unit="shape", file=sys.stderr)
    for op, shape in progress:
        progress.set_postfix_str(f"{op} {shape_name(shape)}")
        result["cases"] += OPS[op].run(GpuRunner(), result["floors"], [shape])
    path = write_result(result, args.output)
    print(summary(result))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
