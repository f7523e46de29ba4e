"""lowrank's kernel ops, registered with ``torch.library`` (with fake implementations) so that
``torch.compile`` traces through them. They run the Triton kernels; the public modules
(``lowrank.nf4``, ...) validate arguments and ask ``lowrank._dispatch`` whether to call them or the
reference.
"""

from typing import Optional

import torch

from lowrank import _dispatch, reference
from lowrank._lora_args import (check_bias, check_ia3_args, check_ia3_vector, check_lora_args,
                                check_lora_factors, check_merge_args, resolve_weight)
from lowrank._quant_state import (FLOAT_DTYPES, NESTED_BLOCKSIZE, absmax_fp32, build_quant_state,
                                  code_books)
from lowrank.kernels import ia3_linear as ia3_kernels
from lowrank.kernels import ia3_merge as ia3_merge_kernel
from lowrank.kernels import lora_linear as lora_kernels
from lowrank.kernels import lora_linear_decode as lora_decode_kernels
from lowrank.kernels import lora_merge as lora_merge_kernel
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


def nf4_quant_state(shape, dtype, blocksize, absmax, double_quant):
    """The QuantState of freshly quantized NF4 blocks with fp32 ``absmax``: double quantization of
    absmax around its mean, as bitsandbytes does, when ``double_quant``."""
    if not double_quant:
        return build_quant_state(shape, dtype, blocksize, absmax)
    offset = absmax.mean()
    absmax_codes, nested_absmax = nf4_quantize_absmax(absmax, offset)
    return build_quant_state(shape, dtype, blocksize, absmax_codes, nested=(offset, nested_absmax))


# LoRA / QLoRA linear. The weight reaches the kernel ops as a dense (N x K) tensor, or as flat packed
# NF4 bytes with the tensors that decode them (absmax, and for nested states nested_code,
# nested_absmax and offset); the NF4 ones are None for a dense weight.

def _weight_operands(weight, quant_state, packed):
    """The weight as the kernel ops take it: (weight or packed bytes, absmax, nested_code,
    nested_absmax, offset, blocksize, nested_blocksize)."""
    if quant_state is None:
        return weight, None, None, None, None, 1, 1
    if quant_state.nested:
        return (packed, quant_state.absmax, quant_state.state2.code.float(),
                quant_state.state2.absmax.float(), quant_state.offset.float().reshape(()),
                quant_state.blocksize, quant_state.state2.blocksize)
    return packed, absmax_fp32(quant_state), None, None, None, quant_state.blocksize, 1


def _use_kernels(weight, quant_state, **tensors):
    """_dispatch.use_kernels for these tensors and the weight with its quant state's tensors."""
    nested = quant_state is not None and quant_state.nested
    return _dispatch.use_kernels(
        weight=weight, **tensors, absmax=None if quant_state is None else quant_state.absmax,
        nested_absmax=quant_state.state2.absmax if nested else None)


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
    weight, quant_state = resolve_weight(weight, quant_state)
    N, K, packed = check_lora_args(x, weight, lora_A, lora_B, scaling, bias, dropout, quant_state)
    # An empty product (M, N or K = 0) leaves no tile to compute, and the launchers assume at least
    # one: the reference gives its empty or bias-only result, and gradients (zeros) of each shape.
    if (not _use_kernels(weight, quant_state, x=x, lora_A=lora_A, lora_B=lora_B, bias=bias)
            or x.numel() == 0 or N == 0):
        return reference.lora_linear(x, weight, lora_A, lora_B, scaling, bias, dropout, quant_state)
    x2 = x.reshape(-1, K).contiguous()
    # Without dropout the kernels never read the seed: an empty one costs no fill kernel per call.
    seed = dropout_seed(x.device) if dropout > 0 else torch.empty(1, dtype=torch.int64, device=x.device)
    y, _ = lora_forward(x2, *_weight_operands(weight, quant_state, packed), N, lora_A, lora_B,
                        float(scaling), bias, float(dropout), seed)
    return y.reshape(*x.shape[:-1], N)


