"""``lowrank.patch_peft_model``: an existing PEFT model's LoRA and IA3 layers run on lowrank's
fused ops, in place, and the model stays a ``PeftModel``.

Only the ``forward`` of each served layer changes: it becomes an instance attribute (the class's
forward, PEFT's, is untouched), so the layer keeps its class, parameters, names and PEFT's own
methods (``set_adapter``, ``merge``, ``disable_adapter``, ``save_pretrained``, ...). PEFT can change
its state at any time, so the new forward reads that state on every call and hands the call to
PEFT's forward whenever the state is one we do not serve: adapters disabled or merged, several
adapters active at once, a LoRA variant other than DoRA, extra forward arguments, and any call
whose operands the op refuses (``lowrank.fallbacks``: float64, another device, ...), so that no
op's precondition is raised from a patched layer; those calls are counted in ``lowrank.stats()``
and each reason is warned about once. PEFT's mixed-batch ``adapter_names`` runs ``lowrank.mixed``'s
one-adapter-per-row op where it can (inference). With adapters disabled, merged or none active
PEFT runs the base layer alone, which our kernels would not speed up anyway.
"""

import functools
import logging
from dataclasses import dataclass, field

from lowrank import blocks
from lowrank.base_layers import base_layer_of
from lowrank.methods import METHODS
from lowrank.mixed import MIXED_STACKS

logger = logging.getLogger(__name__)


@dataclass
class PeftPatchReport:
    """What ``patch_peft_model`` did: {module path: what runs} for the layers on our kernels,
    {module path: why not} for PEFT adapter layers left on PEFT's forward, and {adapter name: why}
    for adapters whose layers run PEFT's forward while that adapter is active."""

    accelerated: dict = field(default_factory=dict)
    not_accelerated: dict = field(default_factory=dict)
    adapters_not_served: dict = field(default_factory=dict)
    fused_blocks: dict = field(default_factory=dict)  # {module path: block fusion's name}

    def __str__(self):
        lines = [f"lowrank.patch_peft_model: {len(self.accelerated)} layers accelerated, "
                 f"{len(self.not_accelerated)} left on PEFT's forward, "
                 f"{len(self.fused_blocks)} blocks fused"]
        lines += [f"  not accelerated: {path}: {why}" for path, why in self.not_accelerated.items()]
        lines += [f"  adapter {name!r} runs PEFT's forward: {why}"
                  for name, why in self.adapters_not_served.items()]
        return "\n".join(lines)


def _peft_classes():
    """{PEFT layer class we serve: its method module}; PEFT is imported only when it is used."""
    return {peft_class: method for method in METHODS.values()
            for peft_class in method.peft_layer_classes()}


def _is_ours(forward):
    return isinstance(forward, functools.partial) and forward.func in {
        method.peft_forward for method in METHODS.values()}


def _layer_refusal(layer):
    """(its base layer's ``BaseLayer``, None) for a layer we serve, or (None, why not)."""
    from peft.tuners.lora import ParamWrapper
    from peft.tuners.tuners_utils import BaseTunerLayer

    # Nested ParamWrappers (one per targeted parameter of an experts module) are one layer to us.
    base_layer = layer.get_base_layer() if isinstance(layer, ParamWrapper) else layer.base_layer
    if isinstance(base_layer, BaseTunerLayer):
        return None, "its base layer is itself a PEFT adapter layer (stacked adapters)"
    if "forward" in vars(layer):
        return None, ("its forward is already replaced by something else (an accelerate hook?); "
                      "lowrank does not stack on it")
    try:
        base = base_layer_of(base_layer)
    except TypeError as error:
        return None, str(error).removeprefix("lowrank: ")
    return base, None


def patch_peft_model(model, fuse_blocks=True):
    """Run ``model``'s PEFT LoRA and IA3 layers (over nn.Linear, bitsandbytes NF4 Linear4bit and
    GPT-2's Conv1D, and LoRA's ParamWrappers over mixture-of-experts experts) on lowrank's fused
    ops, in place; return a ``PeftPatchReport``, also logged.

    ``model`` is a ``PeftModel`` (or any module holding PEFT adapter layers). It stays one: its
    parameters and state dict do not change, and PEFT's adapter switching, merging, disabling and
    saving keep working. At each call a layer runs our kernels when exactly one of its adapters is
    active, unmerged, enabled and of a kind we serve (LoRA with dropout, bias, lora_bias, rsLoRA,
    any rank / alpha pattern; DoRA; IA3); otherwise it runs PEFT's own forward. Calling it again patches
    layers added since. ``lowrank.unpatch_peft_model`` reverts.

    ``fuse_blocks``: run whole blocks whose projections are all patched LoRA layers (the gated
    MLP, attention's q, k and v) through one fused op (``lowrank.blocks``), as ``patch_model``
    does; a call the fused op cannot serve exactly as the layers would runs them one by one.
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
    # A ParamWrapper nested in another runs inside the outermost one's forward.
    nested = {id(m.base_layer): path for path, m in layers.items()
              if type(m).__name__ == "ParamWrapper"}
    for path, layer in layers.items():
        if id(layer) in nested:
            outer = nested[id(layer)]
            if outer in report.accelerated:
                report.accelerated[path] = f"{report.accelerated[outer]}, run by {outer}"
            else:
                report.not_accelerated[path] = f"runs inside {outer}, left on PEFT's forward"
            continue
        if type(layer) not in served:
            report.not_accelerated[path] = (f"{type(layer).__module__}.{type(layer).__qualname__} "
                                            "layers have no lowrank kernel")
            continue
        method = served[type(layer)]
        refused = method.peft_refusals(layer)
        report.adapters_not_served.update(refused)
        if _is_ours(vars(layer).get("forward")):  # patched by an earlier call
            report.accelerated[path] = f"{method.LABEL} over {layer.forward.args[1].description}"
            continue
        base, refusal = _layer_refusal(layer)
        adapters = getattr(layer, method.Layer.adapter_names_attr[0])
        if refusal is None and refused and len(refused) == len(adapters):
            refusal = "none of its adapters can run on lowrank's kernels"
        if refusal is not None:
            report.not_accelerated[path] = refusal
            continue
        layer.forward = functools.partial(method.peft_forward, layer, base)
        # bitsandbytes repacks a Linear4bit's weight into a layout our kernels do not read the
        # first time it runs in eval mode without grad on a CPU with AVX512-BF16 (as it would in
        # PEFT's forward, when that runs): the base keeps the layout it loaded while patched.
        base.hold(layer.base_layer)
        report.accelerated[path] = f"{method.LABEL} over {base.description}"
    if fuse_blocks:
        report.fused_blocks = blocks.install_peft(model)
    if report.not_accelerated:
        logger.warning("%s", report)
    else:
        logger.info("%s", report)
    return report


def unpatch_peft_model(model):
    """Give every layer ``patch_peft_model`` changed its PEFT forward back, and every block it fused
    its own forward; return the model."""
    layers = [m for m in model.modules() if _is_ours(vars(m).get("forward"))]
    if not layers:
        raise ValueError("lowrank.unpatch_peft_model: no layer of this model was patched by "
                         "lowrank.patch_peft_model")
    blocks.uninstall_peft(model)
    for layer in layers:
        layer.forward.args[1].release(layer.base_layer)
        del layer.forward
        vars(layer).pop(MIXED_STACKS, None)  # the adapters lowrank.mixed stacked for it
    return model
