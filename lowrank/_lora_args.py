"""Argument checks of the LoRA linear op, shared by lowrank.ops and lowrank.reference."""

import torch

from lowrank._quant_state import FLOAT_DTYPES, check_quant_state


def resolve_weight(weight, quant_state):
    """The quant state of ``weight``: the one given, a Params4bit's own, or None for a dense weight."""
    if quant_state is None:
        quant_state = getattr(weight, "quant_state", None)
    return quant_state


def check_lora_args(x, weight, lora_A, lora_B, scaling, bias, dropout, quant_state,
                    dtypes=FLOAT_DTYPES):
    """Check everything; return (N, K, packed bytes or None). Errors name the problem.

    ``dtypes``: the floating dtypes accepted (the reference also takes float64, as the oracle)."""
    for name, tensor in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"lowrank.lora_linear: {name} must be a tensor, got {type(tensor).__name__}")
    if x.dtype not in dtypes:
        raise TypeError(f"lowrank.lora_linear: x dtype {x.dtype} is not supported; use one of "
                        f"{dtypes}")
    for name, tensor in (("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if tensor is not None and tensor.dtype not in dtypes:
            raise TypeError(f"lowrank.lora_linear: {name} dtype {tensor.dtype} is not supported")
    packed = None
    if quant_state is not None:
        packed = check_quant_state(weight, quant_state)
        if len(quant_state.shape) != 2:
            raise ValueError("lowrank.lora_linear: the NF4 weight must be 2-D (out x in), got shape "
                             f"{tuple(quant_state.shape)}")
        if weight.requires_grad:
            raise ValueError("lowrank.lora_linear: an NF4 weight cannot take a gradient; freeze it")
        N, K = quant_state.shape
    else:
        if weight.dim() != 2:
            raise ValueError(f"lowrank.lora_linear: weight must be 2-D (out x in), got shape "
                             f"{tuple(weight.shape)}")
        if weight.dtype != x.dtype:
            raise TypeError(f"lowrank.lora_linear: dense weight dtype {weight.dtype} differs from x "
                            f"dtype {x.dtype}")
        N, K = weight.shape
    if x.dim() == 0 or x.shape[-1] != K:
        raise ValueError(f"lowrank.lora_linear: x has {x.shape[-1] if x.dim() else 0} features but "
                         f"the weight expects {K} (shape {N} x {K})")
    if lora_A.dim() != 2 or lora_A.shape[1] != K or lora_A.shape[0] < 1:
        raise ValueError(f"lowrank.lora_linear: lora_A must be (r, {K}), got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lowrank.lora_linear: lora_B must be ({N}, {r}) to match the weight and "
                         f"lora_A's rank {r}, got {tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"lowrank.lora_linear: bias must be ({N},), got {tuple(bias.shape)}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"lowrank.lora_linear: dropout must be in [0, 1), got {dropout}")
    if not isinstance(scaling, (int, float)):
        raise TypeError(f"lowrank.lora_linear: scaling must be a number, got {type(scaling).__name__}")
    return N, K, packed
