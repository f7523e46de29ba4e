"""IA3 linear, fused: ``y = (x W^T + b) * l`` (output form) or ``(x * l) W^T + b`` (feed-forward
form).

``IA3LinearFunction`` is the op: its forward, its backward and what it saves. The custom ops are
its launch primitives, registered with torch.library with fake implementations so that
torch.compile traces through them. ``ia3_linear`` checks the arguments, runs ``lowrank.reference``
where ``lowrank._dispatch`` says so, and otherwise applies the Function. Kernels:
``kernels/ia3_linear.py``; inside the custom ops ``lowrank.routes`` picks, per call, these fused
kernels, dequantize + cuBLAS, or (forward, few rows) the LoRA forward's split-K decode kernel. The frozen weight reaches the custom ops in ``FrozenWeight.flat``'s form.
"""

from typing import Optional

import torch

from lowrank import reference, routes
from lowrank._lora_args import check_ia3_args
from lowrank.frozen_weight import FrozenWeight
from lowrank.kernels import ia3_linear as ia3_kernels
from lowrank.kernels import lora_linear_decode as lora_decode_kernels
from lowrank.ops.gradients import InputGradients


def ia3_scale(ia3):
    """l as the kernels read it: flat, contiguous fp32 (PEFT keeps it fp32 and scales in fp32)."""
    return ia3.detach().reshape(-1).float().contiguous()


def _form(feedforward):
    return "feedforward" if feedforward else "output"


@torch.library.custom_op("lowrank::ia3_forward", mutates_args=())
def ia3_forward(x: torch.Tensor, weight: list[Optional[torch.Tensor]], weight_sizes: list[int],
                ia3: torch.Tensor, bias: Optional[torch.Tensor], feedforward: bool) -> torch.Tensor:
    """Y for contiguous x (M x K), in x's dtype, by the route ``lowrank.routes`` chooses (decode
    among them at M <= DECODE_MAX_M)."""
    w = FrozenWeight.from_flat(weight, weight_sizes)
    args = (x, w, ia3_scale(ia3), None if bias is None else bias.to(x.dtype), feedforward)
    candidates = {"fused": lambda: _forward_fused(*args), "cublas": lambda: _forward_cublas(*args)}
    if x.shape[0] <= lora_decode_kernels.DECODE_MAX_M:
        candidates["decode"] = lambda: _forward_decode(*args)
    return routes.run(f"ia3_forward_{_form(feedforward)}", "forward", x, w, candidates)


def _forward_fused(x, w, scale, bias, feedforward):
    """The fused GEMM; the feed-forward form's x * l rounded once in a pass before it (M x K
    read and written: the GEMM's loop then streams x as the output form does)."""
    y = torch.empty(x.shape[0], w.out_features, dtype=x.dtype, device=x.device)
    if feedforward:
        x_in = torch.empty_like(x)
        ia3_kernels.scale_columns(x, scale, x_in)
        ia3_kernels.ia3_forward(x_in, w.tensor, bias, y, nf4=w.nf4)
    else:
        ia3_kernels.ia3_forward(x, w.tensor, bias, y, scale, w.nf4)
    return y


def _scaled(t, scale):
    """t * l computed in fp32 and rounded once to t's dtype (as PEFT and the kernels do), with no
    fp32 copy of t."""
    return torch.mul(t, scale, out=torch.empty_like(t))


def _forward_cublas(x, w, scale, bias, feedforward):
    """torch's GEMM on the dense (or dequantized) W in x's dtype; l applied to x before it
    (feed-forward form) or to Y in place after it (output form)."""
    dense = routes.dense_weight(w, x.dtype)
    x_in = _scaled(x, scale) if feedforward else x
    y = torch.mm(x_in, dense.t()) if bias is None else torch.addmm(bias, x_in, dense.t())
    return y if feedforward else y.mul_(scale)


def _forward_decode(x, w, scale, bias, feedforward):
    """The split-K decode kernel of the LoRA forward (the packed weight read once, for few rows),
    given a rank-1 adapter of zeros and scaling 0, so its branch adds exactly 0 for finite x; l
    applied to x before it, or to Y in place after it."""
    n, k = w.shape
    x_in = _scaled(x, scale) if feedforward else x
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    unused_s = torch.empty(x.shape[0], 1, dtype=x.dtype, device=x.device)
    unread_seed = torch.empty(1, dtype=torch.int64, device=x.device)  # no dropout
    lora_decode_kernels.lora_decode_forward(x_in, w.tensor, x.new_zeros(1, k), x.new_zeros(n, 1),
                                            bias, y, unused_s, unread_seed, 0.0, 0.0, w.nf4)
    return y if feedforward else y.mul_(scale)


