"""lowrank's kernel ops, registered with ``torch.library`` (with fake implementations) so that
``torch.compile`` traces through them. They run the Triton kernels; the public modules
(``lowrank.nf4``, ...) validate arguments and ask ``lowrank._dispatch`` whether to call them or the
reference.
"""

from typing import Optional

import torch

from lowrank import _dispatch, reference
from lowrank._lora_args import check_lora_args, resolve_weight
from lowrank._quant_state import NESTED_BLOCKSIZE, absmax_fp32, code_books
from lowrank.kernels import lora_linear as lora_kernels
from lowrank.kernels import lora_linear_decode as lora_decode_kernels
from lowrank.kernels import nf4_dequantize as nf4_dequantize_kernel
from lowrank.kernels import nf4_quantize as nf4_quantize_kernel


@torch.library.custom_op("lowrank::nf4_dequantize", mutates_args=("out",))
def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, nested_code: Optional[torch.Tensor],
                   nested_absmax: Optional[torch.Tensor], offset: Optional[torch.Tensor],
                   out: torch.Tensor, blocksize: int, nested_blocksize: int) -> None:
    """Dequantize flat uint8 ``packed`` into contiguous ``out``; nested_* are None unless nested."""
    nested = None if nested_code is None else (nested_code, nested_absmax, offset, nested_blocksize)
    code = code_books(packed.device)[0]
    nf4_dequantize_kernel.nf4_dequantize(packed, absmax, code, out, blocksize, nested)


@nf4_dequantize.register_fake
def _(packed, absmax, nested_code, nested_absmax, offset, out, blocksize, nested_blocksize):
    return None


