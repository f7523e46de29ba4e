"""LoRA / QLoRA linear, fused: ``y = x W^T + b + scaling * dropout(x) A^T B^T``.

``LoraLinearFunction`` is the op: its forward, its backward and what it saves. The custom ops are
its launch primitives, registered with torch.library with fake implementations so that
torch.compile traces through them. ``lora_linear`` checks the arguments, runs ``lowrank.reference``
where ``lowrank._dispatch`` says so, and otherwise applies the Function. Kernels:
``kernels/lora_linear.py`` (tiled, training shapes) and ``kernels/lora_linear_decode.py`` (split-K,
at most ``DECODE_MAX_M`` rows). Inside the custom ops ``lowrank.routes`` picks, per call, how the
GEMMs over the frozen weight run: these fused kernels, dequantize + cuBLAS, or the split-K
decode. The frozen weight reaches the custom ops in ``FrozenWeight.flat``'s form.

The LoRA branch computes in ``reference.branch_dtype``: x's dtype, or fp32 for fp32 adapters of a
16-bit x (as PEFT's branch): then S and dS are fp32, the kernels take the fp32 adapters and split
them into two 16-bit parts for the tensor cores (``branch_dot`` in kernels/lora_linear.py), and the
cuBLAS route does the same split as one GEMM of three times the rank (``split_product``). Every
route, forward and backward, so dA and dB are near-fp32 too.
"""

from typing import Optional

import torch

from lowrank import reference, routes
from lowrank._lora_args import check_lora_args
from lowrank.frozen_weight import FrozenWeight
from lowrank.kernels import lora_linear as lora_kernels
from lowrank.kernels import lora_linear_decode as lora_decode_kernels
from lowrank.kernels import lora_output_grad as output_grad_kernels
from lowrank.ops.gradients import InputGradients


