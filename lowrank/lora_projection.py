"""One LoRA projection of a block (an MLP's gate, up or down; attention's q, k or v) as the block
ops take it, and the argument checks of those ops (``lowrank.ops.lora_mlp``, ``lora_qkv``), shared
with ``lowrank.reference``. Each error names the op and the projection."""

from dataclasses import dataclass, replace
from typing import Optional

import torch

from lowrank._lora_args import check_lora_args
from lowrank._quant_state import FLOAT_DTYPES

# The gated activations the fused MLP computes (kernels/gated_activation.py).
ACTIVATIONS = ("silu", "gelu_tanh")


@dataclass(frozen=True, eq=False)
class LoraProjection:
    """What one ``lora_linear`` of a block takes, but x: the frozen ``weight`` (dense N x K, packed
    NF4 with its ``quant_state`` or a Params4bit, or a ``FrozenWeight``), ``lora_A`` (r x K),
    ``lora_B`` (N x r), ``scaling``, ``bias`` (N,) or None and the LoRA ``dropout`` probability."""

    weight: object
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    bias: Optional[torch.Tensor] = None
    dropout: float = 0.0
    quant_state: object = None


def check_activation(op, activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"lowrank.{op}: activation must be one of {ACTIVATIONS}, got "
                         f"{activation!r}")


def _checked(op, name, x, projection, dtypes):
    """``projection`` with its weight as the checked FrozenWeight (``check_lora_args`` for an
    input like ``x``); its errors prefixed with the op and the projection's name."""
    if not isinstance(projection, LoraProjection):
        raise TypeError(f"lowrank.{op}: {name} must be a LoraProjection, got "
                        f"{type(projection).__name__}")
    p = projection
    try:
        weight = check_lora_args(x, p.weight, p.lora_A, p.lora_B, p.scaling, p.bias, p.dropout,
                                 p.quant_state, dtypes)
    except (TypeError, ValueError) as error:
        raise type(error)(f"lowrank.{op}: {name}: {error}") from error
    if weight.quant_state is None and weight.stored.requires_grad:
        # The block ops give gradients to x, the adapters and the biases; a frozen weight that
        # asks for one would silently get none.
        raise ValueError(f"lowrank.{op}: {name}'s dense weight requires grad; the fused block "
                         "ops train adapters over frozen weights: freeze it, or run the "
                         "projections one by one (lowrank.ops.lora_linear)")
    return replace(p, weight=weight, quant_state=None, scaling=float(p.scaling),
                   dropout=float(p.dropout))


def check_lora_mlp_args(x, gate, up, down, activation, dtypes=FLOAT_DTYPES):
    """(gate, up, down) checked, each weight a FrozenWeight; errors name the problem."""
    op = "lora_mlp"
    check_activation(op, activation)
    gate, up = (_checked(op, name, x, p, dtypes) for name, p in (("gate", gate), ("up", up)))
    if gate.weight.out_features != up.weight.out_features:
        raise ValueError(f"lowrank.{op}: gate and up must have one output size, got "
                         f"{gate.weight.out_features} and {up.weight.out_features}")
    # down reads act(gate) * up: an input of gate's output size, in x's dtype.
    down = _checked(op, "down", x.new_empty(0, gate.weight.out_features), down, dtypes)
    return gate, up, down


def check_lora_qkv_args(x, q, k, v, dtypes=FLOAT_DTYPES):
    """(q, k, v) checked, each weight a FrozenWeight; errors name the problem."""
    return tuple(_checked("lora_qkv", name, x, p, dtypes)
                 for name, p in (("q", q), ("k", k), ("v", v)))