@ia3_forward.register_fake
def _(x, weight, weight_sizes, ia3, bias, feedforward):
    return x.new_empty(x.shape[0], FrozenWeight.from_flat(weight, weight_sizes).out_features)


@torch.library.custom_op("lowrank::ia3_backward", mutates_args=())
def ia3_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: list[Optional[torch.Tensor]],
                 weight_sizes: list[int], ia3: torch.Tensor, bias: Optional[torch.Tensor],
                 feedforward: bool, need_grad_x: bool,
                 need_grad_ia3: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dX in dY's dtype, M x K; dl in fp32, flat): each empty when not needed. By the route
    ``lowrank.routes`` chooses (fused or cublas)."""
    w = FrozenWeight.from_flat(weight, weight_sizes)
    if not need_grad_ia3 and not need_grad_x:
        return grad_y.new_empty(0, x.shape[1]), ia3_scale(ia3).new_empty(0)
    args = (grad_y, x, w, ia3_scale(ia3), None if bias is None else bias.to(x.dtype), feedforward,
            need_grad_x, need_grad_ia3)
    return routes.run(f"ia3_backward_{_form(feedforward)}", "backward", grad_y, w,
                      {"fused": lambda: _backward_fused(*args),
                       "cublas": lambda: _backward_cublas(*args)})


@ia3_backward.register_fake
def _(grad_y, x, weight, weight_sizes, ia3, bias, feedforward, need_grad_x, need_grad_ia3):
    return (grad_y.new_empty(x.shape[0] if need_grad_x else 0, x.shape[1]),
            x.new_empty(ia3.numel() if need_grad_ia3 else 0, dtype=torch.float32))


def _backward_fused(grad_y, x, w, scale, bias, feedforward, need_grad_x, need_grad_ia3):
    M, K = x.shape
    nf4 = w.nf4
    grad_x = grad_y.new_empty(M if need_grad_x else 0, K)
    grad_ia3 = scale.new_empty(0)
    partials = None
    if need_grad_ia3:  # one row of token-sums per block of BLOCK_M tokens, summed below in order
        partials = scale.new_empty(ia3_kernels.partial_rows(M, feedforward), scale.numel())
    if feedforward:  # dl comes from the dX kernel, which holds dY W: it runs either way
        dx = grad_x if need_grad_x else grad_y.new_empty(M, K)
        ia3_kernels.ia3_grad_input(grad_y, w.tensor, dx, scale, x, partials, nf4)
    else:
        if need_grad_x:  # dY * l rounded once in a pass before the GEMM, as the forward's x * l
            scaled_grad_y = torch.empty_like(grad_y)
            ia3_kernels.scale_columns(grad_y, scale, scaled_grad_y)
            ia3_kernels.ia3_grad_input(scaled_grad_y, w.tensor, grad_x, nf4=nf4)
        if need_grad_ia3:
            ia3_kernels.ia3_grad_scale(x, w.tensor, bias, grad_y, partials, nf4)
    if need_grad_ia3:
        grad_ia3 = partials.sum(0)
    return grad_x, grad_ia3


def _backward_cublas(grad_y, x, w, scale, bias, feedforward, need_grad_x, need_grad_ia3):
    """torch's GEMMs on the dense (or dequantized) W in x's dtype. Feed-forward form: dY W once,
    dl = sum over tokens of (dY W) * x, dX = (dY W) * l. Output form: dX = (dY * l) W, and
    dl = sum over tokens of dY * (x W^T + b), x W^T + b recomputed. Token sums in fp32."""
    dense = routes.dense_weight(w, grad_y.dtype)
    grad_x = grad_y.new_empty(0, x.shape[1])
    grad_ia3 = scale.new_empty(0)
    if feedforward:
        grad_base = torch.mm(grad_y, dense)
        if need_grad_ia3:
            grad_ia3 = (grad_base * x).sum(0, dtype=torch.float32)
        if need_grad_x:
            grad_x = grad_base.mul_(scale)
        return grad_x, grad_ia3
    if need_grad_x:
        grad_x = torch.mm(_scaled(grad_y, scale), dense)
    if need_grad_ia3:
        base = torch.mm(x, dense.t()) if bias is None else torch.addmm(bias, x, dense.t())
        grad_ia3 = base.mul_(grad_y).sum(0, dtype=torch.float32)
    return grad_x, grad_ia3


class IA3LinearFunction(torch.autograd.Function):
    """The fused IA3 linear as an autograd Function, for trainers that call it directly:

        y = IA3LinearFunction.apply(x, weight, weight.tensor, ia3, bias, feedforward)

    - ``x``: contiguous (M x K); ``weight``: a ``FrozenWeight``; ``weight.tensor`` passed again as
      an input of its own, since autograd gives gradients only to tensors passed to ``apply``: a
      dense weight that requires grad gets one (an NF4 weight never does).
    - ``ia3``: l, N values (output form) or K values (``feedforward``), flat or as PEFT shapes it;
      ``bias``: (N,) or None. Arguments are used as given: ``ia3_linear`` is the checked entry point.

    Saves x, l, the bias and the frozen weight as it is stored (packed NF4 stays packed). Not Y,
    nor x W^T + b: the output form's dl recomputes it.
    """

    @staticmethod
    def forward(ctx, x, weight, weight_tensor, ia3, bias, feedforward):
        weight_tensors, weight_sizes = weight.flat()
        y = ia3_forward(x, weight_tensors, weight_sizes, ia3, bias, feedforward)
        ctx.save_for_backward(x, ia3, bias, *weight_tensors)
        ctx.weight_sizes, ctx.feedforward = weight_sizes, feedforward
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, ia3, bias, *weight_tensors = ctx.saved_tensors
        need = _IA3_GRADIENTS.needed(ctx)
        grad_y = grad_y.contiguous()
        grad_x, grad_ia3 = ia3_backward(grad_y, x, weight_tensors, ctx.weight_sizes, ia3, bias,
                                        ctx.feedforward, need["x"], need["ia3"])
        grads = {}
        if need["x"]:
            grads["x"] = grad_x
        if need["ia3"]:
            grads["ia3"] = grad_ia3.to(ia3.dtype).reshape(ia3.shape)
        if need["weight_tensor"] or need["bias"]:  # a dense weight or a bias left trainable
            scale = ia3_scale(ia3)
            grad_out = grad_y if ctx.feedforward else (grad_y.float() * scale).to(grad_y.dtype)
            if need["weight_tensor"]:
                x_in = (x.float() * scale).to(x.dtype) if ctx.feedforward else x
                grads["weight_tensor"] = torch.matmul(grad_out.t(), x_in)
            if need["bias"]:
                grads["bias"] = grad_out.float().sum(0).to(bias.dtype)
        return _IA3_GRADIENTS.by_position(**grads)


_IA3_GRADIENTS = InputGradients(IA3LinearFunction, "x", "weight_tensor", "ia3", "bias")


def ia3_linear_checks(x, weight, ia3, bias=None, feedforward=False, quant_state=None):
    """Everything ``ia3_linear`` checks before it runs (a TypeError, ValueError or
    NotImplementedError naming the problem); returns the FrozenWeight."""
    weight = check_ia3_args(x, weight, ia3, bias, feedforward, quant_state)
    weight.use_kernels(x=x, ia3=ia3, bias=bias)
    return weight


def ia3_linear(x, weight, ia3, bias=None, feedforward=False, quant_state=None):
    """IA3 linear, fused: ``(x W^T + bias) * l`` (output form, ``ia3`` has N values) or, with
    ``feedforward=True``, ``(x * l) W^T + bias`` (``ia3`` has K values).

    - ``x``: (..., K), fp32/fp16/bf16; the output has x's shape but N features, and x's dtype.
    - ``weight``: dense (N x K) in x's dtype, or packed NF4 with its bitsandbytes ``quant_state``
      (a ``Params4bit`` carries its own), decoded in registers inside the GEMMs, or a
      ``FrozenWeight``.
    - ``ia3``: l flat ((N,) / (K,)) or as PEFT stores it ((N, 1) / (1, K)), any float dtype. It is
      applied in fp32 (as PEFT does); the GEMMs run in x's dtype with fp32 accumulation.
    - Gradients flow to x and ``ia3`` (in its own dtype and shape), and to a dense weight or a bias
      that requires grad. dl is reduced inside the kernels, deterministically.
    """
    weight = ia3_linear_checks(x, weight, ia3, bias, feedforward, quant_state)
    # Empty products: the reference, as in lora_linear.
    if (not weight.use_kernels(x=x, ia3=ia3, bias=bias) or x.numel() == 0
            or weight.out_features == 0):
        return reference.ia3_linear(x, weight, ia3, bias, feedforward)
    x2 = x.reshape(-1, weight.in_features).contiguous()
    y = IA3LinearFunction.apply(x2, weight, weight.tensor, ia3, bias, bool(feedforward))
    return y.reshape(*x.shape[:-1], weight.out_features)
