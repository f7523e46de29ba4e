"""QLoRA linear (NF4 double-quant base, blocksize 64, bf16, rank 16): lowrank vs the ways it is done
today, measured in one run.

Baselines, each checked against ``lowrank.reference`` before it is timed:
- ``bf16_gemm_floor``: cuBLAS x W^T with a dense bf16 W of the same shape (no LoRA): what QLoRA
  would cost if the 4-bit weight and the adapter were free.
- ``bnb_peft``: bitsandbytes ``matmul_4bit`` plus PEFT's LoRA formula, what PEFT's Linear4bit runs.
- ``dequant_cublas``: NF4 dequantized (by lowrank) into a reused bf16 buffer, cuBLAS GEMM, then the
  LoRA expand accumulated with ``addmm_``: the composition a large-M path could use instead of ours.
- ``reference``: ``lowrank.reference.lora_linear``.

Training cases (M = 4096 tokens) time forward and forward + backward (gradients of x, A and B) and
record peak memory. Decode cases (M = 1..64, forward without grad) also time the two lowrank paths
forced (``lowrank_tiled``, ``lowrank_decode``): they are what sets ``DECODE_MAX_M``.
"""

import torch

from bench.harness import check_outputs

RANK, SCALING, BLOCKSIZE = 16, 2.0, 64
# (M, K, N): Llama-3-8B attention and MLP projections, 4096 tokens a step.
TRAIN_SHAPES = [(4096, 4096, 4096), (4096, 4096, 14336), (4096, 14336, 4096)]
DECODE_SHAPES = [(m, k, n) for k, n in ((4096, 4096), (4096, 14336)) for m in (1, 4, 16, 32, 64)]
SHAPES = TRAIN_SHAPES + DECODE_SHAPES
QUICK_SHAPES = [(4096, 4096, 14336), (1, 4096, 14336)]
TRAIN_MIN_M = 256  # shapes with fewer rows are decode cases


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


def forward_fns():
    """name -> f(x, packed, state, dense, A, B, buffer) computing Y, for each way of doing it."""
    import bitsandbytes as bnb

    from lowrank import nf4, ops, reference

    def ours(x, packed, state, dense, a, b, buffer):
        return ops.lora_linear(x, packed, a, b, SCALING, quant_state=state)

    def floor(x, packed, state, dense, a, b, buffer):
        return torch.matmul(x, dense.t())

    def bnb_peft(x, packed, state, dense, a, b, buffer):
        # PEFT's Linear4bit: the base layer, then lora_B(lora_A(dropout(x))) * scaling added.
        return bnb.matmul_4bit(x, packed.t(), quant_state=state) + (x @ a.t()) @ b.t() * SCALING

    def dequant_cublas(x, packed, state, dense, a, b, buffer):
        y = torch.matmul(x, nf4.dequantize(packed, state, out=buffer).t())
        return y.addmm_(x @ a.t(), b.t(), alpha=SCALING)

    def ref(x, packed, state, dense, a, b, buffer):
        return reference.lora_linear(x, packed, a, b, SCALING, quant_state=state)

    return {"lowrank": ours, "bf16_gemm_floor": floor, "bnb_peft": bnb_peft,
            "dequant_cublas": dequant_cublas, "reference": ref}


def forced_path_fns():
    """The two lowrank forward paths, called directly whatever M is (for the decode crossover)."""
    from lowrank import ops
    from lowrank.kernels import lora_linear as tiled
    from lowrank.kernels import lora_linear_decode as decode

    def launch(path):
        def fn(x, packed, state, dense, a, b, buffer):
            weight, *nf4_args = ops.weight_op_args(None, packed.view(torch.uint8).reshape(-1), state)
            nf4 = ops._nf4_decoding(*nf4_args, x.shape[1])
            seed = torch.zeros(1, dtype=torch.int64, device=x.device)
            y = torch.empty(x.shape[0], b.shape[0], dtype=x.dtype, device=x.device)
            s = torch.empty(x.shape[0], RANK, dtype=x.dtype, device=x.device)
            if path == "decode":
                decode.lora_decode_forward(x, weight, a, b, None, y, s, seed, 0.0, SCALING, nf4)
            else:
                tiled.lora_shrink(x, a, s, seed, 0.0)
                tiled.lora_forward(x, weight, s, b, None, y, SCALING, nf4)
            return y
        return fn

    fns = {"lowrank_tiled": launch("tiled")}
    return fns, {"lowrank_decode": launch("decode")}, decode.DECODE_MAX_M


