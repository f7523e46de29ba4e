"""Merging adapters into the frozen weight: LoRA (``W + scaling B A``) and IA3 (``W * l``), each in
one kernel that reads the weight once and writes the result once, summing in fp32.

The custom ops (registered with torch.library, with fake implementations) write into ``out``:
dense (N x K, any strides; the weight itself for the in-place merges), or flat packed NF4 bytes
with ``out_absmax`` (fp32, one per block of the input's blocksize). The public functions check,
dispatch and allocate. Kernels: ``kernels/lora_merge.py``, ``kernels/ia3_merge.py``.
"""

from typing import Optional

import torch

from lowrank import reference
from lowrank._lora_args import check_bias, check_ia3_vector, check_lora_factors, check_merge_args
from lowrank._quant_state import FLOAT_DTYPES, code_books
from lowrank.frozen_weight import FrozenWeight
from lowrank.kernels import ia3_merge as ia3_merge_kernel
from lowrank.kernels import lora_merge as lora_merge_kernel
from lowrank.ops.ia3 import ia3_scale
from lowrank.ops.nf4 import nf4_quant_state


def _merge_outputs(out_absmax, nf4):
    """The merge launchers' keyword arguments for the weight's decoding and an NF4 result."""
    if out_absmax is None:
        return {"nf4": nf4}
    return {"out_absmax": out_absmax, "bounds": code_books(out_absmax.device)[1], "nf4": nf4}


@torch.library.custom_op("lowrank::lora_merge", mutates_args=("out", "out_absmax"))
def lora_merge(weight: list[Optional[torch.Tensor]], weight_sizes: list[int],
               lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, out: torch.Tensor,
               out_absmax: Optional[torch.Tensor]) -> None:
    """``out`` = W + scaling B A, summed in fp32."""
    w = FrozenWeight.from_flat(weight, weight_sizes)
    lora_merge_kernel.lora_merge(w.tensor, lora_A.float(), lora_B.float(), scaling, out,
                                 **_merge_outputs(out_absmax, w.nf4))


@lora_merge.register_fake
def _(weight, weight_sizes, lora_A, lora_B, scaling, out, out_absmax):
    return None


@torch.library.custom_op("lowrank::ia3_merge", mutates_args=("out", "out_absmax"))
def ia3_merge(weight: list[Optional[torch.Tensor]], weight_sizes: list[int], ia3: torch.Tensor,
              feedforward: bool, unmerge: bool, out: torch.Tensor,
              out_absmax: Optional[torch.Tensor]) -> None:
    """``out`` = W * l (or W / l with ``unmerge``), l along N or, ``feedforward``, along K."""
    w = FrozenWeight.from_flat(weight, weight_sizes)
    ia3_merge_kernel.ia3_merge(w.tensor, ia3_scale(ia3), w.shape, feedforward, unmerge, out,
                               **_merge_outputs(out_absmax, w.nf4))


@ia3_merge.register_fake
def _(weight, weight_sizes, ia3, feedforward, unmerge, out, out_absmax):
    return None


def _merge_into(run, weight, dtype):
    """Allocate the merge's result, let ``run(out, out_absmax)`` fill it, return it: dense in
    ``dtype`` (default the weight's), or for NF4 with dtype None (packed, quant_state) requantized
    with the input's blocksize and nesting, stored like the input."""
    quant_state = weight.quant_state
    if quant_state is None or dtype is not None:
        out = torch.empty(weight.shape, dtype=dtype or (weight.tensor.dtype if quant_state is None
                                                        else quant_state.dtype),
                          device=weight.tensor.device)
        run(out, None)
        return out
    out = torch.empty_like(weight.tensor)
    out_absmax = torch.empty(quant_state.absmax.numel(), dtype=torch.float32, device=out.device)
    run(out, out_absmax)
    state = nf4_quant_state(quant_state.shape, quant_state.dtype, quant_state.blocksize,
                            out_absmax, quant_state.nested)
    return out.view(weight.stored.dtype).reshape(weight.stored.shape), state


def merge_lora(weight, lora_A, lora_B, scaling, quant_state=None, dtype=None):
    """The weight with a LoRA adapter merged in: ``W + scaling * B A`` in one kernel, fp32 sums.

    - Dense ``weight`` (N x K): a new dense tensor in the weight's dtype (or ``dtype``).
    - Packed NF4 ``weight`` with its ``quant_state`` (a ``Params4bit`` carries its own):
      with ``dtype=None``, ``(packed, quant_state)``, requantized in the same kernel with the same
      blocksize and nesting: the bytes bitsandbytes' ``quantize_4bit`` gives for the fp32 merged
      weight. Lossy (a second NF4 rounding). With ``dtype`` (bf16/fp16/fp32), the lossless merge
      into a dense weight of that dtype ("merge and unload to 16-bit").
    - ``weight`` may also be a ``FrozenWeight``.
    - To unmerge an NF4 merge, keep the original packed bytes and quant_state (half a byte per
      weight): they are the exact unmerged weight; requantizing W' - s B A would not give them back.
    """
    weight = check_merge_args("merge_lora", weight, quant_state, dtype)
    check_lora_factors("merge_lora", lora_A, lora_B, scaling, *weight.shape, FLOAT_DTYPES)
    if not weight.use_kernels(lora_A=lora_A, lora_B=lora_B):
        return reference.merge_lora(weight, lora_A, lora_B, scaling, dtype=dtype)
    with torch.no_grad():
        return _merge_into(lambda out, out_absmax: lora_merge(
            *weight.flat(), lora_A, lora_B, float(scaling), out, out_absmax), weight, dtype)


