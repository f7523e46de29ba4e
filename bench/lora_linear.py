"""QLoRA linear (NF4 double-quant base, blocksize 64, bf16, rank 16): lowrank vs the ways it is done
today, measured in one run.

Baselines, each checked against ``lowrank.reference`` before it is timed:
- ``bf16_gemm_floor``: cuBLAS x W^T with a dense bf16 W of the same shape (no LoRA): what QLoRA
  would cost if the 4-bit weight and the adapter were free.
- ``bnb_peft``: bitsandbytes ``matmul_4bit`` plus PEFT's LoRA formula, what PEFT's Linear4bit runs
  (its ``result.clone()`` included). matmul_4bit's ``gemm_4bit`` (bitsandbytes 0.50) runs its own
  fused kernel up to 4 rows, decides by a per-architecture heuristic up to 1536, and dequantizes
  + ``F.linear`` above; ``bench.static`` models this baseline (``launches.bnb_peft_ops``).
- ``dequant_cublas``: NF4 dequantized (by lowrank) into a reused bf16 buffer, cuBLAS GEMM, then the
  LoRA expand accumulated with ``addmm_``, composed by hand (``lowrank_cublas`` is the same inside
  lowrank's op: the gap between them is the op's overhead).
- ``reference``: ``lowrank.reference.lora_linear``.

Training cases (M >= 256 tokens) time forward and forward + backward (gradients of x, A and B) and
record peak memory; at M = 4096 the same cases also run on a dense bf16 base (``peft`` is then
F.linear plus PEFT's LoRA branch). Decode cases (M = 1..64) time the forward without grad.

``lowrank`` is the route lowrank chooses per call (``lowrank.routes``: on a GPU, calibrated the
first time it meets a shape, which happens in the guard's call, before timing). Every case also
times each route forced: ``lowrank_fused``, ``lowrank_cublas`` (dequantize + cuBLAS inside
lowrank) and, at M <= ``DECODE_MAX_M``, ``lowrank_decode``: what the default rule
(``routes.FUSED_MAX_M``) and ``DECODE_MAX_M`` are to be checked against.
"""

import torch

from bench.harness import check_all, headline_metrics

RANK, SCALING, BLOCKSIZE = 16, 2.0, 64
# (K, N): Llama-3-8B's projections. M: tokens per call, from decode (1) to a large training batch.
PROJECTIONS = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]
DECODE_M = (1, 4, 16, 32, 64)
TRAIN_M = (256, 4096, 16384)
TRAIN_MIN_M = TRAIN_M[0]  # fewer rows: a decode case (forward, no grad)
SHAPES = [(m, k, n) for k, n in PROJECTIONS for m in DECODE_M + TRAIN_M]
QUICK_SHAPES = [(4096, 4096, 14336), (1, 4096, 14336)]
# Dense-base LoRA (a bf16 W, no NF4) is timed at the training shapes with this M.
DENSE_BASE_M = 4096


def make_inputs(device, m, k, n, requires_grad):
    """x, the NF4 weight (packed, state), its dense bf16 values, A, B, dY, a dequantize buffer."""
    from lowrank import nf4

    dtype = torch.bfloat16
    w = torch.randn(n, k, device=device, dtype=dtype) * 0.02
    packed, state = nf4.quantize(w, blocksize=BLOCKSIZE, double_quant=True)
    dense = nf4.dequantize(packed, state)
    x = torch.randn(m, k, device=device, dtype=dtype).requires_grad_(requires_grad)
    lora_a = (torch.randn(RANK, k, device=device, dtype=dtype) / k**0.5).requires_grad_(requires_grad)
    lora_b = (torch.randn(n, RANK, device=device, dtype=dtype) * 0.02).requires_grad_(requires_grad)
    grad_y = torch.randn(m, n, device=device, dtype=dtype)
    return x, packed, state, dense, lora_a, lora_b, grad_y, torch.empty_like(dense)


