"""What every method's adapter layer shares: ``AdapterLayer`` (the base layer it wraps, which
adapter runs, merging through the base layer's kind), an adapter's settings (``AdapterConfig``),
finding the adapter layers of a model, and the parts of PEFT's format common to all methods."""

import math
import re
from dataclasses import dataclass

from torch import nn

from lowrank.base_layers import base_layer_class, base_layer_of, is_sharded

# PEFT names an adapter's weights after the base model's modules, under this prefix.
KEY_PREFIX = "base_model.model."


@dataclass
class AdapterConfig:
    """One adapter's settings, as ``patch_model`` or ``load_adapter`` got them."""

    method: str
    modules: list  # the module paths it patched
    rank: int = None
    alpha: float = None
    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False  # LoRA: DoRA adapters (``methods/lora.py``'s ``DoraVariant``)
    target_modules: object = None
    layers: list = None
    feedforward_modules: list = None  # IA3: the patched paths whose input l scales


class AdapterLayer(nn.Module):
    """What LoRA and IA3 layers share: the base layer (``base_layer``, frozen) and its kind
    (``base``, a ``lowrank.base_layers.BaseLayer``), which adapter runs, and merging.

    A method's layer adds its adapters' weights (named as PEFT names them) and implements
    ``add_adapter``, ``forward``, ``adapter_weights``, ``merge_in_place`` (dense weights) and
    ``merged_weight`` (a merged copy: requantized NF4 or dense in a dtype)."""

    adapter_names_attr = ()  # names of the ModuleDicts / ParameterDicts that hold adapter weights

    def __init__(self, base_layer):
        super().__init__()
        self.base = base_layer_of(base_layer)
        self.base_layer = base_layer
        self.in_features, self.out_features = self.base.features(base_layer)
        self.active_adapter = None
        self.merged_adapters = []
        self.adapters_disabled = False
        self.base.hold(base_layer)

    # HF code sometimes reads a projection's weight or bias directly (dtype checks, tying).
    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    @property
    def adapter_names(self):
        return list(getattr(self, self.adapter_names_attr[0]).keys())

    def adapter_weights(self, name):
        """{attribute: parameter} of adapter ``name`` (``lora_A``: its weight, ...)."""
        raise NotImplementedError

    def check_settings(self, path, settings):
        """Refuse (ValueError) adding an adapter with ``settings`` (the arguments of
        ``add_adapter`` after the name) to this layer at ``path``, where they cannot be."""

    def check_unmerge(self, path, names, what):
        """Refuse (ValueError) an operation ``what`` that would unmerge ``names`` here and cannot
        (checked on every layer before any weight is written)."""

    def release_base_layer(self):
        """The base layer, with what we changed on it restored (for ``unpatch``)."""
        self.base.release(self.base_layer)
        return self.base_layer

    def delete_adapter(self, name):
        for attr in self.adapter_names_attr:
            del getattr(self, attr)[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def check_unsharded(self, what):
        """Merges read and write whole weights: refuse FSDP2's shards with an error naming them."""
        if any(is_sharded(p) for p in self.parameters()):
            raise ValueError(f"lowrank.{what}: this model's weights are sharded by FSDP2 "
                             "(DTensors); merge before fully_shard, or after gathering them")

    def merge(self, name):
        """Write adapter ``name`` into the base weight (NF4: requantized, the original kept)."""
        self.check_unsharded("merge")
        if name in self.merged_adapters:
            raise ValueError(f"lowrank.merge: adapter {name!r} is already merged")
        self.base.merge(self.base_layer, self, name)
        self.merged_adapters.append(name)

    def unmerge(self):
        """Take every merged adapter out of the base weight again."""
        if self.merged_adapters:
            self.check_unsharded("unmerge")
            self.base.unmerge(self.base_layer, self, self.merged_adapters)
        self.merged_adapters.clear()

    def merged_module(self, name, dtype):
        """A plain layer computing what this one computes with adapter ``name`` (None: merged
        already, or none) for ``merge_and_unload`` (see ``BaseLayer.plain_module``)."""
        self.check_unsharded("merge_and_unload")
        return self.base.plain_module(self.base_layer, self, name, dtype)

    def runs_adapter(self):
        """The adapter the forward pass adds, or None: adapters disabled, none active here, or any
        adapter merged into this layer. The base weights, which then hold the merged adapters, run
        alone, as PEFT's layers do: an active adapter that is not merged does not run on top."""
        name = self.active_adapter
        if (self.adapters_disabled or name is None or name not in self.adapter_names
                or self.merged_adapters):
            return None
        return name

    def frozen_operands(self, x):
        """(x, ``ops.FrozenWeight``, bias, output dtype) of the base layer for this call."""
        return self.base.operands(self.base_layer, x)

    def extra_repr(self):
        return (f"base={self.base.description}, adapters={self.adapter_names}, "
                f"active={self.active_adapter!r}")


def adapter_layers(model):
    """{module path: patched layer} of a model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def modules_outside_adapters(model):
    """(path, module) of every module of ``model`` except those inside a patched layer (its
    base_layer and adapter weights are not targets)."""
    inside = ()
    for name, module in model.named_modules():
        if not name or (inside and name.startswith(inside)):
            continue
        if isinstance(module, AdapterLayer):
            inside = (*inside, f"{name}.")
        yield name, module


def layer_features(modules, module_path, what):
    """(in_features, out_features) of the layer at ``module_path`` among ``modules`` ({path:
    module}), patched or not; errors name ``what`` (the caller)."""
    if module_path not in modules:
        raise ValueError(f"lowrank.{what}: the adapter has weights for {module_path}, "
                         "which this model does not have")
    module = modules[module_path]
    if isinstance(module, AdapterLayer):
        # Read when it was patched: under FSDP2 the base's weight is a DTensor that no longer
        # tells a Linear4bit's quant type.
        return module.in_features, module.out_features
    return base_layer_class(module).features(module)


def peft_target_modules(model, paths):
    """The leaf names of ``paths`` when, as PEFT suffixes, they select exactly ``paths`` on the
    base model; otherwise the full paths (which select exactly themselves)."""
    leaves = sorted({p.rpartition(".")[2] for p in paths})
    selected = {name for name, _ in modules_outside_adapters(model)
                if name.rpartition(".")[2] in leaves}
    return leaves if selected == set(paths) else sorted(paths)


def common_peft_config(model, peft_type, layers):
    """The fields of PEFT's adapter_config.json that every method writes alike."""
    return {
        "peft_type": peft_type,
        "task_type": "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "revision": None,
        "target_modules": peft_target_modules(model, list(layers)),
        "exclude_modules": None,
        # PEFT's flag for GPT-2's Conv1D, whose weight is stored (in, out).
        "fan_in_fan_out": any(layer.base.stored_transposed for layer in layers.values()),
        "modules_to_save": None,
        "inference_mode": True,
    }


def peft_adapter_to_serve(layer, adapters, args, kwargs):
    """(the one active adapter of PEFT's ``layer`` (among ``adapters``, the layer's dict of them)
    that our forward runs, None), or (None, why PEFT's forward runs instead): why is None where
    PEFT runs the base layer alone (adapters disabled, merged or none active), which our kernels
    would not speed up, so it is not counted as a fallback."""
    if layer.disable_adapters or layer.merged:
        return None, None
    active = [name for name in layer.active_adapters if name in adapters]
    if not active:
        return None, None
    if args or kwargs:
        return None, f"extra forward arguments ({', '.join(sorted(kwargs)) or 'positional'})"
    if len(active) > 1:
        return None, "several adapters active at once"
    return active[0], None


# Values of PEFT's config fields.

def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_regex(value):
    try:
        re.compile(value)
    except re.error:
        return False
    return True


def is_module_names(value):
    """PEFT's target_modules / feedforward_modules: a regular expression or a list of names."""
    if isinstance(value, str):
        return is_regex(value)
    return isinstance(value, list) and all(isinstance(v, str) for v in value)
