"""Argument checks of the adapter ops (LoRA and IA3 linear, merges), shared by lowrank.ops and
lowrank.reference. Every error names the op and the problem. The weight comes back as the
``FrozenWeight`` the op runs on (one given is checked, not rebuilt)."""

import torch

from lowrank._quant_state import FLOAT_DTYPES, NESTED_BLOCKSIZE
from lowrank.frozen_weight import FrozenWeight


def _check_tensors(op, **tensors):
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"lowrank.{op}: {name} must be a tensor, got {type(tensor).__name__}")


def check_weight(op, weight, quant_state, dtypes=FLOAT_DTYPES):
    """The FrozenWeight of a dense (N x K) weight, or of packed NF4 with its state (given, or a
    Params4bit's own)."""
    weight = FrozenWeight.of(weight, quant_state, op)
    if weight.quant_state is not None:
        if len(weight.shape) != 2:
            raise ValueError(f"lowrank.{op}: the NF4 weight must be 2-D (out x in), got shape "
                             f"{weight.shape}")
        return weight
    if len(weight.shape) != 2:
        raise ValueError(f"lowrank.{op}: weight must be 2-D (out x in), got shape {weight.shape}")
    if weight.tensor.dtype not in dtypes:
        raise TypeError(f"lowrank.{op}: weight dtype {weight.tensor.dtype} is not supported; use "
                        f"one of {dtypes}")
    return weight


def check_linear_args(op, x, weight, bias, quant_state, dtypes):
    """Checks shared by the linear ops; returns the FrozenWeight."""
    _check_tensors(op, x=x)
    if x.dtype not in dtypes:
        raise TypeError(f"lowrank.{op}: x dtype {x.dtype} is not supported; use one of {dtypes}")
    weight = check_weight(op, weight, quant_state, dtypes)
    N, K = weight.shape
    if weight.quant_state is not None:
        if weight.stored.requires_grad:
            raise ValueError(f"lowrank.{op}: an NF4 weight cannot take a gradient; freeze it")
    elif weight.tensor.dtype != x.dtype:
        raise TypeError(f"lowrank.{op}: dense weight dtype {weight.tensor.dtype} differs from x "
                        f"dtype {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != K:
        raise ValueError(f"lowrank.{op}: x has {x.shape[-1] if x.dim() else 0} features but "
                         f"the weight expects {K} (shape {N} x {K})")
    check_bias(op, bias, N, dtypes)
    return weight


def check_bias(op, bias, N, dtypes):
    if bias is None:
        return
    _check_tensors(op, bias=bias)
    if bias.dtype not in dtypes:
        raise TypeError(f"lowrank.{op}: bias dtype {bias.dtype} is not supported")
    if tuple(bias.shape) != (N,):
        raise ValueError(f"lowrank.{op}: bias must be ({N},), got {tuple(bias.shape)}")


def check_lora_factors(op, lora_A, lora_B, scaling, N, K, dtypes, tensor_scaling=False):
    """``tensor_scaling``: the op also takes a 0-d float tensor as scaling."""
    _check_tensors(op, lora_A=lora_A, lora_B=lora_B)
    for name, tensor in (("lora_A", lora_A), ("lora_B", lora_B)):
        if tensor.dtype not in dtypes:
            raise TypeError(f"lowrank.{op}: {name} dtype {tensor.dtype} is not supported")
    if lora_A.dim() != 2 or lora_A.shape[1] != K or lora_A.shape[0] < 1:
        raise ValueError(f"lowrank.{op}: lora_A must be (r, {K}), got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lowrank.{op}: lora_B must be ({N}, {r}) to match the weight and "
                         f"lora_A's rank {r}, got {tuple(lora_B.shape)}")
    if tensor_scaling and isinstance(scaling, torch.Tensor):
        if scaling.dim() != 0 or not scaling.is_floating_point():
            raise ValueError(f"lowrank.{op}: a tensor scaling must be a 0-d float tensor, got "
                             f"{scaling.dtype} of shape {tuple(scaling.shape)}")
    elif not isinstance(scaling, (int, float)):
        raise TypeError(f"lowrank.{op}: scaling must be a number"
                        f"{' or a 0-d float tensor' if tensor_scaling else ''}, got "
                        f"{type(scaling).__name__}")


def check_ia3_vector(op, ia3, feedforward, N, K, dtypes):
    """l: N values (output form) or K values (feed-forward form), flat or as PEFT stores it."""
    _check_tensors(op, ia3=ia3)
    if ia3.dtype not in dtypes:
        raise TypeError(f"lowrank.{op}: ia3 dtype {ia3.dtype} is not supported")
    n, peft_shape = (K, (1, K)) if feedforward else (N, (N, 1))
    if tuple(ia3.shape) not in ((n,), peft_shape):
        form = "feed-forward form: one per input feature" if feedforward else \
            "output form: one per output feature"
        raise ValueError(f"lowrank.{op}: ia3 must have shape ({n},) or {peft_shape} ({form}), got "
                         f"{tuple(ia3.shape)}")


def check_lora_args(x, weight, lora_A, lora_B, scaling, bias, dropout, quant_state,
                    dtypes=FLOAT_DTYPES, op="lora_linear", tensor_scaling=False):
    """Check everything; return the FrozenWeight. Errors name the problem and ``op``.

    ``dtypes``: the floating dtypes accepted (the reference also takes float64, as the oracle).
    ``tensor_scaling``: a 0-d tensor scaling is accepted too (PEFT's compiled hot swap)."""
    _check_tensors(op, x=x, lora_A=lora_A, lora_B=lora_B)
    weight = check_linear_args(op, x, weight, bias, quant_state, dtypes)
    check_lora_factors(op, lora_A, lora_B, scaling, *weight.shape, dtypes, tensor_scaling)
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"lowrank.{op}: dropout must be in [0, 1), got {dropout}")
    return weight