def _lora_merge_in_place(op, weight, lora_A, lora_B, scaling):
    weight = check_merge_args(op, weight, None, None, in_place=True)
    check_lora_factors(op, lora_A, lora_B, scaling, *weight.shape, FLOAT_DTYPES)
    with torch.no_grad():
        if not weight.use_kernels(lora_A=lora_A, lora_B=lora_B):
            return weight.tensor.copy_(reference.merge_lora(weight, lora_A, lora_B, scaling))
        lora_merge(*weight.flat(), lora_A, lora_B, float(scaling), weight.tensor, None)
    return weight.tensor


def merge_lora_(weight, lora_A, lora_B, scaling):
    """Merge in place into a dense weight: ``W += scaling * B A`` (one kernel); returns ``weight``."""
    return _lora_merge_in_place("merge_lora_", weight, lora_A, lora_B, scaling)


def unmerge_lora_(weight, lora_A, lora_B, scaling):
    """Undo ``merge_lora_`` in place: ``W -= scaling * B A``; returns ``weight``. The original
    comes back up to the rounding of one add and one subtract in the weight's dtype. (NF4: keep
    the original packed bytes and quant_state instead; see ``merge_lora``.)"""
    return _lora_merge_in_place("unmerge_lora_", weight, lora_A, lora_B, -scaling)


def _scaled_bias(bias, ia3, feedforward, unmerge=False):
    """The bias after merging l: scaled in the output form (fp32, rounded once), unchanged in the
    feed-forward form."""
    if bias is None or feedforward:
        return bias
    scale = ia3.detach().reshape(-1).float()
    return (bias.float() / scale if unmerge else bias.float() * scale).to(bias.dtype)


def merge_ia3(weight, ia3, feedforward=False, bias=None, quant_state=None, dtype=None):
    """``(merged_weight, merged_bias)`` with an IA3 vector merged in, the weight in one kernel:
    ``W * l[:, None]`` and ``bias * l`` (output form), or ``W * l[None, :]`` with the bias unchanged
    (``feedforward=True``). ``merged_bias`` is None when ``bias`` is.

    The weight's forms and ``dtype`` are those of ``merge_lora``: dense -> dense; NF4 -> requantized
    ``(packed, quant_state)``, or dense in ``dtype``. To unmerge an NF4 merge, keep the original
    packed bytes and quant_state.
    """
    weight = check_merge_args("merge_ia3", weight, quant_state, dtype)
    check_ia3_vector("merge_ia3", ia3, feedforward, *weight.shape, FLOAT_DTYPES)
    check_bias("merge_ia3", bias, weight.out_features, FLOAT_DTYPES)
    if not weight.use_kernels(ia3=ia3, bias=bias):
        return reference.merge_ia3(weight, ia3, feedforward, bias, dtype=dtype)
    with torch.no_grad():
        merged = _merge_into(lambda out, out_absmax: ia3_merge(
            *weight.flat(), ia3, bool(feedforward), False, out, out_absmax), weight, dtype)
        return merged, _scaled_bias(bias, ia3, feedforward)


def _ia3_merge_in_place(op, weight, ia3, feedforward, bias, unmerge):
    weight = check_merge_args(op, weight, None, None, in_place=True)
    check_ia3_vector(op, ia3, feedforward, *weight.shape, FLOAT_DTYPES)
    check_bias(op, bias, weight.out_features, FLOAT_DTYPES)
    with torch.no_grad():
        if bias is not None:
            bias.copy_(_scaled_bias(bias, ia3, feedforward, unmerge))
        if not weight.use_kernels(ia3=ia3, bias=bias):
            weight.tensor.copy_(reference.ia3_scaled_weight(weight.tensor, ia3, feedforward, unmerge))
        else:
            ia3_merge(*weight.flat(), ia3, bool(feedforward), unmerge, weight.tensor, None)
    return weight.tensor, bias


def merge_ia3_(weight, ia3, feedforward=False, bias=None):
    """Merge in place into a dense weight (and bias, output form); returns ``(weight, bias)``."""
    return _ia3_merge_in_place("merge_ia3_", weight, ia3, feedforward, bias, unmerge=False)


def unmerge_ia3_(weight, ia3, feedforward=False, bias=None):
    """Undo ``merge_ia3_`` in place by dividing by l (correctly rounded); returns ``(weight, bias)``.
    The original comes back up to the rounding of one multiply and one divide in the weight's dtype
    (l must have no zeros). (NF4: keep the original packed bytes and quant_state instead.)"""
    return _ia3_merge_in_place("unmerge_ia3_", weight, ia3, feedforward, bias, unmerge=True)
