"""Grouped LoRA GEMM over the experts of a mixture-of-experts block: for rows sorted by expert,
``y = x W_e^T + scaling * x A_e^T B_e^T`` with each row's expert e, every expert in one launch.

The adapters are in PEFT's ``target_parameters`` layout (``ParamWrapper``): ``lora_A`` (E r x K),
whose rows e r .. e r + r are A_e, and ``lora_B`` (N x r E), whose columns e, e + E, e + 2E, ...
are B_e. The kernels read A through strides as it is; B, whose ranks are E apart, is copied once
per step into an E x N x r tensor in x's dtype (``_experts_b``: small, the experts' weights
dominate what a launch reads), which the forward makes and saves for the backward, so that every
kernel loads B_e's rows whole (for a 16-bit x; an fp32 x reads PEFT's fp32 B through strides).
Gradients are written straight into PEFT's layout.

``LoraGroupedFunction`` is the op (forward, backward, what it saves); ``lora_grouped_forward`` and
``lora_grouped_backward`` are its launch primitives, registered with torch.library with fake
implementations so that torch.compile traces through them. ``lora_grouped`` checks the arguments
and runs ``lowrank.reference.lora_grouped`` where ``lowrank._dispatch`` says so. Kernels:
``kernels/lora_grouped.py``.
"""

from typing import Optional

import torch

from lowrank import reference
from lowrank._dispatch import use_kernels
from lowrank._quant_state import FLOAT_DTYPES
from lowrank.kernels import lora_grouped as kernels
from lowrank.ops.gradients import InputGradients


def _shapes(weight, transposed):
    """(experts, out_features N, in_features K) of the stacked expert weight."""
    experts, first, second = weight.shape
    return (experts, second, first) if transposed else (experts, first, second)


def _weight_strides(weight, transposed):
    """W_e's (expert, n, k) strides in ``weight`` (E x N x K, or E x K x N when transposed)."""
    e, first, second = weight.stride()
    return (e, second, first) if transposed else (e, first, second)


def _rank(lora_A, experts):
    return lora_A.shape[0] // experts


def _experts_b(lora_B, experts, dtype):
    """B as E x N x r in ``dtype``: PEFT's N x (r E) has B_e's ranks E apart, which
    the kernels would gather element by element, each 4-byte element in a 32-byte sector of its
    own (static report, sm_90, Qwen3-30B-A3B's down: read in place, the dX GEMM's K loop issues 4
    LDGSTS.32 a warp for B where the copy takes one LDGSTS.64, 32 KB of sectors a K step where its
    tiles load 48 KB; the forward's expand, 128 KB of sectors a tile: more than the copy costs).
    This copy (contiguous, r N E values, small next to the experts' weights that the same launches
    read) lets them load whole rows. Made once per step, by the forward, and saved for the
    backward. Where B is in ``dtype`` already (fp32 x, PEFT's fp32 adapters) ``to`` copies
    nothing: the kernels read PEFT's B through these strides, and nothing more is saved."""
    rank = lora_B.shape[1] // experts
    return lora_B.detach().reshape(lora_B.shape[0], rank, experts).permute(2, 0, 1).to(
        dtype, memory_format=torch.contiguous_format)


def expert_offsets(expert_ids, experts):
    """The E + 1 row offsets (int32) of rows sorted by expert, from each row's expert id (sorted,
    as ``torch.sort`` returns them): rows offsets[e] .. offsets[e + 1] belong to expert e."""
    ends = torch.searchsorted(expert_ids, torch.arange(experts, device=expert_ids.device),
                              right=True)
    return torch.cat((ends.new_zeros(1), ends)).to(torch.int32)


