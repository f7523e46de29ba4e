"""Fused LoRA attention projections: q, k and v, three LoRA / QLoRA linears over one input x, as
one autograd Function.

Unfused, each projection's autograd node keeps x (one storage, three references) and its S. The
Function keeps x once and the three S, which come out of one shrink over x for the three A
matrices concatenated (``lowrank.ops.lora_steps``; a projection with dropout shrinks alone, with
its own mask). Backward sums dX over the three projections and computes their dA in one
dS^T x product per shrink group. Every GEMM is a LoRA linear custom op, so each weight kind works.
"""

import torch

from lowrank import reference
from lowrank.lora_projection import check_lora_qkv_args
from lowrank.ops.gradients import InputGradients
from lowrank.ops.lora import lora_output_grad
from lowrank.ops.lora_steps import (expand, grad_input, grad_lora_As, projection_runs,
                                    runs_to_save, saved_runs, shrinks)

__all__ = ["LoraQKVFunction", "lora_qkv"]

NAMES = ("q", "k", "v")


class LoraQKVFunction(torch.autograd.Function):
    """The fused q, k and v LoRA projections as an autograd Function:

        q, k, v = LoraQKVFunction.apply(x, q_run, k_run, v_run, q_lora_A, q_lora_B, q_bias,
                                        k_lora_A, k_lora_B, k_bias, v_lora_A, v_lora_B, v_bias)

    - ``x``: contiguous (M x K); ``q_run``, ``k_run``, ``v_run``:
      ``lowrank.ops.lora_steps.ProjectionRun``s (frozen weight, scaling, dropout, seed); adapters
      and biases (or None) as inputs of their own, for their gradients.
    - Arguments are used as given: ``lora_qkv`` is the checked entry point.

    Saves x once, the three S and seeds, the adapters and the frozen weights as stored.
    """

    @staticmethod
    def forward(ctx, x, q_run, k_run, v_run, q_lora_A, q_lora_B, q_bias, k_lora_A, k_lora_B,
                k_bias, v_lora_A, v_lora_B, v_bias):
        runs = (q_run, k_run, v_run)
        lora_As, lora_Bs = (q_lora_A, k_lora_A, v_lora_A), (q_lora_B, k_lora_B, v_lora_B)
        biases = (q_bias, k_bias, v_bias)
        ss = shrinks(x, lora_As, runs)
        outputs = tuple(expand(x, s, lora_B, run, bias)
                        for s, lora_B, run, bias in zip(ss, lora_Bs, runs, biases))
        ctx.save_for_backward(x, *ss, *lora_As, *lora_Bs, *runs_to_save(ctx, runs))
        ctx.bias_dtypes = [None if b is None else b.dtype for b in biases]
        return outputs

    @staticmethod
    def backward(ctx, *grad_ys):
        x, *rest = ctx.saved_tensors
        ss, lora_As, lora_Bs = rest[:3], rest[3:6], rest[6:9]
        runs = saved_runs(ctx, rest[9:], lora_As, lora_Bs)
        need = _QKV_GRADIENTS.needed(ctx)
        grad_ys = [grad.contiguous() for grad in grad_ys]
        grad_ss, grad_Bs = zip(*(lora_output_grad(grad, s, lora_B, run.scaling)
                                 for grad, lora_B, run, s in zip(grad_ys, lora_Bs, runs, ss)))
        grads = {}
        if need["x"]:
            grads["x"] = grad_input(grad_ys, grad_ss, lora_As, runs)
        grad_As = grad_lora_As(grad_ss, x, lora_As, runs, [need[f"{n}_lora_A"] for n in NAMES])
        for name, grad_A, grad_B, grad, lora_B, bias_dtype in zip(
                NAMES, grad_As, grad_Bs, grad_ys, lora_Bs, ctx.bias_dtypes):
            grads[f"{name}_lora_A"] = grad_A
            if need[f"{name}_lora_B"]:
                grads[f"{name}_lora_B"] = grad_B.to(lora_B.dtype)
            if need[f"{name}_bias"]:
                grads[f"{name}_bias"] = grad.sum(0).to(bias_dtype)
        return _QKV_GRADIENTS.by_position(**grads)


_QKV_GRADIENTS = InputGradients(
    LoraQKVFunction, "x", *(f"{name}_{part}" for name in NAMES
                            for part in ("lora_A", "lora_B", "bias")))


def lora_qkv(x, q, k, v):
    """Fused LoRA q, k and v projections of one input: ``(q(x), k(x), v(x))``, each of q, k and v
    a ``LoraProjection`` (a ``lora_linear`` but its input).

    - ``x``: (..., K), fp32/fp16/bf16; each output has x's shape but its projection's out
      features, and x's dtype.
    - Gradients flow to x and to every adapter and bias that requires grad; frozen weights are
      frozen (a dense one that requires grad is an error).
    - Same results as the three ``lora_linear``s; with dropout each projection draws its own mask
      from torch's RNG as its ``lora_linear`` would, in the order q, k, v.
    """
    projections = check_lora_qkv_args(x, q, k, v)
    tensors = {f"{name}_{part}": getattr(p, part) for name, p in zip(NAMES, projections)
               for part in ("lora_A", "lora_B", "bias")}
    if (not all(p.weight.use_kernels(x=x, **tensors) for p in projections) or x.numel() == 0
            or any(p.weight.out_features == 0 for p in projections)):
        return reference.lora_qkv(x, *projections)
    x2 = x.reshape(-1, projections[0].weight.in_features).contiguous()
    runs = projection_runs(x, projections)
    outputs = LoraQKVFunction.apply(x2, *runs, *tensors.values())
    return tuple(y.reshape(*x.shape[:-1], p.weight.out_features)
                 for y, p in zip(outputs, projections))
