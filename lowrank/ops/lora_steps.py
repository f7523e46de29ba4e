"""The LoRA linear's steps, for the block ops whose projections share one input (``lora_mlp``'s
gate and up, ``lora_qkv``'s q, k and v): the shrink and the expand as custom ops of their own, so
that one shrink over x serves several projections, and the backward steps of several projections
over one x.

Notation as in ``kernels/lora_linear.py``: S = dropout(x) A^T, Y = x W^T + b + s S B^T,
dS = s dY B, dX = dY W + dropout'(dS A), dA = dS^T dropout(x), dB = s dY^T S.

Projections without dropout share one shrink: their A matrices concatenated, x read once, S split
by columns. A projection with dropout shrinks alone, with its own seed, so that its mask is the
one its own ``lora_linear`` would draw (the unfused layers draw one per projection, independent);
the same grouping serves dA.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from lowrank import reference
from lowrank.frozen_weight import FrozenWeight
from lowrank.kernels import lora_linear as lora_kernels
from lowrank.ops.lora import dropout_seed, lora_grad_a, lora_grad_input, lora_shrink


@torch.library.custom_op("lowrank::lora_expand", mutates_args=())
def lora_expand(x: torch.Tensor, weight: list[Optional[torch.Tensor]], weight_sizes: list[int],
                s: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Y = x W^T + b + s S B^T in x's dtype (M x N), for contiguous x (M x K) and S (M x r) in
    the branch's dtype (``lora_shrink``'s)."""
    w = FrozenWeight.from_flat(weight, weight_sizes)
    y = torch.empty(x.shape[0], w.out_features, dtype=x.dtype, device=x.device)
    bias = None if bias is None else bias.to(x.dtype)
    lora_kernels.lora_forward(x, w.tensor, s.contiguous(), lora_B.to(s.dtype), bias, y, scaling,
                              w.nf4)
    return y


@lora_expand.register_fake
def _(x, weight, weight_sizes, s, lora_B, scaling, bias):
    return x.new_empty(x.shape[0], FrozenWeight.from_flat(weight, weight_sizes).out_features)


@dataclass(frozen=True, eq=False)
class ProjectionRun:
    """One projection of a block op as its Function runs it: the frozen ``weight``, ``scaling``,
    ``dropout`` and its dropout ``seed`` (a 1-element int64 tensor; unread without dropout)."""

    weight: FrozenWeight
    scaling: float
    dropout: float
    seed: torch.Tensor


def projection_runs(x, projections):
    """A ProjectionRun of each checked LoraProjection, the seeds drawn in the projections' order,
    only for those with dropout: the draws the unfused ``lora_linear``s make, in their order."""
    empty = torch.empty(1, dtype=torch.int64, device=x.device)
    return [ProjectionRun(p.weight, p.scaling, p.dropout,
                          dropout_seed(x.device) if p.dropout > 0 else empty)
            for p in projections]


def runs_to_save(ctx, runs):
    """The tensors of ``runs`` for ``ctx.save_for_backward`` (the seeds, then each weight's
    tensors); their scalings, dropouts and weight blocksizes are kept on ``ctx``. ``saved_runs``
    reads them back."""
    weights = [run.weight.flat() for run in runs]
    ctx.run_scalars = [(run.scaling, run.dropout) for run in runs]
    ctx.weight_layout = [(len(tensors), sizes[:2]) for tensors, sizes in weights]
    return [run.seed for run in runs] + [t for tensors, _ in weights for t in tensors]


def saved_runs(ctx, tensors, lora_As, lora_Bs):
    """The ProjectionRuns that ``runs_to_save`` saved, from its ``tensors`` (saved, in order) and
    the projections' adapters, whose shapes give each weight's (N, K). (Not the weight's sizes
    kept as ints: under torch.compile(dynamic=True) the projections' equal sizes, an MLP's
    gate N and down K, share one symbol, which Dynamo then fails to carry into backward.)"""
    seeds, rest = tensors[:len(ctx.run_scalars)], tensors[len(ctx.run_scalars):]
    runs = []
    for (scaling, dropout), seed, (count, blocksizes), lora_A, lora_B in zip(
            ctx.run_scalars, seeds, ctx.weight_layout, lora_As, lora_Bs):
        sizes = [*blocksizes, lora_B.shape[0], lora_A.shape[1]]
        runs.append(ProjectionRun(FrozenWeight.from_flat(list(rest[:count]), sizes), scaling,
                                  dropout, seed))
        rest = rest[count:]
    return runs


def expand(x, s, lora_B, run, bias):
    """``lora_expand`` of one projection: Y = x W^T + b + s S B^T."""
    return lora_expand(x, *run.weight.flat(), s, lora_B, run.scaling, bias)


def _groups(dropouts):
    """Lists of projection indices that run one shrink (and one dA) together: those without
    dropout as one group, each with dropout alone."""
    shared = [i for i, p in enumerate(dropouts) if p == 0]
    return ([shared] if shared else []) + [[i] for i, p in enumerate(dropouts) if p > 0]


def shrinks(x, lora_As, runs):
    """S of each projection, in order (views of a shared shrink's output where they share one)."""
    result = [None] * len(runs)
    for group in _groups([run.dropout for run in runs]):
        first = runs[group[0]]
        branch = reference.branch_dtype(x.dtype, *(lora_As[i] for i in group))
        a = lora_As[group[0]] if len(group) == 1 else \
            torch.cat([lora_As[i].to(branch) for i in group])
        s = lora_shrink(x, a, first.seed, first.dropout)
        for i, part in zip(group, s.split([lora_As[i].shape[0] for i in group], dim=1)):
            result[i] = part
    return result


def grad_lora_As(grad_ss, x, lora_As, runs, needed):
    """dA of each projection whose ``needed`` is true (None for the others), in its A's dtype: one
    dS^T dropout(x) product per shrink group."""
    result = [None] * len(runs)
    for group in _groups([run.dropout for run in runs]):
        group = [i for i in group if needed[i]]
        if not group:
            continue
        first = runs[group[0]]
        grad_s = (torch.cat([grad_ss[i] for i in group], dim=1) if len(group) > 1
                  else grad_ss[group[0]])
        grad_a = lora_grad_a(grad_s, x, first.seed, first.dropout)
        for i, part in zip(group, grad_a.split([grad_ss[i].shape[1] for i in group])):
            result[i] = part.to(lora_As[i].dtype)
    return result


def grad_input(grad_ys, grad_ss, lora_As, runs):
    """dX of x summed over the projections that read it: sum of dY W + dropout'(dS A)."""
    grad_x = None
    for grad_y, grad_s, lora_A, run in zip(grad_ys, grad_ss, lora_As, runs):
        part = lora_grad_input(grad_y, *run.weight.flat(), grad_s, lora_A, run.seed, run.dropout)
        grad_x = part if grad_x is None else grad_x + part
    return grad_x
