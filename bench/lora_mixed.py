"""Mixed-adapter batches (QLoRA: NF4 double-quant base, blocksize 64, bf16, rank 16): one forward
whose rows use different adapters, inference.

A shape is (rows, K, N, adapters): the rows are spread over the adapters round-robin. Timed, each
checked against ``lowrank.reference.lora_mixed`` before it is timed (except the one-adapter
baseline, which computes another output):

- ``lowrank``: ``lowrank.ops.lora_mixed`` (base GEMM once; shrink / expand gathered per row, or per
  segment of rows sharing an adapter for prefill-sized batches: the case's ``path``).
- ``lowrank_one_adapter``: ``lowrank.ops.lora_linear`` with one adapter for every row: what the
  same batch costs without mixing (issue 20's target: mixed at most 1.3x this at 16 rows over 16
  adapters).
- ``peft_masks``: what PEFT's ``adapter_names=`` runs: bitsandbytes' base layer once, then per
  adapter in the batch its rows selected by a mask, its LoRA branch, and the result added back.
- ``reference``: ``lowrank.reference.lora_mixed``.
"""

import torch

from bench.harness import check_all, headline_metrics

RANK, SCALING, BLOCKSIZE = 16, 2.0, 64
K, N = 4096, 4096
# Decode (16 rows), 64 rows, and prefill (1024 rows: the segmented path from 16 rows per adapter
# on, lowrank.kernels.lora_mixed.segmented; 256 rows over 64 adapters: the per-row path, the other
# side of that PROVISIONAL crossover).
SHAPES = ([(16, K, N, adapters) for adapters in (1, 4, 16)]
          + [(64, K, N, adapters) for adapters in (1, 4, 16, 64)]
          + [(1024, K, N, adapters) for adapters in (1, 4, 16, 64)] + [(256, K, N, 64)])
QUICK_SHAPES = [(16, K, N, 16), (1024, K, N, 16)]


def make_inputs(device, m, k, n, adapters):
    """x, the NF4 weight (packed, state), A (adapters x r x K), B (adapters x N x r), the per-row
    adapter index, the scalings."""
    from lowrank import nf4

    dtype = torch.bfloat16
    packed, state = nf4.quantize(torch.randn(n, k, device=device, dtype=dtype) * 0.02,
                                 blocksize=BLOCKSIZE, double_quant=True)
    x = torch.randn(m, k, device=device, dtype=dtype)
    lora_a = torch.randn(adapters, RANK, k, device=device, dtype=dtype) / k**0.5
    lora_b = torch.randn(adapters, n, RANK, device=device, dtype=dtype) * 0.02
    index = torch.arange(m, device=device) % adapters
    scalings = torch.full((adapters,), SCALING, device=device)
    return x, packed, state, lora_a, lora_b, index, scalings


def forward_fns():
    import bitsandbytes as bnb

    from lowrank import ops, reference

    def peft_masks(x, packed, state, lora_a, lora_b, index, scalings):
        # PEFT's LoraLayer._mixed_batch_forward: a mask over the batch per adapter it names.
        y = bnb.matmul_4bit(x, packed.t(), quant_state=state)
        for adapter in index.unique().tolist():
            rows = index == adapter
            y[rows] += (x[rows] @ lora_a[adapter].t()) @ lora_b[adapter].t() * SCALING
        return y

    return {
        "lowrank": lambda x, packed, state, lora_a, lora_b, index, scalings: ops.lora_mixed(
            x, packed, lora_a, lora_b, scalings, index, quant_state=state),
        "lowrank_one_adapter": lambda x, packed, state, lora_a, lora_b, index, scalings:
            ops.lora_linear(x, packed, lora_a[0], lora_b[0], SCALING, quant_state=state),
        "peft_masks": peft_masks,
        "reference": lambda x, packed, state, lora_a, lora_b, index, scalings: reference.lora_mixed(
            x, packed, lora_a, lora_b, scalings, index, quant_state=state),
    }


def _no_grad(fn):
    def call(*args):
        with torch.no_grad():
            return fn(*args)
    return call


def path(rows, adapters):
    """The kernels ``lowrank.ops.lora_mixed`` runs for the case (lowrank.kernels.lora_mixed)."""
    from lowrank.kernels import lora_mixed

    if lora_mixed.segmented(rows, adapters):
        return "segmented"
    return "decode" if rows <= lora_mixed.DECODE_MAX_M else "gathered"


def run(runner, floors, shapes):
    cases = []
    fns = forward_fns()
    for m, k, n, adapters in shapes:
        # The packed weight and its absmax, x and y, and the A and B of every adapter.
        bytes_read = (n * k // 2 + n * k // BLOCKSIZE + 2 * (m * k + m * n)
                      + 2 * min(m, adapters) * RANK * (k + n))
        inputs = runner.rotating(lambda: make_inputs(runner.device, m, k, n, adapters), bytes_read)
        args = next(inputs)
        with torch.no_grad():
            check_all(fns, args, fns["reference"](*args),
                      skip=("lowrank_one_adapter",) if adapters > 1 else ())
        timings = {name: runner.time(_no_grad(fn), inputs) for name, fn in fns.items()}
        cases.append({"op": "lora_mixed_forward", "shape": [m, k, n, adapters],
                      "params": {"base": "nf4", "dtype": "bfloat16", "rank": RANK,
                                 "blocksize": BLOCKSIZE, "double_quant": True,
                                 "adapters": adapters, "path": path(m, adapters)},
                      "timings_ms": timings,
                      "metrics": headline_metrics(timings, floors, bytes_read=bytes_read)})
    return cases
