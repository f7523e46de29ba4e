"""DoRA linear (bf16; NF4 double-quant base, blocksize 64, or a dense bf16 base; rank 16): lowrank vs
PEFT's DoRA and against lowrank's own LoRA on the same shapes, measured in one run; and a whole
DoRA training step (``bench.train_step``'s model with ``use_dora=True``).

Baselines, each checked against ``lowrank.reference.dora_linear`` before it is timed:
- ``peft``: PEFT's ``DoraLinearLayer.forward`` written out on the same tensors: the base layer's
  output (``matmul_4bit`` or F.linear), the weight dequantized again and the norm of
  W + s B A formed in memory on every call, then ``(g - 1) * base + g * s * lora``.
- ``lowrank_lora``: ``ops.lora_linear`` on the same weight: the cost DoRA adds to ours is
  lowrank / lowrank_lora (the issue's target: a training step at most 1.10x LoRA's).
- ``reference``: ``lowrank.reference.dora_linear``.

``lowrank`` is the route lowrank chooses per call (``lowrank.routes``); ``lowrank_fused``,
``lowrank_cublas`` and, at M <= ``DECODE_MAX_M``, ``lowrank_decode`` are each route forced,
backward included: the fused GEMM with DoRA's epilogue (g and the bias applied to the tile before
its one store, the product for dm stored beside it) against LoRA's product by cuBLAS or the decode
kernel followed by one elementwise pass for g and the bias.

Forward and forward + backward (gradients of x, A, B and m) with peak memory, at the training
shapes of the LoRA linear case and at 16 rows (the decode route).
"""

import torch

from bench import train_step
from bench.harness import check_all, timed_case
from bench.lora_linear import BLOCKSIZE, PROJECTIONS, RANK, SCALING, forced, route_names

SHAPES = ([(4096, k, n) for k, n in PROJECTIONS] + [(16, 4096, 14336)]
          + [train_step.SHAPES[0]])
QUICK_SHAPES = [(4096, 4096, 14336), train_step.QUICK_SHAPES[0]]


def make_inputs(device, m, k, n):
    """x, the NF4 weight (packed, state), its dense bf16 values, A, B, m (fp32, as PEFT keeps them),
    dY."""
    from lowrank import nf4, reference

    w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
    packed, state = nf4.quantize(w, blocksize=BLOCKSIZE, double_quant=True)
    dense = nf4.dequantize(packed, state)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16).requires_grad_()
    lora_a = (torch.randn(RANK, k, device=device) / k**0.5).requires_grad_()
    lora_b = (torch.randn(n, RANK, device=device) * 0.02).requires_grad_()
    norm = reference.dora_norm(dense, lora_a, lora_b, SCALING)
    magnitude = (norm * (1 + 0.1 * torch.randn(n, device=device))).requires_grad_()
    grad_y = torch.randn(m, n, device=device, dtype=torch.bfloat16)
    return x, packed, state, dense, lora_a, lora_b, magnitude, grad_y


def forward_fns(base):
    """name -> f(x, packed, state, dense, A, B, m) computing Y."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional

    from lowrank import ops, reference

    def weight_args(packed, state, dense):
        return (dense, None) if base == "dense" else (packed, state)

    def peft(x, packed, state, dense, a, b, m):
        if base == "dense":
            base_result, weight = torch.nn.functional.linear(x, dense), dense
        else:
            base_result = bnb.matmul_4bit(x, packed.t(), quant_state=state)
            weight = bnb_functional.dequantize_4bit(packed, state)  # dequantize_module_weight
        lora_weight = (b @ a).to(x.dtype)
        norm = torch.linalg.norm(weight + SCALING * lora_weight, dim=1).to(weight.dtype).detach()
        scale = (m / norm).view(1, -1)
        lora = (x @ a.t().to(x.dtype)) @ b.t().to(x.dtype)
        return ((scale - 1) * base_result + scale * lora * SCALING).to(x.dtype) + base_result

    def ours(x, packed, state, dense, a, b, m):
        weight, quant_state = weight_args(packed, state, dense)
        return ops.dora_linear(x, weight, a, b, m, SCALING, quant_state=quant_state)

    def ours_lora(x, packed, state, dense, a, b, m):
        weight, quant_state = weight_args(packed, state, dense)
        return ops.lora_linear(x, weight, a, b, SCALING, quant_state=quant_state)

    def ref(x, packed, state, dense, a, b, m):
        weight, quant_state = weight_args(packed, state, dense)
        return reference.dora_linear(x, weight, a, b, m, SCALING, quant_state=quant_state)

    return {"lowrank": ours, "peft": peft, "lowrank_lora": ours_lora, "reference": ref}


def layer_cases(runner, floors, m, k, n):
    cases = []
    bytes_per_set = n * k // 2 + 2 * (n * k + m * k + m * n)
    inputs = runner.rotating(lambda: make_inputs(runner.device, m, k, n), bytes_per_set)
    for base in ("nf4", "dense"):
        fns = forward_fns(base)

        def timed(fn, backward):
            def call(x, packed, state, dense, a, b, magnitude, grad_y):
                if not backward:
                    with torch.no_grad():
                        return fn(x, packed, state, dense, a, b, magnitude)
                y = fn(x, packed, state, dense, a, b, magnitude)
                return torch.autograd.grad(y, (x, a, b, magnitude), grad_y, allow_unused=True)
            return call

        x, packed, state, dense, a, b, magnitude, _ = next(inputs)
        args = (x, packed, state, dense, a, b, magnitude)
        with torch.no_grad():
            # lowrank_lora computes LoRA, not DoRA: timed beside, not checked against DoRA.
            check_all({**{k: f for k, f in fns.items() if k != "lowrank_lora"},
                       **{f"lowrank_{route}": forced(route, fns["lowrank"])
                          for route in route_names(m)}}, args, fns["reference"](*args))
        params = {"base": base, "dtype": "bfloat16", "rank": RANK}
        # Forward: x W^T and LoRA's products, plus the norm pass (2 N K r for s B A); backward
        # adds dX (2 M N K) and LoRA's gradients.
        forward_flops = 2 * m * n * (k + RANK) + 2 * m * k * RANK + 2 * n * k * RANK
        for op, backward, flops in (
                ("dora_linear_forward", False, forward_flops),
                ("dora_linear_forward_backward", True,
                 forward_flops + 2 * m * n * k + 4 * m * RANK * (n + k))):
            calls = {name: timed(fn, backward) for name, fn in fns.items()}
            calls.update({f"lowrank_{route}": forced(route, calls["lowrank"])  # backward included
                          for route in route_names(m)})
            cases.append(timed_case(runner, op, [m, k, n], params, calls, inputs, floors, flops,
                                    backward))
    return cases


def run(runner, floors, shapes):
    cases = []
    for shape in shapes:
        if len(shape) == 3:
            cases += layer_cases(runner, floors, *shape)
        else:  # (batch, sequence, hidden, layers, intermediate): the whole training step
            cases.append(train_step.step_case(runner, floors, shape, use_dora=True))
    return cases