# IA3 linear: Y = (x W^T + b) * l (output form) or (x * l) W^T + b (feed-forward form). The weight
# reaches the kernel ops as for the LoRA linear ops.

def _ia3_scale(ia3):
    """l as the kernels read it: flat, contiguous fp32 (PEFT keeps it fp32 and scales in fp32)."""
    return ia3.detach().reshape(-1).float().contiguous()


@torch.library.custom_op("lowrank::ia3_forward", mutates_args=())
def ia3_forward(x: torch.Tensor, weight: torch.Tensor, absmax: Optional[torch.Tensor],
                nested_code: Optional[torch.Tensor], nested_absmax: Optional[torch.Tensor],
                offset: Optional[torch.Tensor], blocksize: int, nested_blocksize: int,
                out_features: int, ia3: torch.Tensor, bias: Optional[torch.Tensor],
                feedforward: bool) -> torch.Tensor:
    """Y for contiguous x (M x K), in x's dtype."""
    M, K = x.shape
    y = torch.empty(M, out_features, dtype=x.dtype, device=x.device)
    ia3_kernels.ia3_forward(
        x, weight, _ia3_scale(ia3), None if bias is None else bias.to(x.dtype), y, feedforward,
        _nf4_decoding(absmax, nested_code, nested_absmax, offset, blocksize, nested_blocksize, K))
    return y


@ia3_forward.register_fake
def _(x, weight, absmax, nested_code, nested_absmax, offset, blocksize, nested_blocksize,
      out_features, ia3, bias, feedforward):
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("lowrank::ia3_backward", mutates_args=())
def ia3_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                 absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
                 nested_absmax: Optional[torch.Tensor], offset: Optional[torch.Tensor],
                 blocksize: int, nested_blocksize: int, ia3: torch.Tensor,
                 bias: Optional[torch.Tensor], feedforward: bool, need_grad_x: bool,
                 need_grad_ia3: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dX in dY's dtype, M x K; dl in fp32, flat): each empty when not needed."""
    M, K = x.shape
    scale = _ia3_scale(ia3)
    nf4 = _nf4_decoding(absmax, nested_code, nested_absmax, offset, blocksize, nested_blocksize, K)
    grad_x = grad_y.new_empty(M if need_grad_x else 0, K)
    grad_ia3 = scale.new_empty(0)
    if not need_grad_ia3 and not need_grad_x:
        return grad_x, grad_ia3
    partials = None
    if need_grad_ia3:  # one row of token-sums per block of BLOCK_M tokens, summed below in order
        partials = scale.new_empty(ia3_kernels.partial_rows(M, feedforward), scale.numel())
    if feedforward:  # dl comes from the dX kernel, which holds dY W: it runs either way
        dx = grad_x if need_grad_x else grad_y.new_empty(M, K)
        ia3_kernels.ia3_grad_input(grad_y, weight, scale, x, dx, partials, True, nf4)
    else:
        if need_grad_x:
            ia3_kernels.ia3_grad_input(grad_y, weight, scale, x, grad_x, None, False, nf4)
        if need_grad_ia3:
            ia3_kernels.ia3_grad_scale(x, weight, None if bias is None else bias.to(x.dtype),
                                       grad_y, partials, nf4)
    if need_grad_ia3:
        grad_ia3 = partials.sum(0)
    return grad_x, grad_ia3


@ia3_backward.register_fake
def _(grad_y, x, weight, absmax, nested_code, nested_absmax, offset, blocksize, nested_blocksize,
      ia3, bias, feedforward, need_grad_x, need_grad_ia3):
    return (grad_y.new_empty(x.shape[0] if need_grad_x else 0, x.shape[1]),
            x.new_empty(ia3.numel() if need_grad_ia3 else 0, dtype=torch.float32))


