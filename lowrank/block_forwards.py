"""Forwards of whole blocks whose projections are patched layers (``LoraLinear``s of
``patch_model``, or PEFT LoRA layers patched by ``patch_peft_model``), through the fused block ops:
what the block-fusion stage calls in place of a block's own forward.

- ``gated_mlp_forward(mlp, hidden_states)``: a Llama-style gated MLP (``gate_proj``, ``up_proj``,
  ``down_proj``, ``act_fn``; Llama, Mistral, Qwen2, Gemma) through ``ops.lora_mlp``.
- ``attention_qkv(attention, hidden_states)``: the q, k and v projections of a Llama-style
  attention (``q_proj``, ``k_proj``, ``v_proj``) through ``ops.lora_qkv``; ``attention_forward``
  runs the attention's own forward on them (the attention itself stays the model's).

Each returns ``NotImplemented`` for a call it cannot serve with the same results as the layers one
by one, so that the caller runs the block's own forward: a projection that is neither a
``LoraLinear`` nor a patched PEFT LoRA layer (IA3, a plain layer), one whose adapter does not run
(adapters disabled, merged, none active, several active) or is a LoRA variant (DoRA: the fused ops
compute plain LoRA), a PEFT layer whose call the op's checks refuse (its own forward falls back to
PEFT's, counted in ``lowrank.stats()``), an
activation the kernel does not compute, compute dtypes that differ between the projections or from
the input (an NF4 compute_dtype other than the input's, autocast), a dense frozen weight that
requires grad, or a projection with hooks or a replaced forward (DeepSpeed ZeRO-3 gathers
parameters in hooks; accelerate's offload replaces forward): the fused op would skip them.
Decode-sized inputs (at most ``DECODE_MAX_M`` rows) are declined too: the layers' split-K decode
path reads each packed weight once, where the fused ops run the tiled training kernels, and there
is little to save for backward.
"""

import functools

import torch
from torch import nn

from lowrank import ops
from lowrank.kernels.lora_linear_decode import DECODE_MAX_M
from lowrank.methods import lora as lora_method
from lowrank.modules import LoraLinear

# Activation modules of transformers (by class name, as ACT2FN builds them) and torch, and the
# gated activation the fused MLP computes for each: the same function, to rounding.
ACTIVATIONS = {"SiLU": "silu", "SiLUActivation": "silu", "GELUTanh": "gelu_tanh",
               "PytorchGELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh"}
# A Llama-style attention's q, k and v projections, as ``attention_forward`` finds them.
QKV = ("q_proj", "k_proj", "v_proj")


def activation_name(act_fn):
    """The fused MLP's name for the activation module ``act_fn`` ("silu", "gelu_tanh"), or None."""
    name = ACTIVATIONS.get(type(act_fn).__name__)
    if isinstance(act_fn, nn.GELU):
        name = "gelu_tanh" if act_fn.approximate == "tanh" else None
    return name


def peft_base(layer):
    """The ``BaseLayer`` kind that ``patch_peft_model`` runs PEFT's LoRA ``layer`` over, or None
    when ``layer`` is not a PEFT LoRA layer it patched."""
    forward = vars(layer).get("forward") if isinstance(layer, nn.Module) else None
    if isinstance(forward, functools.partial) and forward.func is lora_method.peft_forward:
        return forward.args[1]
    return None


def _lowrank_call(layer, x):
    """(projection, compute dtype, output dtype) of what the ``LoraLinear`` ``layer`` runs on
    ``x``, or None when it runs no plain LoRA adapter."""
    name = layer.runs_adapter()
    if not isinstance(name, str):  # none runs (disabled, merged, none active), or several
        return None
    if name in layer.variants:  # DoRA's forward is its own op (methods/lora.py's DoraVariant)
        return None
    x_compute, weight, bias, out_dtype = layer.frozen_operands(x)
    dropout = layer.lora_dropout[name] if layer.training else 0.0
    return (ops.LoraProjection(weight, layer.lora_A[name].weight, layer.lora_B[name].weight,
                               layer.scaling[name], bias=bias, dropout=dropout),
            x_compute.dtype, out_dtype)


