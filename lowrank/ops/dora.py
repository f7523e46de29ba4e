"""DoRA linear (weight-decomposed LoRA), as PEFT computes it:

    g = m / ||W + s B A||_row          (the norm detached: a constant in backward, as in the paper)
    y = x W^T + b + (g - 1) * (x_d W^T) + g * s * x_d A^T B^T,      x_d = dropout(x)

which without dropout (and in eval) is ``g * (x W^T + s x A^T B^T) + b``. With dropout the base
weight meets both x and x_d, exactly as PEFT's (and the DoRA authors') forward has it, so the
forward's GEMMs read the frozen weight twice then; without dropout once, as LoRA's. The norm is one
more pass over the stored weight (a memory-bound read, no GEMM).

``DoraLinearFunction`` is the op. Its launch primitives are custom ops registered with
torch.library (fake implementations, so torch.compile traces through them):
``lowrank::dora_norm`` (the norm, one pass over the stored weight in ``kernels/dora_norm.py``),
``lowrank::dora_forward`` and ``lowrank::dora_grad_input``, which run the LoRA kernels
(``lowrank.ops.lora``) for the GEMMs, and ``lowrank::dora_grad_scale`` (backward's g dY, (g - 1) dY
and dm's column sums in one pass, ``kernels/dora_grad_scale.py``). ``dora_forward`` takes the
route ``lowrank.routes`` chooses:

- ``fused``: the LoRA forward kernel with DoRA's epilogue (``kernels/_dora_epilogue.py``): g and
  the bias applied to the fp32 tile before its one store, and the product that dm needs stored
  beside it when magnitude wants a gradient; with dropout, a first launch computes the undropped
  x W^T + b + s S B^T, which the second one's epilogue reads. Two GEMMs over W remain (x W^T and
  x_d W^T differ wherever the mask drops an element of x), and the second reads a stored
  dropout(x): applying the mask while it loads x instead regenerates it once per output-column
  tile (N / BLOCK_N times, where the shrink does it once): the static model puts that launch at
  2.8x (dense) and 2.0x (NF4) the time of one reading the stored copy, on H100 at M x K x N =
  4096 x 4096 x 14336 (estimates, not measurements).
- ``cublas`` and ``decode``: LoRA's forward by that route (``lowrank.ops.lora``), then g and the
  bias in one elementwise pass (fp32 arithmetic, one rounding to x's dtype, as the epilogue's).
"""

from typing import Optional

import torch

from lowrank import reference, routes
from lowrank._lora_args import check_dora_args, check_lora_factors, check_weight
from lowrank._quant_state import FLOAT_DTYPES
from lowrank.frozen_weight import FrozenWeight
from lowrank.kernels import dora_grad_scale as dora_grad_scale_kernel
from lowrank.kernels import dora_norm as dora_norm_kernel
from lowrank.kernels import lora_linear as lora_kernels
from lowrank.kernels.lora_linear_decode import DECODE_MAX_M
from lowrank.ops import lora
from lowrank.ops.gradients import InputGradients
from lowrank.ops.ia3 import ia3_backward
from lowrank.ops.lora import (dropout_seed, lora_dropout_mask, lora_grad_a, lora_grad_input,
                              lora_output_grad)


