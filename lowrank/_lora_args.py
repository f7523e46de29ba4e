"""Argument checks of the adapter ops (LoRA and IA3 linear, merges), shared by lowrank.ops and
lowrank.reference. Every error names the op and the problem."""

import torch

from lowrank._quant_state import FLOAT_DTYPES, NESTED_BLOCKSIZE, check_quant_state, read_nf4


def resolve_weight(weight, quant_state):
    """``(weight, quant state)`` as the ops read them: the state given, a Params4bit's own, or None
    for a dense weight; NF4 in bitsandbytes' standard layout (see ``read_nf4``)."""
    if quant_state is None:
        quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        return weight, None
    return read_nf4(weight, quant_state)


def _check_tensors(op, **tensors):
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"lowrank.{op}: {name} must be a tensor, got {type(tensor).__name__}")


def check_weight(op, weight, quant_state, dtypes=FLOAT_DTYPES):
    """(N, K, packed bytes or None) of a dense (N x K) weight, or of packed NF4 with its state."""
    _check_tensors(op, weight=weight)
    if quant_state is not None:
        packed = check_quant_state(weight, quant_state)
        if len(quant_state.shape) != 2:
            raise ValueError(f"lowrank.{op}: the NF4 weight must be 2-D (out x in), got shape "
                             f"{tuple(quant_state.shape)}")
        N, K = quant_state.shape
        return N, K, packed
    if weight.dim() != 2:
        raise ValueError(f"lowrank.{op}: weight must be 2-D (out x in), got shape "
                         f"{tuple(weight.shape)}")
    if weight.dtype not in dtypes:
        raise TypeError(f"lowrank.{op}: weight dtype {weight.dtype} is not supported; use one of "
                        f"{dtypes}")
    return weight.shape[0], weight.shape[1], None


def check_linear_args(op, x, weight, bias, quant_state, dtypes):
    """Checks shared by the linear ops; returns (N, K, packed bytes or None)."""
    _check_tensors(op, x=x)
    if x.dtype not in dtypes:
        raise TypeError(f"lowrank.{op}: x dtype {x.dtype} is not supported; use one of {dtypes}")
    N, K, packed = check_weight(op, weight, quant_state, dtypes)
    if quant_state is not None:
        if weight.requires_grad:
            raise ValueError(f"lowrank.{op}: an NF4 weight cannot take a gradient; freeze it")
    elif weight.dtype != x.dtype:
        raise TypeError(f"lowrank.{op}: dense weight dtype {weight.dtype} differs from x "
                        f"dtype {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != K:
        raise ValueError(f"lowrank.{op}: x has {x.shape[-1] if x.dim() else 0} features but "
                         f"the weight expects {K} (shape {N} x {K})")
    check_bias(op, bias, N, dtypes)
    return N, K, packed


def check_bias(op, bias, N, dtypes):
    if bias is None:
        return
    _check_tensors(op, bias=bias)
    if bias.dtype not in dtypes:
        raise TypeError(f"lowrank.{op}: bias dtype {bias.dtype} is not supported")
    if tuple(bias.shape) != (N,):
        raise ValueError(f"lowrank.{op}: bias must be ({N},), got {tuple(bias.shape)}")


def check_lora_factors(op, lora_A, lora_B, scaling, N, K, dtypes):
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
    if not isinstance(scaling, (int, float)):
        raise TypeError(f"lowrank.{op}: scaling must be a number, got {type(scaling).__name__}")


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
                    dtypes=FLOAT_DTYPES):
    """Check everything; return (N, K, packed bytes or None). Errors name the problem.

    ``dtypes``: the floating dtypes accepted (the reference also takes float64, as the oracle)."""
    _check_tensors("lora_linear", x=x, weight=weight, lora_A=lora_A, lora_B=lora_B)
    N, K, packed = check_linear_args("lora_linear", x, weight, bias, quant_state, dtypes)
    check_lora_factors("lora_linear", lora_A, lora_B, scaling, N, K, dtypes)
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"lowrank.lora_linear: dropout must be in [0, 1), got {dropout}")
    return N, K, packed


def check_ia3_args(x, weight, ia3, bias, feedforward, quant_state, dtypes=FLOAT_DTYPES):
    """The checks of ``ia3_linear``; returns (N, K, packed bytes or None)."""
    _check_tensors("ia3_linear", x=x, weight=weight, ia3=ia3)
    N, K, packed = check_linear_args("ia3_linear", x, weight, bias, quant_state, dtypes)
    check_ia3_vector("ia3_linear", ia3, feedforward, N, K, dtypes)
    return N, K, packed


def check_merge_args(op, weight, quant_state, dtype, in_place=False):
    """Checks shared by the merges; returns (N, K, packed bytes or None)."""
    if in_place and quant_state is not None:
        raise ValueError(f"lowrank.{op}: merging in place needs a dense weight; for NF4 use the "
                         "out-of-place merge and keep the original packed bytes and quant_state "
                         "to unmerge")
    N, K, packed = check_weight(op, weight, quant_state)
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"lowrank.{op}: dtype {dtype} is not supported; use None (the weight's "
                        f"form) or one of {FLOAT_DTYPES}")
    if quant_state is not None and quant_state.nested and \
            quant_state.state2.blocksize != NESTED_BLOCKSIZE:
        raise ValueError(f"lowrank.{op}: nested blocksize {quant_state.state2.blocksize} is not "
                         f"supported; bitsandbytes uses {NESTED_BLOCKSIZE}")
    return N, K, packed
