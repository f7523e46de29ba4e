"""Fused LoRA gated MLP: ``down(act(gate(x)) * up(x))`` over three LoRA / QLoRA linears, as one
autograd Function that saves less than the three layers and the activation do unfused.

Unfused, autograd keeps x (gate and up's input), g = gate(x) (the activation's input), act(g) and
u = up(x) (the product's inputs), h = act(g) * u (down's input) and each projection's S. The
Function keeps x, g, u and the S's: act(g) and h are recomputed in backward by one elementwise
kernel (``kernels/gated_activation.py``), which also gives dg and du. Gate and up share one shrink
over x (``lowrank.ops.lora_steps``). Every GEMM is a LoRA linear custom op, so each weight kind
(dense, NF4, nested NF4) works as in ``lora_linear``; dropout draws one mask per projection, from
its own seed, as the unfused layers do, regenerated in backward.
"""

import torch

from lowrank import reference
from lowrank.kernels import gated_activation as gated_kernels
from lowrank.lora_projection import LoraProjection, check_lora_mlp_args
from lowrank.ops.gradients import InputGradients
from lowrank.ops.lora import lora_output_grad
from lowrank.ops.lora_steps import (expand, grad_input, grad_lora_As, projection_runs,
                                    runs_to_save, saved_runs, shrinks)

__all__ = ["LoraMLPFunction", "LoraProjection", "gated_activation", "gated_activation_backward",
           "lora_mlp"]


@torch.library.custom_op("lowrank::gated_activation", mutates_args=())
def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up, for contiguous gate and up of one shape and dtype."""
    h = torch.empty_like(gate)
    gated_kernels.gated_forward(gate, up, h, activation)
    return h


@gated_activation.register_fake
def _(gate, up, activation):
    return torch.empty_like(gate)


@torch.library.custom_op("lowrank::gated_activation_backward", mutates_args=())
def gated_activation_backward(grad_h: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                              activation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h = act(gate) * up recomputed, d gate, d up) from d h; all contiguous, of one shape and
    dtype."""
    h, grad_gate, grad_up = (torch.empty_like(gate) for _ in range(3))
    gated_kernels.gated_backward(grad_h, gate, up, h, grad_gate, grad_up, activation)
    return h, grad_gate, grad_up


@gated_activation_backward.register_fake
def _(grad_h, gate, up, activation):
    return tuple(torch.empty_like(gate) for _ in range(3))