def with_backward(forward):
    """Forward + backward: the gradients of x, A and B (x's alone for the floor, which has no A, B)."""
    def fn(x, packed, state, dense, a, b, grad_y, buffer):
        y = forward(x, packed, state, dense, a, b, buffer)
        return torch.autograd.grad(y, (x, a, b), grad_y, allow_unused=True)
    return fn


def _guard(fns, args, expected):
    # bf16 outputs of K-long sums: allow a few bf16 ulps of the largest value.
    atol = 2e-2 * expected.abs().max().item()
    for name, fn in fns.items():
        if name != "bf16_gemm_floor":  # no LoRA term: compared with its own dense GEMM
            check_outputs(name, fn(*args), expected, atol=atol, rtol=1e-2)


def _metrics(timings, floors, bytes_read=None, flops=None):
    """Speedups over every baseline; ours as a % of the device's copy bandwidth (decode, from the
    bytes it must read) or of its bf16 GEMM rate (training, from the flops it must do)."""
    ms = timings["lowrank"]["median"]
    metrics = {f"speedup_vs_{name}": t["median"] / ms for name, t in timings.items()
               if name != "lowrank"}
    if bytes_read is not None:  # bytes per ms / 1e6 = GB/s
        metrics["pct_copy_bandwidth"] = 100 * bytes_read / ms / 1e6 / floors["copy_bandwidth_gbps"]
    if flops is not None:  # flops per ms / 1e9 = TFLOP/s
        metrics["pct_bf16_gemm_rate"] = 100 * flops / ms / 1e9 / floors["bf16_gemm_tflops"]
    return metrics


def _no_grad(fn):
    """A forward timed as inference: the shared signature of timed calls, no autograd graph."""
    def call(x, packed, state, dense, a, b, grad_y, buffer):
        with torch.no_grad():
            return fn(x, packed, state, dense, a, b, buffer)
    return call


def run(runner, floors, shapes):
    forwards = forward_fns()
    tiled, decode, decode_max_m = forced_path_fns()
    cases = []
    for m, k, n in shapes:
        train = m >= TRAIN_MIN_M
        weight_bytes = n * k // 2 + n * k // BLOCKSIZE
        bytes_read = weight_bytes + 2 * (m * k + m * n)
        inputs = runner.rotating(lambda: make_inputs(runner.device, m, k, n, train), bytes_read)
        x, packed, state, dense, a, b, grad_y, buffer = next(inputs)
        args = (x, packed, state, dense, a, b, buffer)
        with torch.no_grad():
            expected = forwards["reference"](*args)
        params = {"dtype": "bfloat16", "rank": RANK, "blocksize": BLOCKSIZE, "double_quant": True}
        fns = dict(forwards)
        if not train:
            fns.update(tiled)
            if m <= decode_max_m:
                fns.update(decode)
        with torch.no_grad():
            _guard(fns, args, expected)

        timings = {name: runner.time(_no_grad(fn), inputs) for name, fn in fns.items()}
        rate = {"flops": 2 * m * n * (k + RANK)} if train else {"bytes_read": bytes_read}
        cases.append({"op": "lora_linear_forward", "shape": [m, k, n],
                      "params": {**params, "path": "train" if train else "decode"},
                      "timings_ms": timings,
                      "metrics": _metrics(timings, floors, **rate)})
        if not train:
            continue
        backward_fns = {name: with_backward(fn) for name, fn in forwards.items()
                        if name != "reference"}  # the reference's backward is torch autograd
        timings = {name: runner.time(fn, inputs) for name, fn in backward_fns.items()}
        memory = {name: runner.peak_memory_bytes(fn, inputs) for name, fn in backward_fns.items()}
        # Forward 2mnk, backward dX 2mnk (the frozen base has no weight gradient), plus LoRA's.
        flops = 4 * m * n * k + 6 * m * RANK * (n + k)
        cases.append({"op": "lora_linear_forward_backward", "shape": [m, k, n], "params": params,
                      "timings_ms": timings, "peak_memory_bytes": memory,
                      "metrics": _metrics(timings, floors, flops=flops)})
    return cases
