"""DoRA's backward scale: g dY, with dropout (g - 1) dY, and the column sums of dY * Q that dm
needs, in one pass over dY and Q (``lowrank.ops.dora``).

Beside LoRA's kernels, DoRA's backward needs g dY (the gradient of the LoRA branch and, without
dropout, of x W^T), with dropout (g - 1) dY (of x_d W^T), and dm = sum over rows of dY * Q
/ ||W + s B A||, with g = m / ||W + s B A|| per output column. Computed in torch, each is an fp32
copy and a pass: 48 bytes per element of dY in bf16, where this kernel reads dY and Q once and
writes each output once (6 bytes without dropout). Each scaled element is the fp32 product rounded
once into dY's dtype, as torch's ``(dY.float() * g).to(dY.dtype)`` rounds it (bit-equal). Each
program writes its BLOCK_M rows' fp32 column sums to one row of ``partial`` (cdiv(M, BLOCK_M) x N),
which the caller sums: no atomics, so the sums do not depend on the order programs run in.
"""

import triton
import triton.language as tl

from ._common import row_offsets, store_rounded


# Tiles and launch options: an elementwise pass, the same on every target and dtype. 64 rows per
# program keep the partial sums at 1/16 of a bf16 dY's bytes; 8 warps, 16 elements per thread and
# tensor: at 4 warps the static report read 162-180 registers on sm_80-90, at 8 at most 98.
CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8}


@triton.jit
def _dora_grad_scale_kernel(dy_ptr, q_ptr, g_ptr, scaled_ptr, shifted_ptr, partial_ptr, M, N,
                            SHIFTED: tl.constexpr, COLUMN_SUMS: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    outs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (outs[None, :] < N)
    offsets = row_offsets(rows, N)[:, None] + outs[None, :]
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + outs, mask=outs < N, other=0.0)[None, :]
    store_rounded(scaled_ptr + offsets, dy * g, mask)
    if SHIFTED:
        store_rounded(shifted_ptr + offsets, dy * (g - 1), mask)
    if COLUMN_SUMS:
        q = tl.load(q_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(partial_ptr + tl.program_id(0) * N + outs, tl.sum(dy * q, axis=0), mask=outs < N)


def dora_grad_scale(dy, g, scaled, shifted=None, q=None, partial=None):
    """``scaled`` = g dY and, if given, ``shifted`` = (g - 1) dY (both M x N, contiguous, in dY's
    dtype); if ``q`` (M x N, contiguous) is given, ``partial`` (cdiv(M, BLOCK_M) x N, fp32,
    contiguous; ``partial_rows`` gives its rows) receives the column sums of dY * q by row block.
    ``dy``: M x N, contiguous; ``g``: N, fp32."""
    M, N = dy.shape
    grid = (triton.cdiv(M, CONFIG["BLOCK_M"]), triton.cdiv(N, CONFIG["BLOCK_N"]))
    _dora_grad_scale_kernel[grid](dy, dy if q is None else q, g, scaled,
                                  scaled if shifted is None else shifted,
                                  g if partial is None else partial, M, N,
                                  SHIFTED=shifted is not None, COLUMN_SUMS=q is not None, **CONFIG)


def partial_rows(m):
    """Rows of ``dora_grad_scale``'s ``partial`` for an M x N dY."""
    return triton.cdiv(m, CONFIG["BLOCK_M"])
