"""``lowrank.patch_peft_model``: an existing PEFT model's LoRA and IA3 layers run on lowrank's
fused ops, in place, and the model stays a ``PeftModel``.

Only the ``forward`` of each served layer changes: it becomes an instance attribute (the class's
forward, PEFT's, is untouched), so the layer keeps its class, parameters, names and PEFT's own
methods (``set_adapter``, ``merge``, ``disable_adapter``, ``save_pretrained``, ...). PEFT can change
its state at any time, so the new forward reads that state on every call and hands the call to
PEFT's forward whenever the state is one we do not serve: adapters disabled or merged, several
adapters active at once, a LoRA variant other than DoRA, extra forward arguments (PEFT's mixed-batch
``adapter_names``). With adapters disabled, merged or none active PEFT runs the base layer alone,
which our kernels would not speed up anyway.
"""

import functools
import logging
from dataclasses import dataclass, field

from torch import nn

from lowrank import ops
from lowrank.modules import frozen_operands, layer_kind

logger = logging.getLogger(__name__)

BASE_NAMES = {"linear": "nn.Linear", "nf4": "bitsandbytes Linear4bit (NF4)",
              "conv1d": "transformers Conv1D"}


@dataclass
class PeftPatchReport:
    """What ``patch_peft_model`` did: {module path: what runs} for the layers on our kernels,
    {module path: why not} for PEFT adapter layers left on PEFT's forward, and {adapter name: why}
    for adapters whose layers run PEFT's forward while that adapter is active."""

    accelerated: dict = field(default_factory=dict)
    not_accelerated: dict = field(default_factory=dict)
    adapters_not_served: dict = field(default_factory=dict)

    def __str__(self):
        lines = [f"lowrank.patch_peft_model: {len(self.accelerated)} layers accelerated, "
                 f"{len(self.not_accelerated)} left on PEFT's forward"]
        lines += [f"  not accelerated: {path}: {why}" for path, why in self.not_accelerated.items()]
        lines += [f"  adapter {name!r} runs PEFT's forward: {why}"
                  for name, why in self.adapters_not_served.items()]
        return "\n".join(lines)


def _peft_classes():
    """{PEFT layer class we serve: (method, forward)}; PEFT is imported only when it is used."""
    from peft.tuners import ia3, lora
    from peft.tuners.ia3.bnb import Linear4bit as Ia3Linear4bit
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    return {lora.Linear: ("LoRA", _lora_forward), LoraLinear4bit: ("LoRA", _lora_forward),
            ia3.Linear: ("IA3", _ia3_forward), Ia3Linear4bit: ("IA3", _ia3_forward)}


def _is_ours(forward):
    return isinstance(forward, functools.partial) and forward.func in (_lora_forward, _ia3_forward)


def _lora_adapter_refusal(layer, name):
    """Why ``layer`` cannot run LoRA adapter ``name`` on our kernels, or None if it can."""
    if name in layer.lora_variant and not _is_dora(layer, name):
        return f"the LoRA variant {type(layer.lora_variant[name]).__name__} has no lowrank kernel"
    if type(layer.lora_dropout[name]) not in (nn.Dropout, nn.Identity):
        return f"its dropout is a {type(layer.lora_dropout[name]).__name__}, not nn.Dropout"
    lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
    if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear or lora_A.bias is not None:
        return "its lora_A / lora_B are not plain nn.Linear layers"
    return None


def _is_dora(layer, name):
    """True for a PEFT DoRA adapter on a linear layer (what ``ops.dora_linear`` computes)."""
    from peft.tuners.lora.variants import DoraLinearVariant

    return type(layer.lora_variant.get(name)) is DoraLinearVariant