@torch.library.custom_op("lowrank::nf4_quantize", mutates_args=())
def nf4_quantize(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat contiguous ``w`` -> (packed uint8 of ceil(n / 2) bytes, fp32 absmax per block)."""
    packed = torch.empty((w.numel() + 1) // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(-(-w.numel() // blocksize), dtype=torch.float32, device=w.device)
    nf4_quantize_kernel.nf4_quantize(w, code_books(w.device)[1], packed, absmax, blocksize)
    return packed, absmax


@nf4_quantize.register_fake
def _(w, blocksize):
    return (w.new_empty((w.numel() + 1) // 2, dtype=torch.uint8),
            w.new_empty(-(-w.numel() // blocksize), dtype=torch.float32))


@torch.library.custom_op("lowrank::nf4_quantize_absmax", mutates_args=())
def nf4_quantize_absmax(absmax: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Double quantization of fp32 ``absmax`` around 0-d ``offset`` -> (uint8 codes, nested absmax)."""
    codes = torch.empty(absmax.numel(), dtype=torch.uint8, device=absmax.device)
    nested_absmax = torch.empty(-(-absmax.numel() // NESTED_BLOCKSIZE), dtype=torch.float32,
                                device=absmax.device)
    nf4_quantize_kernel.quantize_absmax(absmax, offset, code_books(absmax.device)[3], codes,
                                        nested_absmax)
    return codes, nested_absmax


@nf4_quantize_absmax.register_fake
def _(absmax, offset):
    return (absmax.new_empty(absmax.numel(), dtype=torch.uint8),
            absmax.new_empty(-(-absmax.numel() // NESTED_BLOCKSIZE), dtype=torch.float32))


# LoRA / QLoRA linear. The weight reaches the kernel ops as a dense (N x K) tensor, or as flat packed
# NF4 bytes with the tensors that decode them (absmax, and for nested states nested_code,
# nested_absmax and offset); the NF4 ones are None for a dense weight.

def weight_op_args(weight, packed, quant_state):
    """The frozen weight as the LoRA ops take it: (weight or packed bytes, absmax, nested_code,
    nested_absmax, offset, blocksize, nested_blocksize); checked arguments, from check_lora_args."""
    if quant_state is None:
        return weight, None, None, None, None, 1, 1
    if quant_state.nested:
        return (packed, quant_state.absmax, quant_state.state2.code.float(),
                quant_state.state2.absmax.float(), quant_state.offset.float().reshape(()),
                quant_state.blocksize, quant_state.state2.blocksize)
    return packed, absmax_fp32(quant_state), None, None, None, quant_state.blocksize, 1


def _nf4_decoding(absmax, nested_code, nested_absmax, offset, blocksize, nested_blocksize, in_features):
    if absmax is None:
        return None
    return {"absmax": absmax, "code": code_books(absmax.device)[0], "nested_code": nested_code,
            "nested_absmax": nested_absmax, "offset": offset, "blocksize": blocksize,
            "nested_blocksize": nested_blocksize, "in_features": in_features}


@torch.library.custom_op("lowrank::lora_forward", mutates_args=())
def lora_forward(x: torch.Tensor, weight: torch.Tensor, absmax: Optional[torch.Tensor],
                 nested_code: Optional[torch.Tensor], nested_absmax: Optional[torch.Tensor],
                 offset: Optional[torch.Tensor], blocksize: int, nested_blocksize: int,
                 out_features: int, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                 bias: Optional[torch.Tensor], dropout: float, seed: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y, S) for contiguous x (M x K): Y = x W^T + b + s S B^T, S = dropout(x) A^T."""
    M, K = x.shape
    a, b = lora_A.to(x.dtype), lora_B.to(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    s = torch.empty(M, a.shape[0], dtype=x.dtype, device=x.device)
    y = torch.empty(M, out_features, dtype=x.dtype, device=x.device)
    nf4 = _nf4_decoding(absmax, nested_code, nested_absmax, offset, blocksize, nested_blocksize, K)
    if M <= lora_decode_kernels.DECODE_MAX_M:  # decode: split-K, the packed weight read once
        lora_decode_kernels.lora_decode_forward(x, weight, a, b, bias, y, s, seed, dropout, scaling,
                                                nf4)
    else:
        lora_kernels.lora_shrink(x, a, s, seed, dropout)
        lora_kernels.lora_forward(x, weight, s, b, bias, y, scaling, nf4)
    return y, s


@lora_forward.register_fake
def _(x, weight, absmax, nested_code, nested_absmax, offset, blocksize, nested_blocksize,
      out_features, lora_A, lora_B, scaling, bias, dropout, seed):
    return x.new_empty(x.shape[0], out_features), x.new_empty(x.shape[0], lora_A.shape[0])


@torch.library.custom_op("lowrank::lora_grad_input", mutates_args=())
def lora_grad_input(grad_y: torch.Tensor, weight: torch.Tensor, absmax: Optional[torch.Tensor],
                    nested_code: Optional[torch.Tensor], nested_absmax: Optional[torch.Tensor],
                    offset: Optional[torch.Tensor], blocksize: int, nested_blocksize: int,
                    grad_s: torch.Tensor, lora_A: torch.Tensor, seed: torch.Tensor,
                    dropout: float) -> torch.Tensor:
    """dX = dY W + dropout'(dS A), in dY's dtype (M x K)."""
    K = lora_A.shape[1]
    grad_x = torch.empty(grad_y.shape[0], K, dtype=grad_y.dtype, device=grad_y.device)
    lora_kernels.lora_grad_input(
        grad_y, weight, grad_s, lora_A.to(grad_y.dtype), grad_x, seed, dropout,
        _nf4_decoding(absmax, nested_code, nested_absmax, offset, blocksize, nested_blocksize, K))
    return grad_x


@lora_grad_input.register_fake
def _(grad_y, weight, absmax, nested_code, nested_absmax, offset, blocksize, nested_blocksize,
      grad_s, lora_A, seed, dropout):
    return grad_y.new_empty(grad_y.shape[0], lora_A.shape[1])


@torch.library.custom_op("lowrank::lora_grad_a", mutates_args=())
def lora_grad_a(grad_s: torch.Tensor, x: torch.Tensor, seed: torch.Tensor,
                dropout: float) -> torch.Tensor:
    """dA = dS^T dropout(x) in fp32 (r x K), the dropout mask regenerated from ``seed``."""
    grad_a = torch.empty(grad_s.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    lora_kernels.lora_grad_a(grad_s, x, grad_a, seed, dropout)
    return grad_a


@lora_grad_a.register_fake
def _(grad_s, x, seed, dropout):
    return x.new_empty(grad_s.shape[1], x.shape[1], dtype=torch.float32)


def _lora_setup_context(ctx, inputs, output):
    (x, weight, absmax, nested_code, nested_absmax, offset, blocksize, nested_blocksize,
     out_features, lora_A, lora_B, scaling, bias, dropout, seed) = inputs
    # Saved: x, S and the seed (the dropout mask is regenerated from it), the frozen weight as it
    # is stored (packed NF4 stays packed: the dense W is never kept) and the adapters. Not Y.
    ctx.save_for_backward(x, weight, absmax, nested_code, nested_absmax, offset, lora_A, lora_B,
                          seed, output[1])
    ctx.blocksizes = (blocksize, nested_blocksize)
    ctx.scaling, ctx.dropout, ctx.has_bias = scaling, dropout, bias is not None


def _lora_backward(ctx, grad_y, grad_s_output):
    x, weight, absmax, nested_code, nested_absmax, offset, lora_A, lora_B, seed, s = ctx.saved_tensors
    grad_y = grad_y.contiguous()
    need = ctx.needs_input_grad
    # dS = s dY B: a small GEMM (M x N x r) in x's dtype, as the shrink/expand are.
    grad_s = torch.matmul(grad_y, lora_B.to(grad_y.dtype)) * ctx.scaling
    grad_x = grad_weight = grad_a = grad_b = grad_bias = None
    if need[0]:
        grad_x = lora_grad_input(grad_y, weight, absmax, nested_code, nested_absmax, offset,
                                 *ctx.blocksizes, grad_s, lora_A, seed, ctx.dropout)
    if need[1]:  # a dense frozen weight that the user left trainable
        grad_weight = torch.matmul(grad_y.t(), x)
    if need[9]:
        grad_a = lora_grad_a(grad_s, x, seed, ctx.dropout).to(lora_A.dtype)
    if need[10]:
        grad_b = (torch.matmul(grad_y.t(), s) * ctx.scaling).to(lora_B.dtype)
    if need[12]:
        grad_bias = grad_y.sum(0)
    return (grad_x, grad_weight, None, None, None, None, None, None, None, grad_a, grad_b, None,
            grad_bias, None, None)


lora_forward.register_autograd(_lora_backward, setup_context=_lora_setup_context)


def dropout_seed(device):
    """The seed ``lora_linear`` draws (from torch's generator) when dropout > 0, as a 1-element
    int64 tensor on ``device``: the kernels read it there, so drawing it needs no host sync."""
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)


def lora_dropout_mask(seed, shape, p):
    """The keep mask (bool, ``shape`` = M x K) that the LoRA kernels use for ``seed`` and ``p``."""
    mask = torch.empty(shape, dtype=torch.int8, device=seed.device)
    lora_kernels.dropout_mask(seed, mask, p)
    return mask.bool()


def lora_linear(x, weight, lora_A, lora_B, scaling, bias=None, dropout=0.0, quant_state=None):
    """LoRA / QLoRA linear: ``x W^T + bias + scaling * dropout(x) A^T B^T``, fused.

    - ``x``: (..., K), fp32/fp16/bf16. The output has x's shape but N features, and x's dtype.
    - ``weight``: dense (N x K) in x's dtype, or packed NF4 with its bitsandbytes ``quant_state``
      (a ``Params4bit`` is accepted directly and carries its own).
    - ``lora_A`` (r x K), ``lora_B`` (N x r): any float dtype (PEFT keeps fp32); they are cast to x's
      dtype for the products, which accumulate in fp32, and get gradients in their own dtype.
    - Gradients flow to x, lora_A and lora_B, and also to a dense weight or a bias that requires
      grad. An NF4 weight is frozen.
    - ``dropout`` applies to the LoRA branch's input only; its mask is drawn from torch's RNG as a
      seed (``dropout_seed``) and regenerated in backward, never stored.
    """
    quant_state = resolve_weight(weight, quant_state)
    N, K, packed = check_lora_args(x, weight, lora_A, lora_B, scaling, bias, dropout, quant_state)
    nested = quant_state is not None and quant_state.nested
    use_kernels = _dispatch.use_kernels(
        x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, bias=bias,
        absmax=None if quant_state is None else quant_state.absmax,
        nested_absmax=quant_state.state2.absmax if nested else None)
    if not use_kernels:
        return reference.lora_linear(x, weight, lora_A, lora_B, scaling, bias, dropout, quant_state)
    x2 = x.reshape(-1, K).contiguous()
    seed = dropout_seed(x.device) if dropout > 0 else torch.zeros(1, dtype=torch.int64, device=x.device)
    y, _ = lora_forward(x2, *weight_op_args(weight, packed, quant_state), N, lora_A, lora_B,
                        float(scaling), bias, float(dropout), seed)
    return y.reshape(*x.shape[:-1], N)