def check_ia3_args(x, weight, ia3, bias, feedforward, quant_state, dtypes=FLOAT_DTYPES):
    """The checks of ``ia3_linear``; returns the FrozenWeight."""
    _check_tensors("ia3_linear", x=x, ia3=ia3)
    weight = check_linear_args("ia3_linear", x, weight, bias, quant_state, dtypes)
    check_ia3_vector("ia3_linear", ia3, feedforward, *weight.shape, dtypes)
    return weight


def check_merge_args(op, weight, quant_state, dtype, in_place=False):
    """Checks shared by the merges; returns the FrozenWeight."""
    weight = FrozenWeight.of(weight, quant_state, op)
    quant_state = weight.quant_state
    if in_place and quant_state is not None:
        raise ValueError(f"lowrank.{op}: merging in place needs a dense weight; for NF4 use the "
                         "out-of-place merge and keep the original packed bytes and quant_state "
                         "to unmerge")
    weight = check_weight(op, weight, None)
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"lowrank.{op}: dtype {dtype} is not supported; use None (the weight's "
                        f"form) or one of {FLOAT_DTYPES}")
    if quant_state is not None and quant_state.nested and \
            quant_state.state2.blocksize != NESTED_BLOCKSIZE:
        raise ValueError(f"lowrank.{op}: nested blocksize {quant_state.state2.blocksize} is not "
                         f"supported; bitsandbytes uses {NESTED_BLOCKSIZE}")
    return weight


def check_dora_args(x, weight, lora_A, lora_B, magnitude, scaling, bias, dropout, quant_state,
                    dtypes=FLOAT_DTYPES):
    """The checks of ``dora_linear``: those of ``lora_linear`` and the magnitude m, one value per
    output feature (PEFT's ``lora_magnitude_vector``). Returns the FrozenWeight."""
    weight = check_lora_args(x, weight, lora_A, lora_B, scaling, bias, dropout, quant_state, dtypes,
                             op="dora_linear")
    _check_tensors("dora_linear", magnitude=magnitude)
    if magnitude.dtype not in dtypes:
        raise TypeError(f"lowrank.dora_linear: magnitude dtype {magnitude.dtype} is not supported")
    if tuple(magnitude.shape) != (weight.out_features,):
        raise ValueError(f"lowrank.dora_linear: magnitude must be ({weight.out_features},), one "
                         f"value per output feature, got {tuple(magnitude.shape)}")
    return weight


def check_lora_mixed_args(x, weight, lora_A, lora_B, scalings, adapter_index, bias, quant_state,
                          index_in_range=False, dtypes=FLOAT_DTYPES):
    """The checks of ``lora_mixed``; returns (the FrozenWeight, scalings as an fp32 tensor).
    The index range is read from the tensor (a device sync) unless the caller vouches for it."""
    op = "lora_mixed"
    _check_tensors(op, x=x, lora_A=lora_A, lora_B=lora_B, adapter_index=adapter_index)
    weight = check_linear_args(op, x, weight, bias, quant_state, dtypes)
    N, K = weight.shape
    for name, tensor in (("lora_A", lora_A), ("lora_B", lora_B)):
        if tensor.dtype not in dtypes:
            raise TypeError(f"lowrank.{op}: {name} dtype {tensor.dtype} is not supported")
    if lora_A.dim() != 3 or lora_A.shape[2] != K or min(lora_A.shape[:2]) < 1:
        raise ValueError(f"lowrank.{op}: lora_A must be (adapters, r, {K}), got "
                         f"{tuple(lora_A.shape)}")
    n, r = lora_A.shape[:2]
    if tuple(lora_B.shape) != (n, N, r):
        raise ValueError(f"lowrank.{op}: lora_B must be ({n}, {N}, {r}) to match the weight and "
                         f"lora_A, got {tuple(lora_B.shape)}")
    if not isinstance(scalings, torch.Tensor):
        scalings = torch.tensor(scalings, dtype=torch.float32, device=lora_A.device)
    if tuple(scalings.shape) != (n,) or not scalings.is_floating_point():
        raise ValueError(f"lowrank.{op}: scalings must be {n} floats (one per adapter), got "
                         f"{scalings.dtype} {tuple(scalings.shape)}")
    if adapter_index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"lowrank.{op}: adapter_index must be int32 or int64, got "
                        f"{adapter_index.dtype}")
    if tuple(adapter_index.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"lowrank.{op}: adapter_index must have one entry per row of x, shape "
                         f"{tuple(x.shape[:-1])}, got {tuple(adapter_index.shape)}")
    if not index_in_range and adapter_index.numel() and (
            adapter_index.min().item() < -1 or adapter_index.max().item() >= n):
        raise ValueError(f"lowrank.{op}: adapter_index values must be in [-1, {n}) (-1: the base "
                         f"alone), got {adapter_index.min().item()} to {adapter_index.max().item()}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (
            x, weight.stored, lora_A, lora_B, scalings, bias)):
        raise ValueError(f"lowrank.{op}: mixed-adapter batches run inference only (no backward); "
                         "call it under torch.no_grad() or torch.inference_mode()")
    return weight, scalings.float()