@torch.library.custom_op("lowrank::lora_grouped_forward", mutates_args=())
def lora_grouped_forward(x: torch.Tensor, weight: torch.Tensor, transposed: bool,
                         lora_A: torch.Tensor, experts_b: torch.Tensor, scaling: float,
                         offsets: torch.Tensor, row_index: Optional[torch.Tensor],
                         bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y, S): S = x A_e^T (S x r, x's dtype), Y = x W_e^T + s S B_e^T (+ bias_e, E x N, added
    in the GEMM's epilogue) (x's dtype), B_e = ``experts_b``[e] (``_experts_b``: E x N x r in x's
    dtype); the sorted rows are x[row_index] if ``row_index`` is given (gathered by the kernels),
    else x."""
    experts, out_features, _ = _shapes(weight, transposed)
    rank = _rank(lora_A, experts)
    rows = _sorted_rows(x, row_index)
    y = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    s = torch.empty(rows, rank, dtype=x.dtype, device=x.device)
    if rows == 0:
        return y, s
    a = lora_A.stride()
    w_strides = _weight_strides(weight, transposed)
    if rank and kernels.fuses_shrink(x.device, x.dtype, rank, x.shape[1], out_features,
                                          transposed):
        # S from the GEMM's own pass over x: no shrink pass.
        kernels.grouped_forward(x, weight, w_strides, lora_A, (rank * a[0], a[1], a[0]),
                                experts_b, experts_b.stride(), s, y, offsets, scaling, row_index,
                                bias)
        return y, s
    if rank:
        kernels.grouped_shrink(x, lora_A, (rank * a[0], a[0], a[1]), s, offsets, row_index)
    kernels.grouped_gemm(x, weight, w_strides, s, experts_b, experts_b.stride(), y, offsets,
                         scaling, row_index, bias)
    return y, s


@lora_grouped_forward.register_fake
def _(x, weight, transposed, lora_A, experts_b, scaling, offsets, row_index, bias=None):
    experts, out_features, _ = _shapes(weight, transposed)
    rows = _sorted_rows(x, row_index)
    return x.new_empty(rows, out_features), x.new_empty(rows, _rank(lora_A, experts))


def _sorted_rows(x, row_index):
    return x.shape[0] if row_index is None else row_index.shape[0]


@torch.library.custom_op("lowrank::lora_grouped_backward", mutates_args=())
def lora_grouped_backward(grad_y: torch.Tensor, x: torch.Tensor, s: torch.Tensor,
                          weight: torch.Tensor, transposed: bool, lora_A: torch.Tensor,
                          experts_b: torch.Tensor, scaling: float, offsets: torch.Tensor,
                          row_index: Optional[torch.Tensor]
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX in x's dtype and shape, dA, dB in fp32, in PEFT's layout): dS = s dY B_e, dX = dY W_e
    + dS A_e, dA_e = dS_e^T x_e, dB_e = s dY_e^T S_e, B_e = ``experts_b``[e] (the forward's
    ``_experts_b``). With ``row_index`` the sorted rows' dX is summed into x's rows
    (``index_add_``, as autograd takes a gather back)."""
    experts, out_features, in_features = _shapes(weight, transposed)
    rank = _rank(lora_A, experts)
    rows = _sorted_rows(x, row_index)
    grad_x = torch.empty(rows, in_features, dtype=x.dtype, device=x.device)
    grad_a = torch.empty(lora_A.shape, dtype=torch.float32, device=x.device)
    grad_b = torch.empty(_peft_b_shape(experts_b), dtype=torch.float32, device=x.device)
    if rows == 0:
        return torch.zeros_like(x), grad_a.zero_(), grad_b.zero_()
    # No zero fill of dA and dB: the kernels write every element, zeros for experts without rows
    # (Qwen3-30B-A3B's layer: 52 MB of fills, about 17 us on H100 at copy bandwidth, estimate).
    grad_s = torch.empty(rows, rank, dtype=x.dtype, device=x.device)
    a = lora_A.stride()
    a_t = (rank * a[0], a[1], a[0])  # A_e^T's (expert, k, rank) in PEFT's (E r) x K
    grad_b_strides = (1, rank * experts, experts)  # dB_e's (n, rank) in PEFT's N x (r E)
    e, n, k = _weight_strides(weight, transposed)
    if rank and kernels.fuses_output_grad(x.device, x.dtype, rank, in_features,
                                              out_features):
        # dS and dB inside the dX GEMM, which streams dY anyway: no pass over dY of their own.
        kernels.grouped_grad_input(grad_y, weight, (e, k, n), s, experts_b, experts_b.stride(),
                                   lora_A, a_t, grad_x, grad_s, grad_b, grad_b_strides, offsets,
                                   scaling)
    else:
        if rank:  # dS and dB in one pass over dY
            kernels.grouped_output_grad(grad_y, s, experts_b, experts_b.stride(), grad_b,
                                        grad_b_strides, grad_s, offsets, scaling)
        kernels.grouped_gemm(grad_y, weight, (e, k, n), grad_s, lora_A, a_t, grad_x, offsets, 1.0)
    if rank:
        kernels.grouped_weight_grad(grad_s, x, grad_a, (rank * in_features, in_features, 1),
                                    offsets, 1.0, row_index)
    if row_index is not None:
        grad_x = torch.zeros_like(x).index_add_(0, row_index, grad_x)
    return grad_x, grad_a, grad_b


@lora_grouped_backward.register_fake
def _(grad_y, x, s, weight, transposed, lora_A, experts_b, scaling, offsets, row_index):
    return (torch.empty_like(x), lora_A.new_empty(lora_A.shape, dtype=torch.float32),
            lora_A.new_empty(_peft_b_shape(experts_b), dtype=torch.float32))


