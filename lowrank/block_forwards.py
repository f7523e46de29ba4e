"""Forwards of whole blocks whose projections are patched ``LoraLinear``s, through the fused block
ops: what the block-fusion stage calls in place of a block's own forward.

- ``gated_mlp_forward(mlp, hidden_states)``: a Llama-style gated MLP (``gate_proj``, ``up_proj``,
  ``down_proj``, ``act_fn``; Llama, Mistral, Qwen2, Gemma) through ``ops.lora_mlp``.
- ``attention_qkv(attention, hidden_states)``: the q, k and v projections of a Llama-style
  attention (``q_proj``, ``k_proj``, ``v_proj``) through ``ops.lora_qkv``; the attention itself
  stays the model's.

Each returns ``NotImplemented`` for a call it cannot serve with the same results as the layers one
by one, so that the caller runs the block's own forward: a projection that is not a ``LoraLinear``
(IA3, a plain or PEFT layer), one whose adapter does not run (adapters disabled, merged, none
active, several active) or is a LoRA variant (DoRA: the fused ops compute plain LoRA), an
activation the kernel does not compute, compute dtypes that differ between the projections or from
the input (an NF4 compute_dtype other than the input's, autocast), a dense frozen weight that
requires grad, or a projection with hooks or a replaced forward (DeepSpeed ZeRO-3 gathers
parameters in hooks; accelerate's offload replaces forward): the fused op would skip them.
Decode-sized inputs (at most ``DECODE_MAX_M`` rows) are declined too: the layers' split-K decode
path reads each packed weight once, where the fused ops run the tiled training kernels, and there
is little to save for backward.
"""

from torch import nn

from lowrank import ops
from lowrank.kernels.lora_linear_decode import DECODE_MAX_M
from lowrank.modules import LoraLinear

# Activation modules of transformers (by class name, as ACT2FN builds them) and torch, and the
# gated activation the fused MLP computes for each: the same function, to rounding.
ACTIVATIONS = {"SiLU": "silu", "SiLUActivation": "silu", "GELUTanh": "gelu_tanh",
               "PytorchGELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh"}


def activation_name(act_fn):
    """The fused MLP's name for the activation module ``act_fn`` ("silu", "gelu_tanh"), or None."""
    name = ACTIVATIONS.get(type(act_fn).__name__)
    if isinstance(act_fn, nn.GELU):
        name = "gelu_tanh" if act_fn.approximate == "tanh" else None
    return name


def _bypassable(layer):
    """True if running ``layer``'s computation without calling it skips nothing: no hooks, no
    forward replaced on the instance."""
    return not (layer._forward_hooks or layer._forward_pre_hooks or "forward" in vars(layer))


def lora_projection(layer, x):
    """(``ops.LoraProjection`` of what ``layer`` runs on ``x``, the compute dtype), or None when
    the layer is not a LoraLinear running exactly one plain LoRA adapter (no variant: DoRA) with
    the compute and output dtypes of ``x``."""
    if not isinstance(layer, LoraLinear) or not _bypassable(layer):
        return None
    name = layer.runs_adapter()
    if not isinstance(name, str):  # none runs (disabled, merged, none active), or several
        return None
    if name in layer.variants:  # DoRA's forward is its own op (methods/lora.py's DoraVariant)
        return None
    x_compute, weight, bias, out_dtype = layer.frozen_operands(x)
    if x_compute.dtype != x.dtype or out_dtype != x.dtype:
        return None
    if weight.quant_state is None and (weight.tensor.dtype != x.dtype
                                       or weight.stored.requires_grad):
        return None  # the layer's own forward raises for the dtype, or trains its weight
    dropout = layer.lora_dropout[name] if layer.training else 0.0
    return ops.LoraProjection(weight, layer.lora_A[name].weight, layer.lora_B[name].weight,
                              layer.scaling[name], bias=bias, dropout=dropout)


def _projections(x, layers):
    if x.dim() == 0 or x.numel() // max(x.shape[-1], 1) <= DECODE_MAX_M:
        return None
    projections = [lora_projection(layer, x) for layer in layers]
    return None if any(p is None for p in projections) else projections


def gated_mlp_forward(mlp, hidden_states):
    """``mlp(hidden_states)`` through ``ops.lora_mlp``, or ``NotImplemented`` (see the module)."""
    activation = activation_name(getattr(mlp, "act_fn", None))
    if activation is None:
        return NotImplemented
    gate_up = _projections(hidden_states, (mlp.gate_proj, mlp.up_proj))
    # down reads act(g) * u, in the dtype of g and u: hidden_states' (checked above).
    down = _projections(hidden_states, (mlp.down_proj,))
    if gate_up is None or down is None:
        return NotImplemented
    return ops.lora_mlp(hidden_states, *gate_up, *down, activation=activation)


def attention_qkv(attention, hidden_states):
    """``(q_proj(hidden_states), k_proj(...), v_proj(...))`` through ``ops.lora_qkv``, or
    ``NotImplemented`` (see the module)."""
    projections = _projections(hidden_states,
                               (attention.q_proj, attention.k_proj, attention.v_proj))
    if projections is None:
        return NotImplemented
    return ops.lora_qkv(hidden_states, *projections)