@torch.library.custom_op("lowrank::dora_norm", mutates_args=())
def dora_norm_op(weight: list[Optional[torch.Tensor]], weight_sizes: list[int],
                 lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """||W + scaling B A|| per output row, fp32 (N,)."""
    w = FrozenWeight.from_flat(weight, weight_sizes)
    norm = torch.empty(w.out_features, dtype=torch.float32, device=w.tensor.device)
    dora_norm_kernel.dora_norm(w.tensor, lora_A.float(), lora_B.float(), scaling, norm, w.nf4)
    return norm


@dora_norm_op.register_fake
def _(weight, weight_sizes, lora_A, lora_B, scaling):
    return lora_B.new_empty(lora_B.shape[0], dtype=torch.float32)


def _dropped(x, seed, dropout):
    """dropout(x) with the LoRA kernels' mask for ``seed``, scaled as they scale it (in fp32)."""
    keep = lora_dropout_mask(seed, x.shape, dropout)
    return torch.where(keep, x.float() / (1 - dropout), 0.0).to(x.dtype)


@torch.library.custom_op("lowrank::dora_forward", mutates_args=())
def dora_forward(x: torch.Tensor, weight: list[Optional[torch.Tensor]], weight_sizes: list[int],
                 lora_A: torch.Tensor, lora_B: torch.Tensor, column_scale: torch.Tensor,
                 scaling: float, bias: Optional[torch.Tensor], dropout: float, seed: torch.Tensor,
                 keep_product: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Y, S, Q) for contiguous x (M x K), in x's dtype (S in the branch's), g = ``column_scale`` (N, fp32):
    Y = x W^T + b + (g - 1) x_d W^T + g s S B^T, S = x_d A^T, and Q = x_d W^T + s S B^T (what dm
    needs) if ``keep_product``, else empty (0 x N). By the route ``lowrank.routes`` chooses."""
    w = FrozenWeight.from_flat(weight, weight_sizes)
    branch = reference.branch_dtype(x.dtype, lora_A, lora_B)  # S in fp32 for fp32 adapters
    args = (x, w, lora_A.to(branch), lora_B.to(branch), scaling,
            None if bias is None else bias.to(x.dtype), column_scale, dropout, seed, keep_product)
    candidates = {"fused": lambda: _forward_fused(*args),
                  "cublas": lambda: _forward_then_scale(lora._forward_cublas, *args)}
    if x.shape[0] <= DECODE_MAX_M:
        candidates["decode"] = lambda: _forward_then_scale(lora._forward_decode, *args)
    return routes.run("dora_forward", "forward", x, w, candidates)


def _forward_fused(x, w, a, b, scaling, bias, g, dropout, seed, keep_product):
    """The LoRA forward kernel with DoRA's epilogue: one launch, two with dropout."""
    m, n = x.shape[0], w.out_features
    y, s = x.new_empty(m, n), x.new_empty(m, a.shape[0], dtype=a.dtype)
    product = x.new_empty(m if keep_product else 0, n)
    lora_kernels.lora_shrink(x, a, s, seed, dropout)
    undropped = None
    if dropout > 0:  # P = x W^T + b + s S B^T, read by the epilogue (the bias is in it)
        undropped = torch.empty_like(y)
        lora_kernels.lora_forward(x, w.tensor, s, b, bias, undropped, scaling, w.nf4)
        x, bias = _dropped(x, seed, dropout), None
    lora_kernels.lora_forward(x, w.tensor, s, b, bias, y, scaling, w.nf4, column_scale=g,
                              undropped=undropped, product=product if keep_product else None)
    return y, s, product


def _forward_then_scale(route_forward, x, w, a, b, scaling, bias, g, dropout, seed, keep_product):
    """LoRA's forward by another route (``route_forward``: its cublas or decode function), then
    g and the bias in one elementwise pass: b + g P without dropout, P + (g - 1) Q with it (P
    holds the bias), computed in fp32 and rounded once into x's dtype."""
    if dropout == 0:
        product, s = route_forward(x, w, a, b, scaling, None, 0.0, seed)
        y = torch.empty_like(product)
        if bias is None:
            torch.mul(product, g, out=y)
        else:
            torch.addcmul(bias, product, g, out=y)
    else:
        undropped, s = route_forward(x, w, a, b, scaling, bias, dropout, seed)
        product, _ = route_forward(_dropped(x, seed, dropout), w, a, b, scaling, None, 0.0, seed)
        y = torch.addcmul(undropped, product, g - 1, out=torch.empty_like(undropped))
    return y, s, product if keep_product else product.new_empty(0, product.shape[1])


@dora_forward.register_fake
def _(x, weight, weight_sizes, lora_A, lora_B, column_scale, scaling, bias, dropout, seed,
      keep_product):
    n = FrozenWeight.from_flat(weight, weight_sizes).out_features
    return (x.new_empty(x.shape[0], n),
            x.new_empty(x.shape[0], lora_A.shape[0],
                        dtype=reference.branch_dtype(x.dtype, lora_A, lora_B)),
            x.new_empty(x.shape[0] if keep_product else 0, n))


@torch.library.custom_op("lowrank::dora_grad_input", mutates_args=())
def dora_grad_input(grad_y: torch.Tensor, grad_q: torch.Tensor,
                    weight: list[Optional[torch.Tensor]], weight_sizes: list[int],
                    grad_s: torch.Tensor, lora_A: torch.Tensor, seed: torch.Tensor,
                    dropout: float) -> torch.Tensor:
    """dX in dY's dtype (M x K). Without dropout ``grad_y`` is g dY and dX = g dY W + dS A (one
    LoRA kernel). With dropout dX = dY W + dropout'((g - 1) dY W + dS A), ``grad_q`` = (g - 1) dY:
    the second product is the LoRA kernel's, dY W the IA3 kernel's with l = 1 (a plain GEMM over
    the stored weight)."""
    if dropout == 0:
        return lora_grad_input(grad_y, weight, weight_sizes, grad_s, lora_A, seed, 0.0)
    through_dropout = lora_grad_input(grad_q, weight, weight_sizes, grad_s, lora_A, seed, 0.0)
    through_dropout = _dropped(through_dropout, seed, dropout)
    ones = grad_y.new_ones(grad_y.shape[1], dtype=torch.float32)
    direct, _ = ia3_backward(grad_y, through_dropout, weight, weight_sizes, ones, None, False,
                             True, False)
    return (direct.float() + through_dropout.float()).to(grad_y.dtype)