def _ia3_setup_context(ctx, inputs, output):
    (x, weight, absmax, nested_code, nested_absmax, offset, blocksize, nested_blocksize,
     out_features, ia3, bias, feedforward) = inputs
    # Saved: x and the weight as stored (packed NF4 stays packed). Not Y, nor x W^T + b: the output
    # form's dl recomputes it.
    ctx.save_for_backward(x, weight, absmax, nested_code, nested_absmax, offset, ia3, bias)
    ctx.blocksizes = (blocksize, nested_blocksize)
    ctx.feedforward = feedforward


def _ia3_backward(ctx, grad_y):
    x, weight, absmax, nested_code, nested_absmax, offset, ia3, bias = ctx.saved_tensors
    grad_y = grad_y.contiguous()
    need = ctx.needs_input_grad
    grad_x, grad_ia3 = ia3_backward(grad_y, x, weight, absmax, nested_code, nested_absmax, offset,
                                    *ctx.blocksizes, ia3, bias, ctx.feedforward, need[0], need[9])
    scale = _ia3_scale(ia3)
    grad_weight = grad_bias = None
    if need[1] or need[10]:  # a dense weight or a bias the user left trainable: plain torch
        grad_out = grad_y if ctx.feedforward else (grad_y.float() * scale).to(grad_y.dtype)
        if need[1]:
            x_in = (x.float() * scale).to(x.dtype) if ctx.feedforward else x
            grad_weight = torch.matmul(grad_out.t(), x_in)
        if need[10]:
            grad_bias = grad_out.float().sum(0).to(bias.dtype)
    return (grad_x if need[0] else None, grad_weight, None, None, None, None, None, None, None,
            grad_ia3.to(ia3.dtype).reshape(ia3.shape) if need[9] else None, grad_bias, None)


ia3_forward.register_autograd(_ia3_backward, setup_context=_ia3_setup_context)


def ia3_linear(x, weight, ia3, bias=None, feedforward=False, quant_state=None):
    """IA3 linear, fused: ``(x W^T + bias) * l`` (output form, ``ia3`` has N values) or, with
    ``feedforward=True``, ``(x * l) W^T + bias`` (``ia3`` has K values).

    - ``x``: (..., K), fp32/fp16/bf16; the output has x's shape but N features, and x's dtype.
    - ``weight``: dense (N x K) in x's dtype, or packed NF4 with its bitsandbytes ``quant_state``
      (a ``Params4bit`` carries its own), decoded in registers inside the GEMMs.
    - ``ia3``: l flat ((N,) / (K,)) or as PEFT stores it ((N, 1) / (1, K)), any float dtype. It is
      applied in fp32 (as PEFT does); the GEMMs run in x's dtype with fp32 accumulation.
    - Gradients flow to x and ``ia3`` (in its own dtype and shape), and to a dense weight or a bias
      that requires grad. dl is reduced inside the kernels, deterministically.
    """
    weight, quant_state = resolve_weight(weight, quant_state)
    N, K, packed = check_ia3_args(x, weight, ia3, bias, feedforward, quant_state)
    # Empty products: the reference, as in lora_linear.
    if not _use_kernels(weight, quant_state, x=x, ia3=ia3, bias=bias) or x.numel() == 0 or N == 0:
        return reference.ia3_linear(x, weight, ia3, bias, feedforward, quant_state)
    x2 = x.reshape(-1, K).contiguous()
    y = ia3_forward(x2, *_weight_operands(weight, quant_state, packed), N, ia3, bias,
                    bool(feedforward))
    return y.reshape(*x.shape[:-1], N)


# Merging adapters into the frozen weight. The result is written to ``out``: dense (N x K, any
# strides; the weight itself for the in-place merges), or flat packed NF4 bytes with ``out_absmax``
# (fp32, one per block of the input's blocksize).

def _merge_outputs(out_absmax, nf4):
    """The merge launchers' keyword arguments for the weight's decoding and an NF4 result."""
    if out_absmax is None:
        return {"nf4": nf4}
    return {"out_absmax": out_absmax, "bounds": code_books(out_absmax.device)[1], "nf4": nf4}


