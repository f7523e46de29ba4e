"""NF4 quantization, bit-exact with bitsandbytes, on bitsandbytes' own ``QuantState``.

    packed, quant_state = lowrank.nf4.quantize(w, blocksize=64, double_quant=True)
    w_hat = lowrank.nf4.dequantize(packed, quant_state)   # == bitsandbytes' dequantize_4bit

``quant_state`` may come from anywhere bitsandbytes makes one, e.g. ``linear.weight.quant_state`` of
a ``Linear4bit`` in a model loaded with ``load_in_4bit=True``: it is used as it is, and the packed
bytes are read in place (a ``Params4bit`` can be passed as ``packed``). A weight that bitsandbytes
repacked for its CPU kernel (``quant_state.packing_format_for_cpu``) is read from a decoded copy
and left as it is. Only "nf4" is supported; fp4 states are refused.
"""

import torch

from lowrank import _dispatch, ops, reference
from lowrank._quant_state import FLOAT_DTYPES, check_quantize_args
from lowrank.frozen_weight import FrozenWeight


def quantize(w, blocksize=64, double_quant=True, quant_storage=torch.uint8):
    """Quantize ``w`` (fp32/fp16/bf16, any shape) to NF4 in blocks of ``blocksize`` values.

    Returns ``(packed, quant_state)``: the packed codes (two per byte) as a ``(bytes / itemsize, 1)``
    tensor of ``quant_storage``, and a bitsandbytes ``QuantState``; with ``double_quant`` the absmax
    values are themselves quantized to 8 bits. Same bytes and state as bitsandbytes'
    ``quantize_4bit(w, blocksize=..., compress_statistics=double_quant, quant_type="nf4")``.
    """
    check_quantize_args(w, blocksize, quant_storage)
    if not _dispatch.use_kernels(w=w):
        return reference.nf4_quantize(w, blocksize, double_quant, quant_storage)
    packed, absmax = ops.nf4_quantize(w.reshape(-1), blocksize)
    packed = packed.view(quant_storage).unsqueeze(1)
    return packed, ops.nf4_quant_state(w.shape, w.dtype, blocksize, absmax, double_quant)


def dequantize(packed, quant_state, out=None, dtype=None):
    """Dequantize NF4 ``packed`` with its bitsandbytes ``quant_state``, in one kernel launch.

    Returns a tensor of ``quant_state.shape`` in ``dtype`` (default: ``out``'s dtype, else
    ``quant_state.dtype``), written into ``out`` when given (contiguous, of that shape).
    """
    weight = FrozenWeight.of_nf4(packed, quant_state)
    quant_state = weight.quant_state  # in the standard layout, where bitsandbytes repacked it
    dtype = _output_dtype(quant_state, out, dtype)
    if out is None:
        out = torch.empty(quant_state.shape, dtype=dtype, device=weight.tensor.device)
    elif tuple(out.shape) != tuple(quant_state.shape) or not out.is_contiguous():
        raise ValueError(f"lowrank.nf4.dequantize: out must be a contiguous tensor of shape "
                         f"{tuple(quant_state.shape)}, got shape {tuple(out.shape)}"
                         f"{'' if out.is_contiguous() else ' (not contiguous)'}")
    use_kernels = _dispatch.use_kernels(packed=weight.tensor, absmax=weight.absmax, out=out,
                                        nested_absmax=weight.nested_absmax, offset=weight.offset)
    if not use_kernels:
        return out.copy_(reference.nf4_dequantize(weight.stored, quant_state, dtype))
    ops.nf4_dequantize(*weight.flat(), out)
    return out


def _output_dtype(quant_state, out, dtype):
    if dtype is not None and out is not None and out.dtype != dtype:
        raise TypeError(f"lowrank.nf4.dequantize: out has dtype {out.dtype} but dtype={dtype} "
                        "was asked for")
    dtype = dtype or (out.dtype if out is not None else quant_state.dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"lowrank.nf4.dequantize: output dtype {dtype} is not supported; "
                        "use float32, float16 or bfloat16")
    return dtype
