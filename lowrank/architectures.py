"""What lowrank knows of each model architecture, by ``config.model_type``: where a block's
attention and MLP projections are and what they are called, the MLP's activation, and IA3's
default targets. Block fusions (``lowrank.blocks``) find their blocks through it; ``patch_model``
takes IA3's defaults from it.

Names are those of transformers' modeling code (``models/<type>/modeling_<type>.py``). An
architecture missing here still patches (every linear layer is found by type); it has no IA3
defaults and no block fusion.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    """One architecture's block layout.

    ``attention`` / ``mlp``: the name of the attention / MLP module inside a block and {role: name
    of its projection}. Roles: q, k, v, o (qkv where one fused layer computes all three); gate,
    up, down (gate_up where one fused layer computes both; an MLP without a gate has up and
    down). ``activation``: the config field naming the MLP's activation. ``ia3``: IA3's default
    (target_modules, feedforward_modules), PEFT's choice for the architecture, or None."""

    attention: tuple
    mlp: tuple
    activation: str
    ia3: tuple = None

    @property
    def gated_mlp(self):
        """True when the MLP is down(act(gate(x)) * up(x)) over three separate projections."""
        return {"gate", "up", "down"} <= self.mlp[1].keys()


_LLAMA_ATTENTION = ("self_attn", {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"})
_LLAMA_MLP = ("mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"})
# IA3: attention keys and values (queries and values for Gemma and Qwen) and the MLP's down
# projection, which is feed-forward (l scales its input).
_IA3_KV = (["k_proj", "v_proj", "down_proj"], ["down_proj"])
_IA3_QV = (["q_proj", "v_proj", "down_proj"], ["down_proj"])

ARCHITECTURES = {
    "llama": Architecture(_LLAMA_ATTENTION, _LLAMA_MLP, "hidden_act", _IA3_KV),
    "mistral": Architecture(_LLAMA_ATTENTION, _LLAMA_MLP, "hidden_act", _IA3_KV),
    "qwen2": Architecture(_LLAMA_ATTENTION, _LLAMA_MLP, "hidden_act", _IA3_QV),
    "qwen3": Architecture(_LLAMA_ATTENTION, _LLAMA_MLP, "hidden_act", _IA3_QV),
    "gemma": Architecture(_LLAMA_ATTENTION, _LLAMA_MLP, "hidden_act", _IA3_QV),
    "gemma2": Architecture(_LLAMA_ATTENTION, _LLAMA_MLP, "hidden_activation", _IA3_QV),
    "phi3": Architecture(("self_attn", {"qkv": "qkv_proj", "o": "o_proj"}),
                         ("mlp", {"gate_up": "gate_up_proj", "down": "down_proj"}), "hidden_act"),
    "gpt2": Architecture(("attn", {"qkv": "c_attn", "o": "c_proj"}),
                         ("mlp", {"up": "c_fc", "down": "c_proj"}), "activation_function",
                         (["c_attn", "mlp.c_proj"], ["mlp.c_proj"])),
    "bert": Architecture(("attention", {"q": "self.query", "k": "self.key", "v": "self.value",
                                        "o": "output.dense"}),
                         # BERT's MLP is spread over two modules of the layer.
                         ("", {"up": "intermediate.dense", "down": "output.dense"}), "hidden_act",
                         (["key", "value", "output.dense"], ["output.dense"])),
}


def model_type(model):
    """``model.config.model_type``, or None for a model without one."""
    return getattr(getattr(model, "config", None), "model_type", None)


def architecture(model):
    """The ``Architecture`` of ``model``, or None when it is not in ``ARCHITECTURES``."""
    return ARCHITECTURES.get(model_type(model))


def ia3_defaults(model):
    """IA3's default (target_modules, feedforward_modules) for ``model``; a ValueError naming the
    known architectures when it has none."""
    known = architecture(model)
    if known is None or known.ia3 is None:
        raise ValueError(f"lowrank.patch_model: no IA3 defaults for model type {model_type(model)!r} "
                         f"(known: {sorted(t for t, a in ARCHITECTURES.items() if a.ia3)}); pass "
                         "target_modules and feedforward_modules ([] for none)")
    return known.ia3
