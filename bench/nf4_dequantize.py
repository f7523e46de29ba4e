"""NF4 dequantize (bf16 output, double quant, blocksize 64): lowrank vs bitsandbytes vs reference.

Bytes moved per call: the packed weight (n / 2), its nested absmax (n / 64 codes + n / 16384 fp32
scales) and the bf16 output (2n); GB/s and % of the measured copy bandwidth are counted on those.
"""

import torch

from bench.harness import check_outputs

# Llama-3-8B projections, and the largest Llama-3-70B MLP weight.
SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (8192, 28672)]
QUICK_SHAPES = [(4096, 14336)]


def bytes_moved(n):
    return n // 2 + n // 64 + 4 * (n // 16384) + 2 * n


def run(runner, floors, shapes):
    import bitsandbytes.functional as F

    from lowrank import nf4, reference

    cases = []
    for shape in shapes:
        def make_inputs():
            w = torch.randn(shape, device=runner.device, dtype=torch.bfloat16)
            packed, state = nf4.quantize(w, blocksize=64, double_quant=True)
            return packed, state, torch.empty(shape, device=runner.device, dtype=torch.bfloat16)

        n = shape[0] * shape[1]
        inputs = runner.rotating(make_inputs, bytes_moved(n))
        packed, state, out = next(inputs)
        expected = reference.nf4_dequantize(packed, state)
        check_outputs("lowrank.nf4.dequantize", nf4.dequantize(packed, state, out=out), expected)
        check_outputs("bitsandbytes dequantize_4bit", F.dequantize_4bit(packed, state), expected)

        timings = {
            "lowrank": runner.time(lambda p, s, o: nf4.dequantize(p, s, out=o), inputs),
            # Without out=: bitsandbytes has no CPU kernel for it (the dry run on CPU calls this),
            # and on a GPU the caching allocator makes the output's allocation nearly free.
            "bitsandbytes": runner.time(lambda p, s, o: F.dequantize_4bit(p, s), inputs),
            "reference": runner.time(lambda p, s, o: reference.nf4_dequantize(p, s), inputs),
        }
        gbps = bytes_moved(n) / timings["lowrank"]["median"] / 1e6
        cases.append({
            "op": "nf4_dequantize", "shape": list(shape),
            "params": {"out_dtype": "bfloat16", "blocksize": 64, "double_quant": True},
            "timings_ms": timings,
            "metrics": {
                "lowrank_gbps": gbps,
                "pct_copy_bandwidth": 100 * gbps / floors["copy_bandwidth_gbps"],
                "speedup_vs_bitsandbytes": timings["bitsandbytes"]["median"] / timings["lowrank"]["median"],
                "speedup_vs_reference": timings["reference"]["median"] / timings["lowrank"]["median"],
            },
        })
    return cases