def _adapter_to_serve(layer, adapters, args, kwargs):
    """The one active adapter of ``layer`` (among ``adapters``, the layer's dict of them) that our
    forward runs, or None when PEFT's forward must run."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = [name for name in layer.active_adapters if name in adapters]
    return active[0] if len(active) == 1 else None


def _lora_forward(layer, kind, x, *args, **kwargs):
    name = _adapter_to_serve(layer, layer.lora_A, args, kwargs)
    if name is None or _lora_adapter_refusal(layer, name) is not None:
        return type(layer).forward(layer, x, *args, **kwargs)
    x, weight, bias, out_dtype = frozen_operands(layer.base_layer, kind, x)
    lora_B, scaling = layer.lora_B[name], layer.scaling[name]
    if lora_B.bias is not None:  # PEFT's lora_bias: B's bias, scaled, is one more output bias
        lora_bias = lora_B.bias * scaling
        bias = (lora_bias if bias is None else bias + lora_bias).to(x.dtype)
    dropout = layer.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    if _is_dora(layer, name):
        y = ops.dora_linear(x, weight, layer.lora_A[name].weight, lora_B.weight,
                            layer.lora_magnitude_vector[name].weight, scaling, bias=bias,
                            dropout=p)
    else:
        y = ops.lora_linear(x, weight, layer.lora_A[name].weight, lora_B.weight, scaling,
                            bias=bias, dropout=p)
    return y.to(out_dtype)


def _ia3_forward(layer, kind, x, *args, **kwargs):
    name = _adapter_to_serve(layer, layer.ia3_l, args, kwargs)
    if name is None:
        return type(layer).forward(layer, x, *args, **kwargs)
    x, weight, bias, out_dtype = frozen_operands(layer.base_layer, kind, x)
    y = ops.ia3_linear(x, weight, layer.ia3_l[name], bias=bias, feedforward=layer.is_feedforward)
    return y.to(out_dtype)


def _layer_refusal(layer):
    """(base kind, None) for a layer we serve, or (None, why not)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(layer.base_layer, BaseTunerLayer):
        return None, "its base layer is itself a PEFT adapter layer (stacked adapters)"
    if "forward" in vars(layer):
        return None, ("its forward is already replaced by something else (an accelerate hook?); "
                      "lowrank does not stack on it")
    try:
        kind = layer_kind(layer.base_layer)
    except TypeError as error:
        return None, str(error).removeprefix("lowrank: ")
    return kind, None


def patch_peft_model(model):
    """Run ``model``'s PEFT LoRA and IA3 layers (over nn.Linear, bitsandbytes NF4 Linear4bit and
    GPT-2's Conv1D) on lowrank's fused ops, in place; return a ``PeftPatchReport``, also logged.

    ``model`` is a ``PeftModel`` (or any module holding PEFT adapter layers). It stays one: its
    parameters and state dict do not change, and PEFT's adapter switching, merging, disabling and
    saving keep working. At each call a layer runs our kernels when exactly one of its adapters is
    active, unmerged, enabled and of a kind we serve (LoRA with dropout, bias, lora_bias, rsLoRA,
    any rank / alpha pattern; DoRA; IA3); otherwise it runs PEFT's own forward. Calling it again patches
    layers added since. ``lowrank.unpatch_peft_model`` reverts.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    if hasattr(model, "lowrank_state"):
        raise ValueError("lowrank.patch_peft_model: this model was patched by lowrank.patch_model, "
                         "whose layers already run lowrank's kernels")
    served = _peft_classes()
    report = PeftPatchReport()
    layers = {path: m for path, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    if not layers:
        raise ValueError("lowrank.patch_peft_model: the model has no PEFT adapter layer (make it a "
                         "PeftModel with get_peft_model or PeftModel.from_pretrained first)")
    for path, layer in layers.items():
        if type(layer) not in served:
            report.not_accelerated[path] = (f"{type(layer).__module__}.{type(layer).__qualname__} "
                                            "layers have no lowrank kernel")
            continue
        method, forward = served[type(layer)]
        refused = {}  # every IA3 adapter can run on our kernels
        if method == "LoRA":
            refused = {name: why for name in layer.lora_A
                       if (why := _lora_adapter_refusal(layer, name)) is not None}
            report.adapters_not_served.update(refused)
        if _is_ours(vars(layer).get("forward")):  # patched by an earlier call
            report.accelerated[path] = f"{method} over {BASE_NAMES[layer.forward.args[1]]}"
            continue
        kind, refusal = _layer_refusal(layer)
        if refusal is None and method == "LoRA" and len(refused) == len(layer.lora_A):
            refusal = "none of its adapters can run on lowrank's kernels"
        if refusal is not None:
            report.not_accelerated[path] = refusal
            continue
        layer.forward = functools.partial(forward, layer, kind)
        # bitsandbytes repacks a Linear4bit's weight into a layout our kernels do not read the
        # first time it runs in eval mode without grad on a CPU with AVX512-BF16 (as it would in
        # PEFT's forward, when that runs): keep the layout it loaded while patched.
        layer.forward.bnb_cpu_repack = getattr(layer.base_layer, "support_avx512bf16_for_cpu", None)
        if layer.forward.bnb_cpu_repack is not None:
            layer.base_layer.support_avx512bf16_for_cpu = False
        report.accelerated[path] = f"{method} over {BASE_NAMES[kind]}"
    if report.not_accelerated:
        logger.warning("%s", report)
    else:
        logger.info("%s", report)
    return report


def unpatch_peft_model(model):
    """Give every layer ``patch_peft_model`` changed its PEFT forward back; return the model."""
    layers = [m for m in model.modules() if _is_ours(vars(m).get("forward"))]
    if not layers:
        raise ValueError("lowrank.unpatch_peft_model: no layer of this model was patched by "
                         "lowrank.patch_peft_model")
    for layer in layers:
        if layer.forward.bnb_cpu_repack is not None:
            layer.base_layer.support_avx512bf16_for_cpu = layer.forward.bnb_cpu_repack
        del layer.forward
    return model