@torch.library.custom_op("lowrank::lora_merge", mutates_args=("out", "out_absmax"))
def lora_merge(weight: torch.Tensor, absmax: Optional[torch.Tensor],
               nested_code: Optional[torch.Tensor], nested_absmax: Optional[torch.Tensor],
               offset: Optional[torch.Tensor], blocksize: int, nested_blocksize: int,
               lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, out: torch.Tensor,
               out_absmax: Optional[torch.Tensor]) -> None:
    """``out`` = W + scaling B A, summed in fp32."""
    nf4 = _nf4_decoding(absmax, nested_code, nested_absmax, offset, blocksize, nested_blocksize,
                        lora_A.shape[1])
    lora_merge_kernel.lora_merge(weight, lora_A.float(), lora_B.float(), scaling, out,
                                 **_merge_outputs(out_absmax, nf4))


@lora_merge.register_fake
def _(weight, absmax, nested_code, nested_absmax, offset, blocksize, nested_blocksize, lora_A,
      lora_B, scaling, out, out_absmax):
    return None


@torch.library.custom_op("lowrank::ia3_merge", mutates_args=("out", "out_absmax"))
def ia3_merge(weight: torch.Tensor, absmax: Optional[torch.Tensor],
              nested_code: Optional[torch.Tensor], nested_absmax: Optional[torch.Tensor],
              offset: Optional[torch.Tensor], blocksize: int, nested_blocksize: int,
              out_features: int, in_features: int, ia3: torch.Tensor, feedforward: bool,
              unmerge: bool, out: torch.Tensor, out_absmax: Optional[torch.Tensor]) -> None:
    """``out`` = W * l (or W / l with ``unmerge``), l along N or, ``feedforward``, along K."""
    nf4 = _nf4_decoding(absmax, nested_code, nested_absmax, offset, blocksize, nested_blocksize,
                        in_features)
    ia3_merge_kernel.ia3_merge(weight, _ia3_scale(ia3), (out_features, in_features), feedforward,
                               unmerge, out, **_merge_outputs(out_absmax, nf4))


@ia3_merge.register_fake
def _(weight, absmax, nested_code, nested_absmax, offset, blocksize, nested_blocksize,
      out_features, in_features, ia3, feedforward, unmerge, out, out_absmax):
    return None


def _merge_into(run, weight, quant_state, packed, shape, dtype):
    """Allocate the merge's result, let ``run(operands, out, out_absmax)`` fill it, return it:
    dense in ``dtype`` (default the weight's), or for NF4 with dtype None (packed, quant_state)
    requantized with the input's blocksize and nesting, packed like the input."""
    operands = _weight_operands(weight, quant_state, packed)
    if quant_state is None or dtype is not None:
        out = torch.empty(shape, dtype=dtype or (weight.dtype if quant_state is None else
                                                 quant_state.dtype), device=weight.device)
        run(operands, out, None)
        return out
    out = torch.empty_like(packed)
    out_absmax = torch.empty(quant_state.absmax.numel(), dtype=torch.float32, device=out.device)
    run(operands, out, out_absmax)
    state = nf4_quant_state(quant_state.shape, quant_state.dtype, quant_state.blocksize,
                            out_absmax, quant_state.nested)
    return out.view(weight.dtype).reshape(weight.shape), state


