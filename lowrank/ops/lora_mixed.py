"""Mixed-adapter LoRA / QLoRA linear (inference): one adapter per row of the batch.

``y[m] = x[m] W^T + b + scalings[i_m] x[m] A[i_m]^T B[i_m]^T``, with ``i_m = -1`` for a row that
runs the base layer alone: the base GEMM once for the whole batch, the LoRA shrink and expand
gathered per row from the stacked adapters (``kernels/lora_mixed.py``). The custom op
``lowrank::lora_mixed_forward`` (with its fake, so torch.compile traces it) is the launch; there
is no backward: ``lora_mixed`` refuses inputs that would need one.
"""

from typing import Optional

import torch

from lowrank import reference
from lowrank._lora_args import check_lora_mixed_args
from lowrank.frozen_weight import FrozenWeight
from lowrank.kernels import lora_mixed as mixed_kernels


@torch.library.custom_op("lowrank::lora_mixed_forward", mutates_args=())
def lora_mixed_forward(x: torch.Tensor, weight: list[Optional[torch.Tensor]],
                       weight_sizes: list[int], lora_A: torch.Tensor, lora_B: torch.Tensor,
                       scalings: torch.Tensor, adapter_index: torch.Tensor,
                       bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Y (M x N) for contiguous x (M x K), stacked A (n x R x K), B (n x N x R), fp32 scalings
    (n,) and one adapter index per row (M,), -1 for the base alone."""
    w = FrozenWeight.from_flat(weight, weight_sizes)
    M = x.shape[0]
    a, b = lora_A.to(x.dtype), lora_B.to(x.dtype)
    s = torch.empty(M, a.shape[1], dtype=x.dtype, device=x.device)
    y = torch.empty(M, w.out_features, dtype=x.dtype, device=x.device)
    mixed_kernels.lora_mixed_forward(x, w.tensor, a, b, scalings.float(), adapter_index,
                                     None if bias is None else bias.to(x.dtype), s, y, w.nf4)
    return y


@lora_mixed_forward.register_fake
def _(x, weight, weight_sizes, lora_A, lora_B, scalings, adapter_index, bias):
    return x.new_empty(x.shape[0], FrozenWeight.from_flat(weight, weight_sizes).out_features)


def lora_mixed_checks(x, weight, lora_A, lora_B, scalings, adapter_index, bias=None,
                      quant_state=None, index_in_range=False):
    """Everything ``lora_mixed`` checks before it runs (a TypeError, ValueError or
    NotImplementedError naming the problem); returns (the FrozenWeight, scalings as a tensor)."""
    weight, scalings = check_lora_mixed_args(x, weight, lora_A, lora_B, scalings, adapter_index,
                                             bias, quant_state, index_in_range)
    weight.use_kernels(x=x, lora_A=lora_A, lora_B=lora_B, scalings=scalings,
                       adapter_index=adapter_index, bias=bias)
    return weight, scalings


def lora_mixed(x, weight, lora_A, lora_B, scalings, adapter_index, bias=None, quant_state=None,
               index_in_range=False):
    """LoRA / QLoRA linear with one adapter per row, for inference.

    - ``x``: (..., K), fp32/fp16/bf16; the output has x's shape with N features, in x's dtype.
    - ``weight``: dense (N x K) in x's dtype, packed NF4 with its ``quant_state`` (or a
      ``Params4bit``), or a ``FrozenWeight``.
    - ``lora_A`` (n x R x K), ``lora_B`` (n x N x R): n adapters stacked, smaller ranks padded
      with zeros up to R (zeros add nothing); any float dtype, cast to x's for the products.
    - ``scalings``: (n,) floats (a tensor or a list), each adapter's alpha / r.
    - ``adapter_index``: int tensor with one entry per row of x (x's shape without its last
      dimension), in [-1, n); -1 runs the base layer alone for that row.
    - Inference only: with grad enabled, inputs that require grad are an error (run it under
      ``torch.no_grad()`` or ``torch.inference_mode()``).
    - ``index_in_range=True``: the caller guarantees the indices are in [-1, n), and the check,
      which reads them back to the host (a device sync), is skipped (the layers, which build the
      indices themselves, pass it).
    """
    weight, scalings = lora_mixed_checks(x, weight, lora_A, lora_B, scalings, adapter_index, bias,
                                         quant_state, index_in_range)
    if not weight.use_kernels(x=x, lora_A=lora_A, lora_B=lora_B, scalings=scalings,
                              adapter_index=adapter_index, bias=bias) \
            or x.numel() == 0 or weight.out_features == 0:
        return reference.lora_mixed(x, weight, lora_A, lora_B, scalings, adapter_index, bias)
    x2 = x.reshape(-1, weight.in_features).contiguous()
    weight_tensors, weight_sizes = weight.flat()
    y = lora_mixed_forward(x2, weight_tensors, weight_sizes, lora_A, lora_B, scalings,
                           adapter_index.reshape(-1).contiguous(), bias)
    return y.reshape(*x.shape[:-1], weight.out_features)
