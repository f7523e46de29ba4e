"""The LoRA linear's two products with dY in one pass over dY (M x N, the largest operand either
reads; kernels/lora_linear.py has the rest of the backward):

    dS = s dY B      (M x R, in S's dtype)        dB = s dY^T S      (N x R, fp32)

Programs tile dY by a chunk of its columns (axis 0), a slab of its rows (axis 1) and a rank chunk
(axis 2). Each reads its tile of dY once, row block by row block, and

- accumulates dB for its columns over its slab's rows, stored once as that slab's fp32 partial;
- writes its columns' share of dS for each row block as that chunk's fp32 partial.

The launcher sums the partials with torch in a fixed order (no atomics: the sums do not depend on
the order programs run in, as in the grouped MoE kernel's ``_grouped_output_grad_kernel``). The
partials cost (chunks x M + slabs x N) x R x 4 bytes, written and read once: wide column chunks
keep the first small, and slabs only as many as fill the GPU the second.

The branch is S's dtype (``lowrank.reference.branch_dtype``): dY's, or fp32 for fp32 adapters of a
16-bit dY, whose fp32 B and S are split into two 16-bit parts for the tensor cores
(``branch_dot``), so dS and dB stay near-fp32 as in the forward.
"""

import torch
import triton
import triton.language as tl

from . import _common
from ._common import row_offsets
from ._weight import precision
from .lora_linear import BLOCK_R, branch_dot


def output_grad_config(target, dtype, branch):
    """Tiles for dY in ``dtype`` and S, B in ``branch`` (the branch's dtype)."""
    if target.arch is None:  # small tiles: the tests' shapes get several chunks and slabs
        return {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    if dtype.itemsize == 4:
        return {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}
    if branch != dtype:
        # The split fp32 branch (two products each, ``branch_dot``): 128 columns and 4 warps keep
        # two CTAs per SM on sm_89, where 256 x 8 warps take 178 registers (one CTA). The model
        # at 4096 x 14336: DRAM-bound, H100 50 us, RTX 4090 168 us.
        return {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3}
    # 256 columns of dY per chunk: the fp32 dS partials (one per chunk) stay a small fraction of
    # dY's bytes (rank 16: 1/8 of a bf16 dY's). 64 rows per step: with 32, the dS product runs
    # on mma.sync from ldmatrix loads, and the model finds sm_90 bound by shared memory (62 us
    # at 4096 x 14336, against 46 us of DRAM with 64 rows on wgmma; sm_89 DRAM-bound either way).
    return {"BLOCK_M": 64, "BLOCK_N": 256, "num_warps": 8, "num_stages": 3}


def partition(m, n, r, target, config):
    """(column chunks, row slabs, rank chunks, rows per slab) of a launch over dY (m x n) at rank
    ``r``: as few slabs as give every SM two programs (each slab adds an N x R fp32 partial of
    dB), at least one row block each, the rows per slab a multiple of BLOCK_M."""
    block_m = config["BLOCK_M"]
    chunks, rank_chunks = triton.cdiv(n, config["BLOCK_N"]), triton.cdiv(r, BLOCK_R)
    slabs = max(1, min(triton.cdiv(m, block_m),
                       triton.cdiv(2 * target.multiprocessors, chunks * rank_chunks)))
    rows_per_slab = triton.cdiv(triton.cdiv(m, slabs), block_m) * block_m
    return chunks, triton.cdiv(m, rows_per_slab), rank_chunks, rows_per_slab


@triton.jit
def _lora_output_grad_kernel(dy_ptr, s_ptr, b_ptr, ds_partial_ptr, db_partial_ptr, M, N, R,
                             rows_per_slab, scaling, stride_dym, stride_dyn, stride_sm,
                             stride_bn, stride_br, PRECISION: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_R: tl.constexpr):
    """For the columns ``outs`` of chunk c = program 0, the rows ``slab`` of slab l = program 1
    and one rank chunk (program 2):

        db_partial[l][outs] = scaling dY[slab, outs]^T S[slab]    (slabs x N x R, fp32)
        ds_partial[c][slab] = scaling dY[slab, outs] B[outs]      (chunks x M x R, fp32)

    Summed over the slabs (dB) and the chunks (dS), the partials are dB and dS."""
    dtype = dy_ptr.dtype.element_ty
    chunk = tl.program_id(0)
    slab = tl.program_id(1)
    outs = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    b = tl.load(b_ptr + outs[:, None] * stride_bn + ranks[None, :] * stride_br,
                mask=(outs[:, None] < N) & (ranks[None, :] < R), other=0.0)
    first = slab * rows_per_slab
    end = tl.minimum(first + rows_per_slab, M)
    ds_partial_rows = ds_partial_ptr + chunk.to(tl.int64) * M * R
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for m0 in range(first, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        dy = tl.load(dy_ptr + row_offsets(rows, stride_dym)[:, None] + outs[None, :] * stride_dyn,
                     mask=(rows[:, None] < end) & (outs[None, :] < N), other=0.0)
        rank_mask = (rows[:, None] < end) & (ranks[None, :] < R)
        s = tl.load(s_ptr + row_offsets(rows, stride_sm)[:, None] + ranks[None, :],
                    mask=rank_mask, other=0.0)
        acc = branch_dot(tl.trans(dy), s, acc, dtype, PRECISION)
        part = branch_dot(dy, b, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), dtype,
                          PRECISION)
        tl.store(ds_partial_rows + row_offsets(rows, R)[:, None] + ranks[None, :], part * scaling,
                 mask=rank_mask)
    tl.store(db_partial_ptr + slab.to(tl.int64) * N * R + row_offsets(outs, R)[:, None]
             + ranks[None, :], acc * scaling, mask=(outs[:, None] < N) & (ranks[None, :] < R))


def lora_output_grad(dy, s, lora_b, scaling, grad_s, grad_b):
    """grad_s (M x R, S's dtype) = scaling dY B and grad_b (N x R, fp32) = scaling dY^T S, reading
    dY (M x N, any strides) once; S (M x R) with unit column stride, B (N x R) in S's dtype. The
    partials (fp32) are summed here by torch, in the same order every run."""
    M, N = dy.shape
    R = s.shape[1]
    if s.stride(1) != 1 or lora_b.dtype != s.dtype:
        raise ValueError(f"lora_output_grad: S needs unit column stride and B S's dtype, got "
                         f"strides {s.stride()}, S {s.dtype}, B {lora_b.dtype}")
    target = _common.target(dy.device)
    config = output_grad_config(target, dy.dtype, s.dtype)
    chunks, slabs, rank_chunks, rows_per_slab = partition(M, N, R, target, config)
    ds_partials = torch.empty(chunks, M, R, dtype=torch.float32, device=dy.device)
    db_partials = torch.empty(slabs, N, R, dtype=torch.float32, device=dy.device)
    _lora_output_grad_kernel[(chunks, slabs, rank_chunks)](
        dy, s, lora_b, ds_partials, db_partials, M, N, R, rows_per_slab, scaling, dy.stride(0),
        dy.stride(1), s.stride(0), lora_b.stride(0), lora_b.stride(1),
        PRECISION=precision(dy.dtype), BLOCK_R=BLOCK_R, **config)
    grad_s.copy_(ds_partials.sum(0))
    torch.sum(db_partials, 0, out=grad_b)