def _peft_b_shape(experts_b):
    """PEFT's (N, r E) for B's E x N x r copy."""
    experts, out_features, rank = experts_b.shape
    return out_features, rank * experts


class LoraGroupedFunction(torch.autograd.Function):
    """The grouped LoRA GEMM as an autograd Function:

        y = LoraGroupedFunction.apply(x, weight, transposed, lora_A, lora_B, scaling, offsets,
                                      row_index, bias)

    ``x`` contiguous: (S x K) rows sorted by expert, or with ``row_index`` (S,) any rows, sorted
    row i being x[row_index[i]] (the kernels gather them); ``weight`` the frozen E x N x K expert
    stack (E x K x N when ``transposed``: gpt-oss's layout); ``offsets`` (E + 1,) int32.
    Arguments are used as given: ``lora_grouped`` is the checked entry point. Saves x (not a
    sorted copy), row_index, S = x A_e^T (S x r), the adapters, B as E x N x r in x's dtype
    (``_experts_b``: for a 16-bit x a copy, made once for both passes), offsets and the weight as
    stored (no copy). ``bias``: the experts' frozen biases (E x N, x's dtype) or None, added in
    the forward's epilogue. The weight and the bias get no gradient."""

    @staticmethod
    def forward(ctx, x, weight, transposed, lora_A, lora_B, scaling, offsets, row_index,
                bias=None):
        experts_b = _experts_b(lora_B, weight.shape[0], x.dtype)
        y, s = lora_grouped_forward(x, weight, transposed, lora_A, experts_b, scaling, offsets,
                                    row_index, bias)
        # lora_B itself too: autograd then refuses a backward after B changed in place, which
        # the copy would not see.
        ctx.save_for_backward(x, s, weight, lora_A, lora_B, experts_b, offsets, row_index)
        ctx.transposed, ctx.scaling = transposed, scaling
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, s, weight, lora_A, lora_B, experts_b, offsets, row_index = ctx.saved_tensors
        need = _GROUPED_GRADIENTS.needed(ctx)
        grad_x, grad_a, grad_b = lora_grouped_backward(grad_y.contiguous(), x, s, weight,
                                                       ctx.transposed, lora_A, experts_b,
                                                       ctx.scaling, offsets, row_index)
        grads = {"x": grad_x if need["x"] else None}
        if need["lora_A"]:
            grads["lora_A"] = grad_a.to(lora_A.dtype)
        if need["lora_B"]:
            grads["lora_B"] = grad_b.to(lora_B.dtype)
        return _GROUPED_GRADIENTS.by_position(**grads)


_GROUPED_GRADIENTS = InputGradients(LoraGroupedFunction, "x", "lora_A", "lora_B")