def merge_lora(weight, lora_A, lora_B, scaling, quant_state=None, dtype=None):
    """The weight with a LoRA adapter merged in: ``W + scaling * B A`` in one kernel, fp32 sums.

    - Dense ``weight`` (N x K): a new dense tensor in the weight's dtype (or ``dtype``).
    - Packed NF4 ``weight`` with its ``quant_state`` (a ``Params4bit`` carries its own):
      with ``dtype=None``, ``(packed, quant_state)``, requantized in the same kernel with the same
      blocksize and nesting: the bytes bitsandbytes' ``quantize_4bit`` gives for the fp32 merged
      weight. Lossy (a second NF4 rounding). With ``dtype`` (bf16/fp16/fp32), the lossless merge
      into a dense weight of that dtype ("merge and unload to 16-bit").
    - To unmerge an NF4 merge, keep the original packed bytes and quant_state (half a byte per
      weight): they are the exact unmerged weight; requantizing W' - s B A would not give them back.
    """
    weight, quant_state = resolve_weight(weight, quant_state)
    N, K, packed = check_merge_args("merge_lora", weight, quant_state, dtype)
    check_lora_factors("merge_lora", lora_A, lora_B, scaling, N, K, FLOAT_DTYPES)
    if not _use_kernels(weight, quant_state, lora_A=lora_A, lora_B=lora_B):
        return reference.merge_lora(weight, lora_A, lora_B, scaling, quant_state, dtype)
    with torch.no_grad():
        return _merge_into(lambda operands, out, out_absmax: lora_merge(
            *operands, lora_A, lora_B, float(scaling), out, out_absmax),
            weight, quant_state, packed, (N, K), dtype)


def _lora_merge_in_place(op, weight, lora_A, lora_B, scaling):
    N, K, _ = check_merge_args(op, weight, resolve_weight(weight, None)[1], None, in_place=True)
    check_lora_factors(op, lora_A, lora_B, scaling, N, K, FLOAT_DTYPES)
    with torch.no_grad():
        if not _use_kernels(weight, None, lora_A=lora_A, lora_B=lora_B):
            return weight.copy_(reference.merge_lora(weight, lora_A, lora_B, scaling))
        lora_merge(weight, None, None, None, None, 1, 1, lora_A, lora_B, float(scaling), weight,
                   None)
    return weight


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
    weight, quant_state = resolve_weight(weight, quant_state)
    N, K, packed = check_merge_args("merge_ia3", weight, quant_state, dtype)
    check_ia3_vector("merge_ia3", ia3, feedforward, N, K, FLOAT_DTYPES)
    check_bias("merge_ia3", bias, N, FLOAT_DTYPES)
    if not _use_kernels(weight, quant_state, ia3=ia3, bias=bias):
        return reference.merge_ia3(weight, ia3, feedforward, bias, quant_state, dtype)
    with torch.no_grad():
        merged = _merge_into(lambda operands, out, out_absmax: ia3_merge(
            *operands, N, K, ia3, bool(feedforward), False, out, out_absmax),
            weight, quant_state, packed, (N, K), dtype)
        return merged, _scaled_bias(bias, ia3, feedforward)


def _ia3_merge_in_place(op, weight, ia3, feedforward, bias, unmerge):
    N, K, _ = check_merge_args(op, weight, resolve_weight(weight, None)[1], None, in_place=True)
    check_ia3_vector(op, ia3, feedforward, N, K, FLOAT_DTYPES)
    check_bias(op, bias, N, FLOAT_DTYPES)
    with torch.no_grad():
        if bias is not None:
            bias.copy_(_scaled_bias(bias, ia3, feedforward, unmerge))
        if not _use_kernels(weight, None, ia3=ia3, bias=bias):
            weight.copy_(reference.ia3_scaled_weight(weight, ia3, feedforward, unmerge))
        else:
            ia3_merge(weight, None, None, None, None, 1, 1, N, K, ia3, bool(feedforward), unmerge,
                      weight, None)
    return weight, bias


def merge_ia3_(weight, ia3, feedforward=False, bias=None):
    """Merge in place into a dense weight (and bias, output form); returns ``(weight, bias)``."""
    return _ia3_merge_in_place("merge_ia3_", weight, ia3, feedforward, bias, unmerge=False)


def unmerge_ia3_(weight, ia3, feedforward=False, bias=None):
    """Undo ``merge_ia3_`` in place by dividing by l (correctly rounded); returns ``(weight, bias)``.
    The original comes back up to the rounding of one multiply and one divide in the weight's dtype
    (l must have no zeros). (NF4: keep the original packed bytes and quant_state instead.)"""
    return _ia3_merge_in_place("unmerge_ia3_", weight, ia3, feedforward, bias, unmerge=True)
