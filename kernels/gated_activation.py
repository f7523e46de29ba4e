"""The gated activation of a gated MLP (Llama, Mistral, Qwen2: silu; Gemma: gelu-tanh), forward
and backward, element by element.

For the gate and up projections' outputs g and u (M x N, contiguous, one dtype):

    forward:   h = act(g) * u
    backward:  given dh,  h = act(g) * u  (recomputed),  dg = dh * u * act'(g),  du = dh * act(g)

The fused LoRA MLP (``lowrank.ops.lora_mlp``) saves g and u only: act(g) and h are recomputed
here in backward, where h feeds the down projection's LoRA gradient. Everything is computed in
fp32 from the stored g and u, each result rounded once to their dtype (no FMA contraction, so
that a GPU rounds as the interpreter does).

    silu(g)      = g sigmoid(g)                      silu'(g) = s (1 + g (1 - s)),  s = sigmoid(g)
    gelu_tanh(g) = g/2 (1 + tanh(z)) = g sigmoid(2z),  z = sqrt(2/pi) (g + 0.044715 g^3)
    gelu_tanh'(g) = t + g t (1 - t) 2 z',  t = sigmoid(2z),  z' = sqrt(2/pi) (1 + 3 0.044715 g^2)

(tanh through sigmoid: Triton has no portable tanh, and 1 + tanh(z) = 2 sigmoid(2z) exactly.)
"""

import triton
import triton.language as tl

from ._common import store_rounded

ACTIVATIONS = ("silu", "gelu_tanh")
BLOCK = 1024
NUM_WARPS = 4
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
GELU_CUBIC = tl.constexpr(0.044715)


@triton.jit
def _activation_and_slope(g, ACTIVATION: tl.constexpr):
    """(act(g), act'(g)) in fp32 for fp32 ``g``."""
    if ACTIVATION == "silu":
        s = tl.sigmoid(g)
        return g * s, s * (1.0 + g * (1.0 - s))
    else:
        z = SQRT_2_OVER_PI * (g + GELU_CUBIC * g * g * g)
        t = tl.sigmoid(2.0 * z)
        slope = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * g * g)
        return g * t, t + 2.0 * g * t * (1.0 - t) * slope


@triton.jit
def _gated_forward_kernel(g_ptr, u_ptr, h_ptr, n, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    """h = act(g) * u over ``n`` contiguous elements."""
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = index < n
    g = tl.load(g_ptr + index, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + index, mask=mask, other=0.0).to(tl.float32)
    act, _ = _activation_and_slope(g, ACTIVATION)
    store_rounded(h_ptr + index, act * u, mask)


@triton.jit
def _gated_backward_kernel(dh_ptr, g_ptr, u_ptr, h_ptr, dg_ptr, du_ptr, n,
                           ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    """h = act(g) * u, dg = dh * u * act'(g), du = dh * act(g) over ``n`` contiguous elements."""
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = index < n
    g = tl.load(g_ptr + index, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + index, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + index, mask=mask, other=0.0).to(tl.float32)
    act, slope = _activation_and_slope(g, ACTIVATION)
    store_rounded(h_ptr + index, act * u, mask)
    store_rounded(dg_ptr + index, dh * u * slope, mask)
    store_rounded(du_ptr + index, dh * act, mask)


def _grid(n):
    return (triton.cdiv(n, BLOCK),)


def gated_forward(g, u, h, activation):
    """h = act(g) * u; all contiguous, of one shape and dtype."""
    _gated_forward_kernel[_grid(g.numel())](g, u, h, g.numel(), ACTIVATION=activation, BLOCK=BLOCK,
                                            num_warps=NUM_WARPS, enable_fp_fusion=False)


def gated_backward(dh, g, u, h, dg, du, activation):
    """h (recomputed), dg and du from dh, g and u; all contiguous, of one shape and dtype."""
    _gated_backward_kernel[_grid(g.numel())](dh, g, u, h, dg, du, g.numel(), ACTIVATION=activation,
                                             BLOCK=BLOCK, num_warps=NUM_WARPS,
                                             enable_fp_fusion=False)