def forward_fns(base):
    """name -> f(x, packed, state, dense, A, B, buffer) computing Y, for each way of doing it, on an
    NF4 base (``base="nf4"``) or on its dense bf16 values (``"dense"``)."""
    import bitsandbytes as bnb

    from lowrank import nf4, ops, reference

    def lora(x, a, b):  # PEFT's LoRA branch: lora_B(lora_A(dropout(x))) * scaling
        return (x @ a.t()) @ b.t() * SCALING

    def floor(x, packed, state, dense, a, b, buffer):
        return torch.matmul(x, dense.t())

    if base == "dense":
        return {
            "lowrank": lambda x, packed, state, dense, a, b, buffer: ops.lora_linear(
                x, dense, a, b, SCALING),
            "bf16_gemm_floor": floor,
            "peft": lambda x, packed, state, dense, a, b, buffer: (
                torch.nn.functional.linear(x, dense) + lora(x, a, b)),
            "reference": lambda x, packed, state, dense, a, b, buffer: reference.lora_linear(
                x, dense, a, b, SCALING),
        }

    def dequant_cublas(x, packed, state, dense, a, b, buffer):
        y = torch.matmul(x, nf4.dequantize(packed, state, out=buffer).t())
        return y.addmm_(x @ a.t(), b.t(), alpha=SCALING)

    return {
        "lowrank": lambda x, packed, state, dense, a, b, buffer: ops.lora_linear(
            x, packed, a, b, SCALING, quant_state=state),
        "bf16_gemm_floor": floor,
        # PEFT's Linear4bit: bitsandbytes' base layer, its output cloned ("defensively", PEFT's
        # comment says), then the LoRA branch added.
        "bnb_peft": lambda x, packed, state, dense, a, b, buffer: (
            bnb.matmul_4bit(x, packed.t(), quant_state=state).clone() + lora(x, a, b)),
        "dequant_cublas": dequant_cublas,
        "reference": lambda x, packed, state, dense, a, b, buffer: reference.lora_linear(
            x, packed, a, b, SCALING, quant_state=state),
    }


def route_names(m):
    """lowrank's routes at M rows (``lowrank.routes``): each is timed forced, beside ``lowrank``
    (the route the call chooses: calibrated on a GPU, the first time it sees the shape)."""
    from lowrank.kernels.lora_linear_decode import DECODE_MAX_M

    return ("fused", "cublas", "decode") if m <= DECODE_MAX_M else ("fused", "cublas")


def forced(route, fn):
    """``fn`` with lowrank's ``route`` forced, its backward included."""
    from lowrank import routes

    def call(*args):
        with routes.forced(route):
            return fn(*args)
    return call


def with_backward(forward):
    """Forward + backward: the gradients of x, A and B (x's alone for the floor, which has no A, B)."""
    def fn(x, packed, state, dense, a, b, grad_y, buffer):
        y = forward(x, packed, state, dense, a, b, buffer)
        return torch.autograd.grad(y, (x, a, b), grad_y, allow_unused=True)
    return fn


def _no_grad(fn):
    """A forward timed as inference: the shared signature of timed calls, no autograd graph."""
    def call(x, packed, state, dense, a, b, grad_y, buffer):
        with torch.no_grad():
            return fn(x, packed, state, dense, a, b, buffer)
    return call


def run(runner, floors, shapes):
    cases = []
    for m, k, n in shapes:
        train = m >= TRAIN_MIN_M
        bytes_read = n * k // 2 + n * k // BLOCKSIZE + 2 * (m * k + m * n)
        inputs = runner.rotating(lambda: make_inputs(runner.device, m, k, n, train), bytes_read)
        for base in ("nf4", "dense") if train and m == DENSE_BASE_M else ("nf4",):
            params = {"base": base, "dtype": "bfloat16", "rank": RANK}
            if base == "nf4":
                params.update(blocksize=BLOCKSIZE, double_quant=True)
            fns = forward_fns(base)
            fns.update({f"lowrank_{route}": forced(route, fns["lowrank"]) for route in route_names(m)})
            x, packed, state, dense, a, b, grad_y, buffer = next(inputs)
            args = (x, packed, state, dense, a, b, buffer)
            with torch.no_grad():
                check_all(fns, args, fns["reference"](*args))
            timings = {name: runner.time(_no_grad(fn), inputs) for name, fn in fns.items()}
            rate = {"flops": 2 * m * n * (k + RANK)} if train else {"bytes_read": bytes_read}
            cases.append({"op": "lora_linear_forward", "shape": [m, k, n],
                          "params": {**params, "path": "train" if train else "decode"},
                          "timings_ms": timings, "metrics": headline_metrics(timings, floors, **rate)})
            if not train:
                continue
            backward_fns = {name: with_backward(fn) for name, fn in fns.items()}
            for route in route_names(m):  # forced around the backward too
                backward_fns[f"lowrank_{route}"] = forced(route, with_backward(fns["lowrank"]))
            timings = {name: runner.time(fn, inputs) for name, fn in backward_fns.items()}
            memory = {name: runner.peak_memory_bytes(fn, inputs) for name, fn in backward_fns.items()}
            # Forward 2mnk and dX 2mnk (the frozen base has no weight gradient), plus LoRA's GEMMs.
            flops = 4 * m * n * k + 6 * m * RANK * (n + k)
            cases.append({"op": "lora_linear_forward_backward", "shape": [m, k, n], "params": params,
                          "timings_ms": timings, "peak_memory_bytes": memory,
                          "metrics": headline_metrics(timings, floors, flops=flops)})
    return cases
