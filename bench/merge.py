"""Merging a LoRA adapter (rank 16) into an NF4 weight (double quant, blocksize 64) and into a dense
bf16 weight, and an IA3 vector into an NF4 weight: lowrank vs one NF4 dequantize pass (the bound:
a merge reads and writes the packed weight once), the way PEFT merges a 4-bit layer (bitsandbytes
dequantize_4bit, add, quantize_4bit) and the reference.

The ``llama3_8b_stack_s`` metric is derived, not timed as one call: the medians of the seven
projection shapes of one Llama-3-8B block, times 32 blocks.
"""

import torch

from bench.harness import check_outputs, headline_metrics
from bench.lora_linear import BLOCKSIZE, RANK, SCALING

# (N, K) of a Llama-3-8B block's projections: q, k, v, o, gate, up, down.
LLAMA3_8B_BLOCK = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096),
                   (14336, 4096), (4096, 14336)]
LLAMA3_8B_BLOCKS = 32
SHAPES = sorted(set(LLAMA3_8B_BLOCK))
QUICK_SHAPES = [(4096, 14336)]


def make_inputs(device, n, k):
    from lowrank import nf4

    w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
    packed, state = nf4.quantize(w, blocksize=BLOCKSIZE, double_quant=True)
    lora_a = torch.randn(RANK, k, device=device) / k**0.5
    lora_b = torch.randn(n, RANK, device=device) * 0.02
    ia3 = 1 + 0.1 * torch.randn(n, 1, device=device)
    return packed, state, w, lora_a, lora_b, ia3


def run(runner, floors, shapes):
    import bitsandbytes.functional as F

    from lowrank import nf4, ops, reference

    def bnb_merge(packed, state, w, a, b, ia3):
        # PEFT's merge of a bitsandbytes Linear4bit: dequantize, add, quantize again.
        merged = F.dequantize_4bit(packed, state).float() + SCALING * (b @ a)
        return F.quantize_4bit(merged.to(state.dtype), blocksize=BLOCKSIZE, compress_statistics=True,
                               quant_type="nf4")

    ways = {
        "lora_nf4": {
            "lowrank": lambda p, s, w, a, b, l: ops.merge_lora(p, a, b, SCALING, quant_state=s),
            "nf4_dequantize_pass": lambda p, s, w, a, b, l: nf4.dequantize(p, s),
            "bnb_peft": bnb_merge,
            "reference": lambda p, s, w, a, b, l: reference.merge_lora(p, a, b, SCALING, quant_state=s)},
        "lora_nf4_to_bf16": {
            "lowrank": lambda p, s, w, a, b, l: ops.merge_lora(p, a, b, SCALING, quant_state=s,
                                                               dtype=torch.bfloat16),
            "nf4_dequantize_pass": lambda p, s, w, a, b, l: nf4.dequantize(p, s),
            "reference": lambda p, s, w, a, b, l: reference.merge_lora(
                p, a, b, SCALING, quant_state=s, dtype=torch.bfloat16)},
        "lora_dense": {
            "lowrank": lambda p, s, w, a, b, l: ops.merge_lora(w, a, b, SCALING),
            "reference": lambda p, s, w, a, b, l: reference.merge_lora(w, a, b, SCALING)},
        "ia3_nf4": {
            "lowrank": lambda p, s, w, a, b, l: ops.merge_ia3(p, l, quant_state=s)[0],
            "nf4_dequantize_pass": lambda p, s, w, a, b, l: nf4.dequantize(p, s),
            "reference": lambda p, s, w, a, b, l: reference.merge_ia3(p, l, quant_state=s)[0]},
    }
    cases = []
    for n, k in shapes:
        inputs = runner.rotating(lambda: make_inputs(runner.device, n, k), 3 * n * k)
        for kind, fns in ways.items():
            args = next(inputs)
            expected = fns["reference"](*args)
            got = fns["lowrank"](*args)
            if isinstance(expected, tuple):  # NF4 results: the packed bytes, bit for bit
                check_outputs(f"merge {kind}", got[0].view(torch.uint8), expected[0].view(torch.uint8))
            else:
                check_outputs(f"merge {kind}", got, expected)
            timings = {name: runner.time(fn, inputs) for name, fn in fns.items()}
            cases.append({"op": "merge", "shape": [n, k], "params": {"kind": kind, "rank": RANK},
                          "timings_ms": timings, "metrics": headline_metrics(timings, floors)})
    _add_stack_metric(cases)
    return cases


def _add_stack_metric(cases):
    """On the lowrank NF4 LoRA merge case of the largest shape: seconds to merge every projection
    of a Llama-3-8B stack, when every block shape was timed in this run."""
    timed = {tuple(c["shape"]): c for c in cases if c["params"]["kind"] == "lora_nf4"}
    if not all(shape in timed for shape in LLAMA3_8B_BLOCK):
        return
    per_block_ms = sum(timed[shape]["timings_ms"]["lowrank"]["median"] for shape in LLAMA3_8B_BLOCK)
    largest = timed[max(timed, key=lambda shape: shape[0] * shape[1])]
    largest["metrics"]["llama3_8b_stack_s"] = per_block_ms * LLAMA3_8B_BLOCKS / 1e3