def lora_projection(layer, x):
    """``ops.LoraProjection`` of what ``layer`` runs on ``x``, or None unless the layer is a
    ``LoraLinear`` or a patched PEFT LoRA layer running exactly one plain LoRA adapter (no
    variant: DoRA) with the compute and output dtypes of ``x``, with no hooks of its own and no
    forward replaced by anything but ``patch_peft_model``."""
    if layer._forward_hooks or layer._forward_pre_hooks:
        return None
    if isinstance(layer, LoraLinear) and "forward" not in vars(layer):
        call = _lowrank_call(layer, x)
    elif (base := peft_base(layer)) is not None:
        call = lora_method.peft_projection(layer, base, x)
    else:
        return None
    if call is None:
        return None
    projection, compute_dtype, out_dtype = call
    weight = projection.weight
    if compute_dtype != x.dtype or out_dtype != x.dtype:
        return None
    if weight.quant_state is None and (weight.tensor.dtype != x.dtype
                                       or weight.stored.requires_grad):
        return None  # the layer's own forward raises for the dtype, or trains its weight
    return projection


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
    # down reads act(g) * u, of its in_features, in the dtype of g and u: hidden_states' (checked
    # above); its projection is read for an input of that shape (no copy: a broadcast element).
    h = hidden_states.new_empty(1).expand(*hidden_states.shape[:-1], mlp.down_proj.in_features)
    down = _projections(h, (mlp.down_proj,))
    if gate_up is None or down is None:
        return NotImplemented
    return ops.lora_mlp(hidden_states, *gate_up, *down, activation=activation)


def attention_qkv(attention, hidden_states):
    """``(q_proj(hidden_states), k_proj(...), v_proj(...))`` through ``ops.lora_qkv``, or
    ``NotImplemented`` (see the module)."""
    projections = _projections(hidden_states, [getattr(attention, name) for name in QKV])
    if projections is None:
        return NotImplemented
    return ops.lora_qkv(hidden_states, *projections)


def _computed(name, hidden_states, output):
    """A stand-in for projection ``name`` that returns ``output``, computed for ``hidden_states``
    by the fused op; a call on another input is an error, not a wrong answer."""
    def projection(x):
        if x is not hidden_states:
            raise RuntimeError(f"lowrank: this attention's forward calls {name} on another input "
                               "than its hidden_states, which the fused q/k/v op computed it for; "
                               "patch with fuse_blocks=False")
        return output
    return projection


class _ProjectedAttention:
    """``self`` of an attention class's own forward, where q_proj, k_proj and v_proj return the
    outputs the fused op computed; every other attribute (o_proj, config, head_dim, training, the
    norms, ...) is the attention module's."""

    def __init__(self, attention, hidden_states, outputs):
        self._attention = attention
        for name, output in zip(QKV, outputs):
            setattr(self, name, _computed(name, hidden_states, output))

    def __getattr__(self, name):
        return getattr(self._attention, name)


def attention_forward(attention, *args, **kwargs):
    """A Llama-style attention's own forward (its class's: rotary, cache, attention kernel and
    o_proj as transformers writes them) with q, k and v computed by one ``ops.lora_qkv`` call over
    ``hidden_states``, or ``NotImplemented`` (see the module). The class's forward runs with a
    stand-in ``self`` whose q_proj, k_proj and v_proj return those outputs, so no transformers
    code is copied and nothing of the module changes during the call."""
    hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else (args or (None,))[0]
    if not isinstance(hidden_states, torch.Tensor):
        return NotImplemented
    outputs = attention_qkv(attention, hidden_states)
    if outputs is NotImplemented:
        return NotImplemented
    return type(attention).forward(_ProjectedAttention(attention, hidden_states, outputs),
                                   *args, **kwargs)