@dora_grad_input.register_fake
def _(grad_y, grad_q, weight, weight_sizes, grad_s, lora_A, seed, dropout):
    return grad_y.new_empty(grad_y.shape[0], lora_A.shape[1])


@torch.library.custom_op("lowrank::dora_grad_scale", mutates_args=())
def dora_grad_scale(grad_y: torch.Tensor, column_scale: torch.Tensor, product: torch.Tensor,
                    shifted: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(g dY; (g - 1) dY if ``shifted``, else empty (0 x N); the column sums of dY * Q, fp32 (N,),
    if ``product`` Q is not empty (0 x N), else empty (0,)) for contiguous dY (M x N), g =
    ``column_scale`` (N, fp32): one pass over dY and Q (``kernels/dora_grad_scale.py``), each
    product rounded once into dY's dtype."""
    m, n = grad_y.shape
    scaled = torch.empty_like(grad_y)
    shifted_out = torch.empty_like(grad_y) if shifted else grad_y.new_empty(0, n)
    sums_rows = dora_grad_scale_kernel.partial_rows(m) if product.shape[0] else 0
    partial = grad_y.new_empty(sums_rows, n, dtype=torch.float32)
    dora_grad_scale_kernel.dora_grad_scale(grad_y, column_scale, scaled,
                                           shifted_out if shifted else None,
                                           product if sums_rows else None,
                                           partial if sums_rows else None)
    return scaled, shifted_out, partial.sum(0) if sums_rows else partial.new_empty(0)


@dora_grad_scale.register_fake
def _(grad_y, column_scale, product, shifted):
    n = grad_y.shape[1]
    return (torch.empty_like(grad_y), grad_y.new_empty(grad_y.shape[0] if shifted else 0, n),
            grad_y.new_empty(n if product.shape[0] else 0, dtype=torch.float32))


class DoraLinearFunction(torch.autograd.Function):
    """The fused DoRA linear as an autograd Function, for trainers that call it directly:

        y = DoraLinearFunction.apply(x, weight, weight.tensor, lora_A, lora_B, magnitude,
                                     weight_norm, scaling, bias, dropout, seed)

    - ``x``: contiguous (M x K); ``weight``: a ``FrozenWeight``; ``weight.tensor`` again, so that a
      dense weight left trainable gets a gradient (an NF4 weight never does).
    - ``magnitude``: m (N,); ``weight_norm``: ||W + s B A|| per row, fp32 (N,), a constant here
      (``dora_norm`` computes it). ``scaling``, ``dropout``: floats; ``bias``: (N,) or None;
      ``seed``: as for ``LoraLinearFunction``. Arguments are used as given: ``dora_linear`` is the
      checked entry point.

    Saves x, S = x_d A^T, the seed, A, B, m, the norm, the frozen weight as it is stored, and,
    when m wants a gradient, one M x N product for dm: Q = x_d W^T + s S B^T.
    """

    @staticmethod
    def forward(ctx, x, weight, weight_tensor, lora_A, lora_B, magnitude, weight_norm, scaling,
                bias, dropout, seed):
        weight_tensors, weight_sizes = weight.flat()
        column_scale = magnitude.float() / weight_norm  # g, fp32
        y, s, product = dora_forward(x, weight_tensors, weight_sizes, lora_A, lora_B, column_scale,
                                     scaling, bias, dropout, seed,
                                     _DORA_GRADIENTS.needed(ctx)["magnitude"])
        ctx.save_for_backward(x, lora_A, lora_B, magnitude, weight_norm, seed, s, product,
                              *weight_tensors)
        ctx.weight_sizes, ctx.scaling, ctx.dropout = weight_sizes, scaling, dropout
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, lora_A, lora_B, magnitude, weight_norm, seed, s, product, *weight_tensors = \
            ctx.saved_tensors
        need = _DORA_GRADIENTS.needed(ctx)
        grad_y = grad_y.contiguous()
        # g dY: the gradient of x_d's LoRA branch; (g - 1) dY: of x_d W^T with dropout
        grad_scaled, grad_shifted, column_sums = dora_grad_scale(
            grad_y, magnitude.float() / weight_norm, product, ctx.dropout > 0)
        grad_s, grad_b = lora_output_grad(grad_scaled, s, lora_B, ctx.scaling)
        grad_q = grad_shifted if ctx.dropout > 0 else grad_scaled
        grads = {}
        if need["x"]:
            grads["x"] = dora_grad_input(grad_scaled if ctx.dropout == 0 else grad_y, grad_q,
                                         weight_tensors, ctx.weight_sizes, grad_s, lora_A, seed,
                                         ctx.dropout)
        if need["weight_tensor"]:  # a dense frozen weight that the user left trainable
            if ctx.dropout > 0:
                grads["weight_tensor"] = (torch.matmul(grad_y.t(), x) + torch.matmul(
                    grad_q.t(), _dropped(x, seed, ctx.dropout)))
            else:
                grads["weight_tensor"] = torch.matmul(grad_scaled.t(), x)
        if need["lora_A"]:
            grads["lora_A"] = lora_grad_a(grad_s, x, seed, ctx.dropout).to(lora_A.dtype)
        if need["lora_B"]:
            grads["lora_B"] = grad_b.to(lora_B.dtype)
        if need["magnitude"]:
            grads["magnitude"] = (column_sums / weight_norm).to(magnitude.dtype)
        if need["bias"]:
            grads["bias"] = grad_y.float().sum(0).to(grad_y.dtype)
        return _DORA_GRADIENTS.by_position(**grads)


_DORA_GRADIENTS = InputGradients(DoraLinearFunction, "x", "weight_tensor", "lora_A", "lora_B",
                                 "magnitude", "bias")


def dora_norm(weight, lora_A, lora_B, scaling, quant_state=None):
    """||W + scaling B A|| per output row (fp32, N values, no gradient): DoRA's weight norm, in one
    pass over the weight as it is stored (dense, or packed NF4 with its ``quant_state``, or a
    ``FrozenWeight``); W + s B A is never formed."""
    weight = check_weight("dora_norm", weight, quant_state)
    check_lora_factors("dora_norm", lora_A, lora_B, scaling, *weight.shape, FLOAT_DTYPES)
    if not weight.use_kernels(lora_A=lora_A, lora_B=lora_B) or 0 in weight.shape:
        return reference.dora_norm(weight, lora_A, lora_B, scaling)
    return dora_norm_op(*weight.flat(), lora_A.detach(), lora_B.detach(), float(scaling))


def dora_linear_checks(x, weight, lora_A, lora_B, magnitude, scaling, bias=None, dropout=0.0,
                       quant_state=None):
    """Everything ``dora_linear`` checks before it runs (a TypeError, ValueError or
    NotImplementedError naming the problem); returns the FrozenWeight."""
    weight = check_dora_args(x, weight, lora_A, lora_B, magnitude, scaling, bias, dropout,
                             quant_state)
    weight.use_kernels(x=x, lora_A=lora_A, lora_B=lora_B, magnitude=magnitude, bias=bias)
    return weight


def dora_linear(x, weight, lora_A, lora_B, magnitude, scaling, bias=None, dropout=0.0,
                quant_state=None, weight_norm=None):
    """DoRA linear, as PEFT computes it (see the module's docstring), fused where LoRA is.

    - ``x``, ``weight``, ``lora_A``, ``lora_B``, ``scaling``, ``bias``, ``dropout``,
      ``quant_state``: as for ``lora_linear`` (dense or NF4 weight, nested or not).
    - ``magnitude``: m, one value per output feature (PEFT's ``lora_magnitude_vector``, fp32).
    - ``weight_norm``: ||W + s B A|| per row (fp32) if the caller has it (an eval loop with fixed
      adapters); by default ``dora_norm`` computes it, one pass over the stored weight.
    - Gradients flow to x, lora_A, lora_B and magnitude (the norm is a constant, as in PEFT), and
      to a dense weight or a bias that requires grad.
    """
    weight = dora_linear_checks(x, weight, lora_A, lora_B, magnitude, scaling, bias, dropout,
                                quant_state)
    if weight_norm is not None and tuple(weight_norm.shape) != (weight.out_features,):
        raise ValueError(f"lowrank.dora_linear: weight_norm must be ({weight.out_features},), one "
                         f"value per output feature, got {tuple(weight_norm.shape)}")
    if (not weight.use_kernels(x=x, lora_A=lora_A, lora_B=lora_B, magnitude=magnitude, bias=bias)
            or x.numel() == 0 or weight.out_features == 0):
        return reference.dora_linear(x, weight, lora_A, lora_B, magnitude, scaling, bias, dropout,
                                     weight_norm=weight_norm)
    if weight_norm is None:
        weight_norm = dora_norm(weight, lora_A, lora_B, scaling)
    x2 = x.reshape(-1, weight.in_features).contiguous()
    seed = dropout_seed(x.device) if dropout > 0 else torch.empty(1, dtype=torch.int64, device=x.device)
    y = DoraLinearFunction.apply(x2, weight, weight.tensor, lora_A, lora_B, magnitude,
                                 weight_norm.detach().float(), float(scaling), bias,
                                 float(dropout), seed)
    return y.reshape(*x.shape[:-1], weight.out_features)
