"""IA3 linear (bf16; NF4 double-quant base, blocksize 64, or a dense bf16 base): lowrank vs the
plain GEMM floor, bitsandbytes + PEFT's IA3 formula, and the reference, measured in one run.

Both forms: output (``y = (x W^T) * l``, attention-style layers) and feed-forward
(``y = (x * l) W^T``). Forward and forward + backward (gradients of x and l) with peak memory,
at the training shapes of the LoRA linear case. ``bnb_peft`` is what PEFT's IA3 layers run:
``matmul_4bit`` (or F.linear on a dense base) with the scale applied by a separate multiply.
``lowrank`` is the route lowrank chooses per call (``lowrank.routes``); ``lowrank_fused`` and
``lowrank_cublas`` are each route forced, backward included (the shapes here have too many rows
for the decode route).
"""

import torch

from bench.harness import check_all, timed_case
from bench.lora_linear import BLOCKSIZE, PROJECTIONS, forced

ROUTES = ("fused", "cublas")

SHAPES = [(4096, k, n) for k, n in PROJECTIONS]
QUICK_SHAPES = [(4096, 4096, 14336)]


def make_inputs(device, m, k, n):
    """x, the NF4 weight (packed, state), its dense bf16 values, l of each form (fp32, as PEFT
    keeps it), dY."""
    from lowrank import nf4

    w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
    packed, state = nf4.quantize(w, blocksize=BLOCKSIZE, double_quant=True)
    dense = nf4.dequantize(packed, state)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16).requires_grad_()
    scales = {False: 1 + 0.1 * torch.randn(n, 1, device=device),
              True: 1 + 0.1 * torch.randn(1, k, device=device)}
    for scale in scales.values():
        scale.requires_grad_()
    return x, packed, state, dense, scales, torch.randn(m, n, device=device, dtype=torch.bfloat16)


def forward_fns(base, feedforward):
    """name -> f(x, packed, state, dense, l) computing Y."""
    import bitsandbytes as bnb

    from lowrank import ops, reference

    def base_product(x, packed, state, dense):
        if base == "dense":
            return torch.nn.functional.linear(x, dense)
        return bnb.matmul_4bit(x, packed.t(), quant_state=state)

    def peft(x, packed, state, dense, scale):
        if feedforward:  # PEFT's feed-forward IA3: the input scaled, then the base layer
            return base_product((x * scale).to(x.dtype), packed, state, dense)
        return (base_product(x, packed, state, dense) * scale.t()).to(x.dtype)

    def ours(x, packed, state, dense, scale):
        if base == "dense":
            return ops.ia3_linear(x, dense, scale, feedforward=feedforward)
        return ops.ia3_linear(x, packed, scale, feedforward=feedforward, quant_state=state)

    def ref(x, packed, state, dense, scale):
        if base == "dense":
            return reference.ia3_linear(x, dense, scale, feedforward=feedforward)
        return reference.ia3_linear(x, packed, scale, feedforward=feedforward, quant_state=state)

    return {"lowrank": ours, "bf16_gemm_floor": lambda x, packed, state, dense, scale: x @ dense.t(),
            "bnb_peft" if base == "nf4" else "peft": peft, "reference": ref}


def run(runner, floors, shapes):
    cases = []
    for m, k, n in shapes:
        bytes_per_set = n * k // 2 + 2 * (n * k + m * k + m * n)
        inputs = runner.rotating(lambda: make_inputs(runner.device, m, k, n), bytes_per_set)
        for base in ("nf4", "dense"):
            for feedforward in (False, True):
                fns = forward_fns(base, feedforward)

                def timed(fn, backward):
                    def call(x, packed, state, dense, scales, grad_y):
                        scale = scales[feedforward]
                        if not backward:
                            with torch.no_grad():
                                return fn(x, packed, state, dense, scale)
                        y = fn(x, packed, state, dense, scale)
                        return torch.autograd.grad(y, (x, scale), grad_y, allow_unused=True)
                    return call

                x, packed, state, dense, scales, _ = next(inputs)
                args = (x, packed, state, dense, scales[feedforward])
                with torch.no_grad():
                    check_all({**fns, **{f"lowrank_{route}": forced(route, fns["lowrank"])
                                         for route in ROUTES}}, args, fns["reference"](*args))
                params = {"base": base, "form": "feedforward" if feedforward else "output",
                          "dtype": "bfloat16"}
                for op, backward, flops in (("ia3_linear_forward", False, 2 * m * n * k),
                                            ("ia3_linear_forward_backward", True, 4 * m * n * k)):
                    calls = {name: timed(fn, backward) for name, fn in fns.items()}
                    calls.update({f"lowrank_{route}": forced(route, calls["lowrank"])
                                  for route in ROUTES})
                    cases.append(timed_case(runner, op, [m, k, n], params, calls, inputs, floors,
                                            flops, backward))
    return cases