class LoraMLPFunction(torch.autograd.Function):
    """The fused LoRA gated MLP as an autograd Function, for trainers that call it directly:

        y = LoraMLPFunction.apply(x, activation, gate, up, down,
                                  gate_lora_A, gate_lora_B, gate_bias, up_lora_A, up_lora_B,
                                  up_bias, down_lora_A, down_lora_B, down_bias)

    - ``x``: contiguous (M x K); ``activation``: "silu" or "gelu_tanh".
    - ``gate``, ``up``, ``down``: ``lowrank.ops.lora_steps.ProjectionRun``s (frozen weight,
      scaling, dropout, seed); their adapters and biases (or None) are passed as inputs of their
      own, since autograd gives gradients only to tensors passed to ``apply``.
    - Arguments are used as given: ``lora_mlp`` is the checked entry point.

    Saves x, g and u (the gate and up outputs), the three S and seeds, the adapters and the frozen
    weights as stored. Not act(g), not h = act(g) * u: backward recomputes them.
    """

    @staticmethod
    def forward(ctx, x, activation, gate, up, down, gate_lora_A, gate_lora_B, gate_bias,
                up_lora_A, up_lora_B, up_bias, down_lora_A, down_lora_B, down_bias):
        s_gate, s_up = shrinks(x, (gate_lora_A, up_lora_A), (gate, up))
        g = expand(x, s_gate, gate_lora_B, gate, gate_bias)
        u = expand(x, s_up, up_lora_B, up, up_bias)
        h = gated_activation(g, u, activation)
        (s_down,) = shrinks(h, (down_lora_A,), (down,))
        y = expand(h, s_down, down_lora_B, down, down_bias)
        ctx.save_for_backward(x, g, u, s_gate, s_up, s_down, gate_lora_A, gate_lora_B, up_lora_A,
                              up_lora_B, down_lora_A, down_lora_B,
                              *runs_to_save(ctx, (gate, up, down)))
        ctx.activation = activation
        ctx.bias_dtypes = [None if b is None else b.dtype for b in (gate_bias, up_bias, down_bias)]
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, g, u, s_gate, s_up, s_down, gate_A, gate_B, up_A, up_B, down_A, down_B, *rest = \
            ctx.saved_tensors
        gate, up, down = saved_runs(ctx, rest, (gate_A, up_A, down_A), (gate_B, up_B, down_B))
        need = _MLP_GRADIENTS.needed(ctx)
        grad_y = grad_y.contiguous()
        grads = {}

        # down: dS, dh (through W_down and the LoRA branch), then h recomputed with dg and du.
        grad_s_down, grad_b_down = lora_output_grad(grad_y, s_down, down_B, down.scaling)
        grad_h = grad_input((grad_y,), (grad_s_down,), (down_A,), (down,))
        h, grad_g, grad_u = gated_activation_backward(grad_h, g, u, ctx.activation)
        if need["down_lora_A"]:
            (grads["down_lora_A"],) = grad_lora_As((grad_s_down,), h, (down_A,), (down,), (True,))
        if need["down_lora_B"]:
            grads["down_lora_B"] = grad_b_down.to(down_B.dtype)
        del h, grad_h  # not needed below: free them before the gate and up GEMMs

        # gate and up: dS of each, then dX summed over both, dA per shrink group, dB.
        grad_s_gate, grad_b_gate = lora_output_grad(grad_g, s_gate, gate_B, gate.scaling)
        grad_s_up, grad_b_up = lora_output_grad(grad_u, s_up, up_B, up.scaling)
        if need["x"]:
            grads["x"] = grad_input((grad_g, grad_u), (grad_s_gate, grad_s_up), (gate_A, up_A),
                                    (gate, up))
        grads["gate_lora_A"], grads["up_lora_A"] = grad_lora_As(
            (grad_s_gate, grad_s_up), x, (gate_A, up_A), (gate, up),
            (need["gate_lora_A"], need["up_lora_A"]))
        for name, grad_b, b in (("gate", grad_b_gate, gate_B), ("up", grad_b_up, up_B)):
            if need[f"{name}_lora_B"]:
                grads[f"{name}_lora_B"] = grad_b.to(b.dtype)
        for name, grad, dtype in zip(("gate", "up", "down"), (grad_g, grad_u, grad_y),
                                     ctx.bias_dtypes):
            if need[f"{name}_bias"]:
                grads[f"{name}_bias"] = grad.sum(0).to(dtype)
        return _MLP_GRADIENTS.by_position(**grads)


_MLP_GRADIENTS = InputGradients(
    LoraMLPFunction, "x", *(f"{name}_{part}" for name in ("gate", "up", "down")
                            for part in ("lora_A", "lora_B", "bias")))


def lora_mlp(x, gate, up, down, activation="silu"):
    """Fused LoRA gated MLP: ``down(act(gate(x)) * up(x))``, each of gate, up and down a
    ``LoraProjection`` (a ``lora_linear`` but its input), for Llama-style MLPs (silu; Gemma:
    "gelu_tanh").

    - ``x``: (..., K), fp32/fp16/bf16; the output has x's shape but down's out features, and x's
      dtype. Dense weights are in x's dtype; NF4 weights compute in it.
    - Gradients flow to x and to every adapter and bias that requires grad; frozen weights are
      frozen (a dense one that requires grad is an error).
    - Same results as the three ``lora_linear``s and ``act(g) * u`` unfused, rounding aside:
      act(g) * u is computed in fp32 and rounded once. With dropout each projection draws its own
      mask from torch's RNG as its ``lora_linear`` would, in the order gate, up, down.
    """
    gate, up, down = check_lora_mlp_args(x, gate, up, down, activation)
    projections = (gate, up, down)
    tensors = {f"{name}_{part}": getattr(p, part) for name, p in zip(("gate", "up", "down"),
                                                                      projections)
               for part in ("lora_A", "lora_B", "bias")}
    if (not all(p.weight.use_kernels(x=x, **tensors) for p in projections) or x.numel() == 0
            or gate.weight.out_features == 0 or down.weight.out_features == 0):
        return reference.lora_mlp(x, gate, up, down, activation)
    x2 = x.reshape(-1, gate.weight.in_features).contiguous()
    runs = projection_runs(x, projections)
    y = LoraMLPFunction.apply(x2, activation, *runs, *tensors.values())
    return y.reshape(*x.shape[:-1], down.weight.out_features)
