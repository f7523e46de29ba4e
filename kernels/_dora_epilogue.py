"""DoRA's column scale, applied in the LoRA forward kernel's epilogue (``kernels/lora_linear.py``,
``COLUMN_SCALE``), so that DoRA's output costs no pass after the GEMM.

With g = m / ||W + s B A|| per output column (fp32, from ``lowrank.ops.dora``) and the kernel's
fp32 tile q = x_d W^T + s S B^T (S = x_d A^T, x_d = dropout(x)), the tile before the bias is
PEFT's ``x W^T + (g - 1) x_d W^T + g s x_d A^T B^T``:

- without dropout (x_d = x): g q;
- with dropout: P + (g - 1) q, where P = x W^T + s S B^T + b is the undropped product, computed by
  an earlier launch of the same kernel and read here in the output's dtype (then the bias is in P
  and the launch passes none).

The product that backward needs for dm (q, rounded to the output's dtype as the output is) is
stored on the way when asked (``STORE_PRODUCT``): training needs it, inference does not.
"""

import triton
import triton.language as tl

from ._common import store_rounded


@triton.jit
def column_scale(q, rows, outs, M, N, scale_ptr, undropped_ptr, product_ptr,
                 UNDROPPED: tl.constexpr, STORE_PRODUCT: tl.constexpr):
    """The fp32 output tile (rows x outs of an M x N output) before the bias, from the tile q."""
    mask = (rows[:, None] < M) & (outs[None, :] < N)
    offsets = rows[:, None].to(tl.int64) * N + outs[None, :]
    if STORE_PRODUCT:
        store_rounded(product_ptr + offsets, q, mask)
    g = tl.load(scale_ptr + outs, mask=outs < N, other=0.0)[None, :]
    if UNDROPPED:
        scaled = tl.load(undropped_ptr + offsets, mask=mask, other=0.0).to(tl.float32) + (g - 1) * q
    else:
        scaled = g * q
    return scaled


def launch_args(y, column_scale, undropped, product):
    """The forward kernel's DoRA arguments: ``column_scale`` g (N, fp32, contiguous) or None (no
    scale: LoRA's output); ``undropped`` P (M x N, contiguous, in y's dtype) with dropout, else
    None; ``product`` (M x N, contiguous, in y's dtype) to receive q for dm, or None. Unused
    pointers point at ``y`` (never read)."""
    return {"scale_ptr": y if column_scale is None else column_scale,
            "undropped_ptr": y if undropped is None else undropped,
            "product_ptr": y if product is None else product,
            "COLUMN_SCALE": column_scale is not None, "UNDROPPED": undropped is not None,
            "STORE_PRODUCT": product is not None}