@torch.library.custom_op("lowrank::lora_forward", mutates_args=())
def lora_forward(x: torch.Tensor, weight: list[Optional[torch.Tensor]], weight_sizes: list[int],
                 lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                 bias: Optional[torch.Tensor], dropout: float, seed: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y, S) for contiguous x (M x K): Y = x W^T + b + s S B^T, S = dropout(x) A^T, by the route
    ``lowrank.routes`` chooses (decode among them at M <= DECODE_MAX_M)."""
    w = FrozenWeight.from_flat(weight, weight_sizes)
    branch = reference.branch_dtype(x.dtype, lora_A, lora_B)
    args = (x, w, lora_A.to(branch), lora_B.to(branch), scaling,
            None if bias is None else bias.to(x.dtype), dropout, seed)
    candidates = {"fused": lambda: _forward_fused(*args), "cublas": lambda: _forward_cublas(*args)}
    if x.shape[0] <= lora_decode_kernels.DECODE_MAX_M:
        candidates["decode"] = lambda: _forward_decode(*args)
    return routes.run("lora_forward", "forward", x, w, candidates)


def _outputs(x, w, a):
    """Empty Y (M x N) in x's dtype and S (M x r) in A's (the branch's)."""
    return (torch.empty(x.shape[0], w.out_features, dtype=x.dtype, device=x.device),
            torch.empty(x.shape[0], a.shape[0], dtype=a.dtype, device=x.device))


def _forward_fused(x, w, a, b, scaling, bias, dropout, seed):
    y, s = _outputs(x, w, a)
    lora_kernels.lora_shrink(x, a, s, seed, dropout)
    lora_kernels.lora_forward(x, w.tensor, s, b, bias, y, scaling, w.nf4)
    return y, s


def _forward_decode(x, w, a, b, scaling, bias, dropout, seed):
    """Split-K: the packed weight read once, for few rows."""
    y, s = _outputs(x, w, a)
    lora_decode_kernels.lora_decode_forward(x, w.tensor, a, b, bias, y, s, seed, dropout, scaling,
                                            w.nf4)
    return y, s


def _forward_cublas(x, w, a, b, scaling, bias, dropout, seed):
    """W dense in x's dtype (NF4 dequantized into the workspace), then torch's GEMM, in the form
    that moves fewer bytes (``joined_forward``): for an NF4 W, one GEMM [x | S] [W | sB]^T, the
    shrink kernel writing x's copy and S into the joined operand as it reads x, and the dequantize
    kernel W into rows of the workspace beside s B; otherwise Y = s S B^T (+ bias) first, then
    x W^T accumulated into it by one addmm_ (beta = 1: cuBLAS reads Y inside the GEMM, which its
    flops bound, instead of a pass of its own that reads and writes Y again). fp32 S and B (the
    fp32 branch): ``split_product``'s 3r columns in place of S and B, so the branch stays
    near-fp32; outside the joined GEMM it is accumulated into the rounded x W^T (+ bias) by the
    addmm_, in fp32, and so rounded once, as PEFT adds its fp32 branch (rounded to x's dtype
    first, for x W^T to accumulate into, it would lose that). S comes from the shrink kernel,
    which applies the dropout mask that backward regenerates (x's copy stays undropped). The
    bias by addmm."""
    m, k = x.shape
    n, rank = b.shape
    s = torch.empty(m, rank, dtype=a.dtype, device=x.device)
    split = a.dtype != x.dtype
    columns = 3 * rank if split else rank
    if w.nf4 is not None and joined_forward(m, k, n, columns, split):
        joined = torch.empty(m, k + columns, dtype=x.dtype, device=x.device)
        lora_kernels.lora_shrink(x, a, s, seed, dropout, joined)
        weight = routes.weight_beside(w, x.dtype, columns)
        weight[:, k:].copy_(split_rhs(b * scaling, x.dtype))  # s B in fp32 for an fp32 B
        y = torch.mm(joined, weight.t()) if bias is None else torch.addmm(bias, joined, weight.t())
        return y, s
    lora_kernels.lora_shrink(x, a, s, seed, dropout)
    dense = routes.dense_weight(w, x.dtype)
    if split:
        y = torch.mm(x, dense.t()) if bias is None else torch.addmm(bias, x, dense.t())
        s_parts, b_parts = split_product(s, b, x.dtype)
        return y.addmm_(s_parts, b_parts.t(), alpha=scaling), s
    if bias is None:  # beta = 0: the empty Y is not read
        y = x.new_empty(m, n).addmm_(s, b.t(), beta=0, alpha=scaling)
    else:
        y = torch.addmm(bias, s, b.t(), alpha=scaling)
    return y.addmm_(x, dense.t()), s


def joined_forward(m, k, n, columns, split):
    """Whether the cublas route's forward over an NF4 weight takes the single GEMM
    [x | S] [W | sB]^T (``columns``: S's columns in it, r, or 3r for the ``split`` fp32 branch)
    rather than x W^T and a rank-r GEMM: the byte rule. Beyond the plain x W^T both forms read x
    and write W once; the joined form also writes x's copy (M K), writes the adapter's columns
    beside x and W and reads them in the GEMM (2 (M + N) columns); the other form reads S and B
    ((M + N) columns) and writes Y once more (M N: s S B^T, which the big GEMM's addmm_ then reads
    inside its flops-bound time, not counted), or for the split branch reads and writes Y again
    (2 M N: its addmm_ into x W^T). Counted in elements of x's dtype (every operand is in it). A
    dense W never joins: copying it would cost N K more."""
    return m * k + 2 * (m + n) * columns < (2 if split else 1) * m * n + (m + n) * columns


def joined_grad_input(m, k, n, columns, split):
    """Whether the cublas route's dX over an NF4 weight (no dropout) takes the single GEMM
    [dY | dS] [W ; A] (``columns``: dS's columns in it, r, or 3r for the ``split`` fp32 branch)
    rather than dY W and a rank-r GEMM: the byte rule, as ``joined_forward``'s. Beyond the plain
    dY W, the joined form reads dY and writes its copy beside dS (2 M N), and writes, reads and
    copies the adapter's columns (3 (M + K) columns: dS and A copied in, then read by the GEMM);
    the other form reads dS and A ((M + K) columns) and writes dX once more (M K: dS A, read by
    the big GEMM's addmm_ inside its flops-bound time, not counted), or for the split branch
    reads and writes dX again (2 M K). In elements of dY's dtype."""
    return 2 * m * n + 3 * (m + k) * columns < (2 if split else 1) * m * k + (m + k) * columns


def split_product(lhs, rhs_t, dtype):
    """Operands (L, R) in ``dtype`` with L R^T = lhs rhs_t^T, for torch's GEMMs on the branch:
    ``lhs`` and ``rhs_t`` themselves when they are in ``dtype``; for fp32 ones (the fp32 branch of
    a 16-bit x), each split into hi + lo in ``dtype`` and L = [hi | hi | lo], R = [hi | lo | hi]
    (inner size 3r): ``branch_dot``'s three products as one 16-bit GEMM, accumulated in fp32 and,
    as an addmm_, rounded into the output once. (The shrink kernel's joined operand lays out an
    fp32 S as L.)"""
    if lhs.dtype == dtype:
        return lhs, rhs_t
    lhs_hi, lhs_lo = _split(lhs, dtype)
    return torch.cat((lhs_hi, lhs_hi, lhs_lo), 1), split_rhs(rhs_t, dtype)


def split_rhs(rhs_t, dtype):
    """``split_product``'s R alone: ``rhs_t`` itself in ``dtype``, else [hi | lo | hi]."""
    if rhs_t.dtype == dtype:
        return rhs_t
    hi, lo = _split(rhs_t, dtype)
    return torch.cat((hi, lo, hi), 1)


def _split(t, dtype):
    """fp32 ``t`` as hi + lo in ``dtype``: hi rounded, lo the remainder (exact in fp32) rounded."""
    hi = t.to(dtype)
    return hi, (t - hi.float()).to(dtype)


@lora_forward.register_fake
def _(x, weight, weight_sizes, lora_A, lora_B, scaling, bias, dropout, seed):
    out_features = FrozenWeight.from_flat(weight, weight_sizes).out_features
    return x.new_empty(x.shape[0], out_features), x.new_empty(
        x.shape[0], lora_A.shape[0], dtype=reference.branch_dtype(x.dtype, lora_A, lora_B))


@torch.library.custom_op("lowrank::lora_shrink", mutates_args=())
def lora_shrink(x: torch.Tensor, lora_A: torch.Tensor, seed: torch.Tensor,
                dropout: float) -> torch.Tensor:
    """S = dropout(x) A^T (M x r) in the branch's dtype (``reference.branch_dtype`` of x and A),
    for x (M x K, any strides)."""
    a = lora_A.to(reference.branch_dtype(x.dtype, lora_A))
    s = torch.empty(x.shape[0], a.shape[0], dtype=a.dtype, device=x.device)
    lora_kernels.lora_shrink(x, a, s, seed, dropout)
    return s


@lora_shrink.register_fake
def _(x, lora_A, seed, dropout):
    return x.new_empty(x.shape[0], lora_A.shape[0],
                       dtype=reference.branch_dtype(x.dtype, lora_A))


@torch.library.custom_op("lowrank::lora_output_grad", mutates_args=())
def lora_output_grad(grad_y: torch.Tensor, s: torch.Tensor, lora_B: torch.Tensor,
                     scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dS, dB) = (s dY B in S's dtype, s dY^T S in fp32) in one pass over dY (M x N): the
    backward's two products with dY, on every route. S's dtype is the branch's (fp32: B and S
    split, near-fp32 as in forward)."""
    grad_s = torch.empty_like(s)
    grad_b = torch.empty(lora_B.shape, dtype=torch.float32, device=grad_y.device)
    output_grad_kernels.lora_output_grad(grad_y, s, lora_B.to(s.dtype), scaling, grad_s, grad_b)
    return grad_s, grad_b


@lora_output_grad.register_fake
def _(grad_y, s, lora_B, scaling):
    return torch.empty_like(s), lora_B.new_empty(lora_B.shape, dtype=torch.float32)


@torch.library.custom_op("lowrank::lora_grad_input", mutates_args=())
def lora_grad_input(grad_y: torch.Tensor, weight: list[Optional[torch.Tensor]],
                    weight_sizes: list[int], grad_s: torch.Tensor, lora_A: torch.Tensor,
                    seed: torch.Tensor, dropout: float) -> torch.Tensor:
    """dX = dY W + dropout'(dS A), in dY's dtype (M x K), by the route ``lowrank.routes``
    chooses (fused or cublas: there is no decode kernel for dX). dS A in dS's dtype (the
    branch's; fp32: near-fp32 as in forward)."""
    w = FrozenWeight.from_flat(weight, weight_sizes)
    args = (grad_y, w, grad_s, lora_A.to(grad_s.dtype), seed, dropout)
    return routes.run("lora_grad_input", "backward", grad_y, w,
                      {"fused": lambda: _grad_input_fused(*args),
                       "cublas": lambda: _grad_input_cublas(*args)})


def _grad_input_fused(grad_y, w, grad_s, a, seed, dropout):
    grad_x = torch.empty(grad_y.shape[0], w.in_features, dtype=grad_y.dtype, device=grad_y.device)
    lora_kernels.lora_grad_input(grad_y, w.tensor, grad_s, a, grad_x, seed, dropout, w.nf4)
    return grad_x


def _grad_input_cublas(grad_y, w, grad_s, a, seed, dropout):
    """dY W + dS A by torch's GEMMs on the dense (or dequantized) W, in the form that moves fewer
    bytes. For an NF4 weight without dropout where ``joined_grad_input`` says so, one GEMM
    [dY | dS] [W ; A]: A is stacked under W in the workspace (r x K, small) and dY copied beside dS
    (M x (N + r)). Otherwise dX = dS A first, then dY W accumulated into it by one addmm_ (beta:
    cuBLAS reads dX inside the GEMM, which its flops bound, instead of a pass of its own that reads
    and writes dX again); with dropout, dS A is masked first (the forward's mask, regenerated from
    the seed) and 1 / (1 - p) is the addmm_'s beta. A dense W is never copied, so it always takes
    the addmm_. fp32 dS and A (the fp32 branch): ``split_product``'s operands (3r wide) in place of
    dS and A (with dropout, dS A in fp32), accumulated into the rounded dY W in fp32, as in the
    forward, so that the near-fp32 branch is rounded once."""
    m, n, k = grad_y.shape[0], *w.shape
    split = grad_s.dtype != grad_y.dtype
    if dropout == 0:
        ds_parts, a_parts = split_product(grad_s, a.t(), grad_y.dtype)
        if w.nf4 is not None and joined_grad_input(m, k, n, ds_parts.shape[1], split):
            stacked = routes.stacked_weight(w, grad_y.dtype, ds_parts.shape[1])
            stacked[n:].copy_(a_parts.t())
            return torch.mm(torch.cat((grad_y, ds_parts), dim=1), stacked)
        dense = routes.dense_weight(w, grad_y.dtype)
        if split:
            return torch.mm(grad_y, dense).addmm_(ds_parts, a_parts.t())
        return torch.mm(grad_s, a).addmm_(grad_y, dense)
    keep = torch.empty(m, k, dtype=torch.int8, device=grad_y.device)
    lora_kernels.dropout_mask(seed, keep, dropout)
    branch = torch.mm(grad_s, a).mul_(keep)
    dense = routes.dense_weight(w, grad_y.dtype)
    if split:
        return torch.mm(grad_y, dense).add_(branch, alpha=1 / (1 - dropout))
    return branch.addmm_(grad_y, dense, beta=1 / (1 - dropout))


@lora_grad_input.register_fake
def _(grad_y, weight, weight_sizes, grad_s, lora_A, seed, dropout):
    return grad_y.new_empty(grad_y.shape[0], lora_A.shape[1])


@torch.library.custom_op("lowrank::lora_grad_a", mutates_args=())
def lora_grad_a(grad_s: torch.Tensor, x: torch.Tensor, seed: torch.Tensor,
                dropout: float) -> torch.Tensor:
    """dA = dS^T dropout(x) in fp32 (r x K), the dropout mask regenerated from ``seed``; dS in the
    branch's dtype (fp32: split, near-fp32)."""
    grad_a = torch.empty(grad_s.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    lora_kernels.lora_grad_a(grad_s, x, grad_a, seed, dropout)
    return grad_a


@lora_grad_a.register_fake
def _(grad_s, x, seed, dropout):
    return x.new_empty(grad_s.shape[1], x.shape[1], dtype=torch.float32)


class LoraLinearFunction(torch.autograd.Function):
    """The fused LoRA / QLoRA linear as an autograd Function, for trainers that call it directly:

        y = LoraLinearFunction.apply(x, weight, weight.tensor, lora_A, lora_B, scaling, bias,
                                     dropout, seed)

    - ``x``: contiguous (M x K); ``weight``: a ``FrozenWeight``; ``weight.tensor`` passed again as
      an input of its own, since autograd gives gradients only to tensors passed to ``apply``: a
      dense weight that requires grad gets one (an NF4 weight never does).
    - ``scaling``, ``dropout``: floats; ``bias``: (N,) or None; ``seed``: a 1-element int64 tensor
      on x's device from ``dropout_seed`` (any such tensor when dropout is 0: it is not read).
    - Arguments are used as given: ``lora_linear`` is the checked entry point.

    Saves x, S = dropout(x) A^T, the seed (the dropout mask is regenerated from it), A, B and the
    frozen weight as it is stored: packed NF4 stays packed, the dense W is never kept. Not Y.
    """

    @staticmethod
    def forward(ctx, x, weight, weight_tensor, lora_A, lora_B, scaling, bias, dropout, seed):
        weight_tensors, weight_sizes = weight.flat()
        y, s = lora_forward(x, weight_tensors, weight_sizes, lora_A, lora_B, scaling, bias,
                            dropout, seed)
        ctx.save_for_backward(x, lora_A, lora_B, seed, s, *weight_tensors)
        ctx.weight_sizes, ctx.scaling, ctx.dropout = weight_sizes, scaling, dropout
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, lora_A, lora_B, seed, s, *weight_tensors = ctx.saved_tensors
        need = _LORA_GRADIENTS.needed(ctx)
        grad_y = grad_y.contiguous()
        # dS and dB in one pass over dY (dY is the largest operand either reads), before dX. dS is
        # not folded into the dX kernel: there each program would also read a B tile per N step,
        # +8% L2 bytes on sm_90's tiles, +12.5% on sm_89's (dense; NF4 +17%), more than the dY
        # read saved (static model, 4096 x 4096 x 14336: about +138 us against -39 us on H100,
        # +376 us against -130 us on RTX 4090).
        grad_s, grad_b = lora_output_grad(grad_y, s, lora_B, ctx.scaling)
        grads = {}
        if need["x"]:
            grads["x"] = lora_grad_input(grad_y, weight_tensors, ctx.weight_sizes, grad_s, lora_A,
                                         seed, ctx.dropout)
        if need["weight_tensor"]:  # a dense frozen weight that the user left trainable
            grads["weight_tensor"] = torch.matmul(grad_y.t(), x)
        if need["lora_A"]:
            grads["lora_A"] = lora_grad_a(grad_s, x, seed, ctx.dropout).to(lora_A.dtype)
        if need["lora_B"]:
            grads["lora_B"] = grad_b.to(lora_B.dtype)
        if need["bias"]:
            grads["bias"] = grad_y.sum(0)
        return _LORA_GRADIENTS.by_position(**grads)


_LORA_GRADIENTS = InputGradients(LoraLinearFunction, "x", "weight_tensor", "lora_A", "lora_B",
                                 "bias")


def dropout_seed(device):
    """The seed ``lora_linear`` draws (from torch's generator) when dropout > 0, as a 1-element
    int64 tensor on ``device``: the kernels read it there, so drawing it needs no host sync."""
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)


def lora_dropout_mask(seed, shape, p):
    """The keep mask (bool, ``shape`` = M x K) that the LoRA kernels use for ``seed`` and ``p``."""
    mask = torch.empty(shape, dtype=torch.int8, device=seed.device)
    lora_kernels.dropout_mask(seed, mask, p)
    return mask.bool()


def lora_linear_checks(x, weight, lora_A, lora_B, scaling, bias=None, dropout=0.0,
                       quant_state=None):
    """Everything ``lora_linear`` checks before it runs (a TypeError, ValueError or
    NotImplementedError naming the problem); returns the FrozenWeight."""
    weight = check_lora_args(x, weight, lora_A, lora_B, scaling, bias, dropout, quant_state,
                             tensor_scaling=True)
    weight.use_kernels(x=x, lora_A=lora_A, lora_B=lora_B, bias=bias,
                       scaling=scaling if isinstance(scaling, torch.Tensor) else None)
    return weight


def lora_linear(x, weight, lora_A, lora_B, scaling, bias=None, dropout=0.0, quant_state=None):
    """LoRA / QLoRA linear: ``x W^T + bias + scaling * dropout(x) A^T B^T``, fused.

    - ``x``: (..., K), fp32/fp16/bf16. The output has x's shape but N features, and x's dtype.
    - ``weight``: dense (N x K) in x's dtype, or packed NF4 with its bitsandbytes ``quant_state``
      (a ``Params4bit`` is accepted directly and carries its own), or a ``FrozenWeight``.
    - ``lora_A`` (r x K), ``lora_B`` (N x r): any float dtype (PEFT keeps fp32). The branch
      computes in x's dtype, or near-fp32 where x is 16-bit and an adapter is fp32 (as PEFT's
      fp32 branch, at 16-bit tensor-core speed: ``reference.branch_dtype``); the products
      accumulate in fp32, and the adapters get gradients in their own dtype.
    - Gradients flow to x, lora_A and lora_B, and also to a dense weight or a bias that requires
      grad. An NF4 weight is frozen.
    - ``scaling``: a number, or a 0-d floating tensor on the adapters' device (as PEFT's
      ``prepare_model_for_compiled_hotswap`` makes it; under torch.compile a new value does not
      recompile); gradients flow to a tensor scaling that requires grad.
    - ``dropout`` applies to the LoRA branch's input only; its mask is drawn from torch's RNG as a
      seed (``dropout_seed``) and regenerated in backward, never stored.
    """
    weight = lora_linear_checks(x, weight, lora_A, lora_B, scaling, bias, dropout, quant_state)
    if isinstance(scaling, torch.Tensor):
        # PEFT's compiled hot swap keeps scaling as a 0-d tensor so that a new value is data, not a
        # recompile: it is folded into B (one N x r multiply, which autograd differentiates), and
        # the kernels scale by 1.
        lora_B, scaling = lora_B * scaling.to(lora_B.dtype), 1.0
    # An empty product (M, N or K = 0) leaves no tile to compute, and the launchers assume at least
    # one: the reference gives its empty or bias-only result, and gradients (zeros) of each shape.
    if (not weight.use_kernels(x=x, lora_A=lora_A, lora_B=lora_B, bias=bias)
            or x.numel() == 0 or weight.out_features == 0):
        return reference.lora_linear(x, weight, lora_A, lora_B, scaling, bias, dropout)
    x2 = x.reshape(-1, weight.in_features).contiguous()
    # Without dropout the kernels never read the seed: an empty one costs no fill kernel per call.
    seed = dropout_seed(x.device) if dropout > 0 else torch.empty(1, dtype=torch.int64, device=x.device)
    y = LoraLinearFunction.apply(x2, weight, weight.tensor, lora_A, lora_B, float(scaling), bias,
                                 float(dropout), seed)
    return y.reshape(*x.shape[:-1], weight.out_features)