def lora_grouped_checks(x, weight, lora_A, lora_B, scaling, offsets, transposed=False,
                        row_index=None, bias=None):
    """Everything ``lora_grouped`` checks before it runs: a TypeError or ValueError naming the
    problem. The offsets' and row_index's values are checked by ``check_offsets`` (on the
    device)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"lowrank.lora_grouped: x must be a 2-D fp32/fp16/bf16 tensor (rows sorted "
                        f"by expert), got {_describe(x)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 3 or weight.dtype != x.dtype:
        raise TypeError(f"lowrank.lora_grouped: weight must be a 3-D expert stack in x's dtype "
                        f"{x.dtype}, got {_describe(weight)}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("lowrank.lora_grouped: the expert weight requires grad; it is frozen here "
                         "(only the adapters train)")
    experts, out_features, in_features = _shapes(weight, transposed)
    if x.shape[1] != in_features:
        raise ValueError(f"lowrank.lora_grouped: x has {x.shape[1]} features, the experts take "
                         f"{in_features} (weight {tuple(weight.shape)}, transposed={transposed})")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.dtype.is_floating_point:
            raise TypeError(f"lowrank.lora_grouped: {name} must be a 2-D float tensor, got "
                            f"{_describe(t)}")
    rank, rest = divmod(lora_A.shape[0], experts)
    if rest or lora_A.shape[1] != in_features or tuple(lora_B.shape) != (out_features,
                                                                           rank * experts):
        raise ValueError(f"lowrank.lora_grouped: for {experts} experts of {in_features} -> "
                         f"{out_features} features, lora_A must be (E r, {in_features}) and lora_B "
                         f"({out_features}, r E) (PEFT's target_parameters layout), got "
                         f"{tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
        raise TypeError(f"lowrank.lora_grouped: scaling must be a number, got {scaling!r}")
    if (not isinstance(offsets, torch.Tensor) or offsets.dim() != 1
            or offsets.dtype not in (torch.int32, torch.int64) or offsets.numel() != experts + 1):
        raise TypeError(f"lowrank.lora_grouped: offsets must be {experts + 1} int32/int64 row "
                        f"offsets (one more than the experts), got {_describe(offsets)}")
    if row_index is not None and (not isinstance(row_index, torch.Tensor) or row_index.dim() != 1
                                  or row_index.dtype not in (torch.int32, torch.int64)):
        raise TypeError(f"lowrank.lora_grouped: row_index must be a 1-D int32/int64 tensor (x's "
                        f"row of each sorted row), got {_describe(row_index)}")
    if bias is not None:
        if (not isinstance(bias, torch.Tensor) or bias.dtype != x.dtype
                or tuple(bias.shape) != (experts, out_features)):
            raise TypeError(f"lowrank.lora_grouped: bias must be the experts' ({experts}, "
                            f"{out_features}) biases in x's dtype {x.dtype}, got "
                            f"{_describe(bias)}")
        if bias.requires_grad and torch.is_grad_enabled():
            raise ValueError("lowrank.lora_grouped: the expert bias requires grad; it is frozen "
                             "here (added in the forward's epilogue, only the adapters train)")
    use_kernels(x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, offsets=offsets,
                row_index=row_index, bias=bias)


def check_offsets(offsets, rows, row_index=None, x_rows=None):
    """Offsets must rise from 0 to ``rows``, and ``row_index`` (if given) name rows of x's
    ``x_rows``: otherwise the kernels would reach rows x does not have. Checked where they are,
    without waiting for the device (``torch._assert_async``): on a CPU it raises here
    (RuntimeError), on a GPU it is a device-side assert before any kernel reads them."""
    valid = (offsets[0] == 0) & (offsets[-1] == rows) & (offsets[1:] >= offsets[:-1]).all()
    torch._assert_async(valid, f"lowrank.lora_grouped: offsets must rise from 0 to the {rows} "
                        "rows of x (rows sorted by expert)")
    if row_index is not None and rows:
        inside = (row_index.min() >= 0) & (row_index.max() < x_rows)
        torch._assert_async(inside, f"lowrank.lora_grouped: row_index must name rows of x's "
                            f"{x_rows}")


def _describe(value):
    if isinstance(value, torch.Tensor):
        return f"a {value.dim()}-D {value.dtype} tensor of shape {tuple(value.shape)}"
    return repr(value)


def lora_grouped(x, weight, lora_A, lora_B, scaling, offsets, transposed=False, row_index=None,
                 bias=None):
    """The grouped LoRA GEMM: ``y[rows of e] = x W_e^T + scaling * x A_e^T B_e^T``, every expert
    in one launch per step.

    - ``x``: (S, K) rows sorted by expert (fp32/fp16/bf16); ``offsets``: E + 1 row offsets
      (``expert_offsets`` builds them from the sorted expert ids), rows offsets[e] ..
      offsets[e + 1] going to expert e (an expert may have none).
    - ``weight``: the frozen experts, E x N x K in x's dtype (E x K x N with ``transposed``).
    - ``lora_A`` (E r x K), ``lora_B`` (N x r E): PEFT's ``target_parameters`` layout, any float
      dtype (PEFT keeps fp32), cast to x's dtype for the products; they get gradients in their own
      dtype, x gets one too.
    - ``row_index``: (S,) int32/int64, optional: the sorted rows are x[row_index] (x any rows,
      e.g. a token's hidden state for each of its top-k experts), gathered inside the kernels
      instead of copied; y has S rows either way, and x's gradient sums its rows' shares.
    - ``bias``: (E, N) in x's dtype, optional and frozen: each row's expert's bias, added in the
      GEMM's epilogue before the one rounding to x's dtype (transformers' experts with biases,
      gpt-oss's, add it right after the projection).
    """
    lora_grouped_checks(x, weight, lora_A, lora_B, scaling, offsets, transposed, row_index, bias)
    rows = x.shape[0] if row_index is None else row_index.shape[0]
    check_offsets(offsets, rows, row_index, x.shape[0])
    if not use_kernels(x=x, weight=weight):
        sorted_x = x if row_index is None else x[row_index]
        return reference.lora_grouped(sorted_x, weight, lora_A, lora_B, scaling, offsets,
                                      transposed, bias)
    return LoraGroupedFunction.apply(x.contiguous(), weight, transposed, lora_A, lora_B,
                                     float(scaling), offsets, row_index, bias)
