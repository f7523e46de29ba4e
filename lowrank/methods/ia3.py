"""IA3: ``y = base(x) * l`` (l over the outputs) or, for a feed-forward layer, ``y = base(x * l)``
(l over the inputs), everything lowrank does for it in one place: the layer ``patch_model`` puts
in place (``IA3Linear``), its settings and defaults (from ``lowrank.architectures``), its weights
and config in PEFT's format both ways, and the forward ``patch_peft_model`` gives PEFT's IA3
layers. All of them run ``lowrank.ops.ia3_linear`` (``lowrank/ops/ia3.py``).
"""

import re

import torch
from torch import nn

from lowrank import fallbacks, ops
from lowrank._dispatch import check_device
from lowrank.architectures import ia3_defaults
from lowrank.adapter_layer import (KEY_PREFIX, AdapterConfig, AdapterLayer, common_peft_config,
                                   is_module_names, layer_features, peft_adapter_to_serve)
from lowrank.targets import feedforward_paths, resolve_targets, split_expert_paths

NAME, LABEL, PEFT_TYPE = "ia3", "IA3", "IA3"
KEY = re.compile(r"(.+)\.(ia3_l)")  # a PEFT weight key, after KEY_PREFIX
KEY_WHAT = "an IA3 vector of a linear layer"


class IA3Linear(AdapterLayer):
    """A linear layer with IA3 vectors: ``y = base(x) * l`` (l over the outputs) or, for a
    feed-forward layer, ``y = base(x * l)`` (l over the inputs), run as one fused
    ``lowrank.ops.ia3_linear``. l is fp32, shaped as PEFT shapes it: (out, 1) or (1, in)."""

    adapter_names_attr = ("ia3_l",)

    def __init__(self, base_layer):
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward = None  # fixed by the first adapter: PEFT decides it per layer

    def add_adapter(self, name, feedforward):
        """A new vector of ones: it changes nothing yet."""
        if name in self.ia3_l:
            raise ValueError(f"lowrank: adapter {name!r} already exists on this layer")
        if self.is_feedforward is not None and feedforward != self.is_feedforward:
            raise ValueError(f"lowrank: this layer's IA3 adapters are "
                             f"{'' if self.is_feedforward else 'not '}feed-forward")
        self.is_feedforward = feedforward
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        self.ia3_l[name] = nn.Parameter(torch.ones(shape, device=self.base_layer.weight.device))

    def adapter_weights(self, name):
        return {"ia3_l": self.ia3_l[name]}

    def check_settings(self, path, settings):
        if self.is_feedforward != settings[0]:
            raise ValueError(f"lowrank: {path}'s IA3 adapters are "
                             f"{'' if self.is_feedforward else 'not '}feed-forward")

    def check_unmerge(self, path, names, what):
        """Unmerging IA3 from a dense weight divides it by l, so a zero in l, whose rows (or
        columns) the merge multiplied to zero, cannot be divided out: it would write inf / NaN
        into the frozen base, where ``unpatch`` cannot undo it. Checked at merge time too (PEFT
        instead divides by l + 1e-8 and leaves those weights zero). A base that keeps its original
        weight on merge (NF4) is exempt: its unmerge puts the original back."""
        if self.base.merge_keeps_original:
            return
        for name in names:
            zeros = int((self.ia3_l[name] == 0).sum())
            if not zeros:
                continue
            if what == "merge":
                raise ValueError(
                    f"lowrank.merge: IA3 adapter {name!r} has {zeros} zeros in l of {path}: "
                    "merging would zero weights that unmerging cannot divide back (nothing was "
                    "merged). To merge for good, use lowrank.merge_and_unload or "
                    "lowrank.unpatch(model, merge=True)")
            raise ValueError(
                f"lowrank.{what}: merged IA3 adapter {name!r} now has {zeros} zeros in l of {path} "
                "(set after merging): dividing them out would write inf / NaN into the base "
                "weight, so nothing was unmerged. Restore l as it was when merged, or keep the "
                "merged weights with lowrank.unpatch(model, merge=True)")

    def merged_weight(self, name, weight, bias, dtype):
        """(W scaled by l of the NF4 ``weight``, its bias scaled too in the output form)."""
        return ops.merge_ia3(weight, self.ia3_l[name].detach(), self.is_feedforward, bias=bias,
                             dtype=dtype)

    def merge_in_place(self, name, weight, bias, unmerge):
        """Scale (or unscale) the dense (out, in) ``weight`` by l, and its bias in the output form."""
        (ops.unmerge_ia3_ if unmerge else ops.merge_ia3_)(
            weight, self.ia3_l[name].detach(), self.is_feedforward, bias=bias)

    def forward(self, x):
        name = self.runs_adapter()
        if name is None:
            return self.base_layer(x)
        x, weight, bias, out_dtype = self.frozen_operands(x)
        y = ops.ia3_linear(x, weight, self.ia3_l[name], bias=bias, feedforward=self.is_feedforward)
        return y.to(out_dtype)

    def extra_repr(self):
        return f"{super().extra_repr()}, feedforward={self.is_feedforward}"


Layer = IA3Linear


def layer_class(module):
    """The layer ``patch_model`` wraps ``module`` in: IA3Linear for every kind it patches."""
    return IA3Linear


# patch_model's settings

def patch_settings(model, rank, alpha, dropout, use_rslora, use_dora, target_modules, layers,
                   feedforward_modules):
    """(AdapterConfig, {path: arguments of ``add_adapter`` after the name}) for ``patch_model``:
    the architecture's defaults (``lowrank.architectures``) for targets not given."""
    given = [k for k, v in dict(rank=rank, alpha=alpha, dropout=dropout or None,
                                use_rslora=use_rslora or None,
                                use_dora=use_dora or None).items() if v is not None]
    if given:
        raise ValueError(f"lowrank.patch_model: {given} are LoRA settings; IA3 has none")
    if target_modules is None or feedforward_modules is None:
        default_targets, default_feedforward = ia3_defaults(model)
        target_modules = default_targets if target_modules is None else target_modules
        if feedforward_modules is None:
            feedforward_modules = default_feedforward
    names = resolve_targets(model, target_modules, layers)
    experts = split_expert_paths(model, names)[1]
    if experts:
        raise ValueError(f"lowrank.patch_model: IA3 has no form for mixture-of-experts expert "
                         f"weights, which the targets select in {sorted(experts)}; name target_modules "
                         "that leave them out (LoRA adapts them)")
    feedforward = feedforward_paths(names, feedforward_modules)
    config = AdapterConfig(method=NAME, modules=names, target_modules=target_modules,
                           layers=layers, feedforward_modules=feedforward)
    return config, {n: (n in feedforward,) for n in names}


# PEFT's format: config and weights, both ways

def peft_feedforward_modules(layers, target_modules):
    """IA3's feedforward_modules as PEFT matches them (``path.endswith(entry)``), a subset of
    ``target_modules`` as PEFT requires: leaf names when the targets are leaf names and those
    select exactly the feed-forward layers, else the full paths."""
    feedforward = {p for p, layer in layers.items() if layer.is_feedforward}
    leaves = sorted({p.rpartition(".")[2] for p in feedforward})
    selected = {p for p in layers if any(p.endswith(leaf) for leaf in leaves)}
    if selected == feedforward and set(leaves) <= set(target_modules):
        return leaves
    return sorted(feedforward)


def to_peft(model, adapter_name, config, layers):
    """({PEFT key: weight}, PEFT's adapter config) of adapter ``adapter_name`` on ``layers``."""
    tensors = {f"{KEY_PREFIX}{p}.ia3_l": layer.ia3_l[adapter_name] for p, layer in layers.items()}
    peft_config = common_peft_config(model, PEFT_TYPE, layers)
    return tensors, {**peft_config, "init_ia3_weights": True, "feedforward_modules":
                     peft_feedforward_modules(layers, peft_config["target_modules"])}


def check_peft_config(config, check, check_pattern):
    """IA3's fields of a PEFT config, checked with adapters.py's ``check``."""
    check("feedforward_modules", lambda v: v is None or is_module_names(v),
          "null, a regular expression or a list of module names")


def is_feedforward(feedforward_modules, module_path):
    """PEFT's test: a regex must match the whole path, a list entry its end."""
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, module_path) is not None
    return any(module_path.endswith(entry) for entry in feedforward_modules or ())


def from_peft(config, weights, modules):
    """(AdapterConfig, {path: arguments of ``add_adapter`` after the name}) of a PEFT adapter:
    its ``config`` and ``weights`` ({module path: {weight name: tensor}}) on ``modules``."""
    settings = {}
    for module_path, vector in weights.items():
        in_features, out_features = layer_features(modules, module_path, "load_adapter")
        feedforward = is_feedforward(config.get("feedforward_modules"), module_path)
        shape = (1, in_features) if feedforward else (out_features, 1)
        if tuple(vector["ia3_l"].shape) != shape:
            raise ValueError(f"lowrank.load_adapter: {module_path} is "
                             f"{'' if feedforward else 'not '}feed-forward and needs ia3_l {shape}, "
                             f"got {tuple(vector['ia3_l'].shape)}")
        settings[module_path] = (feedforward,)
    adapter = AdapterConfig(method=NAME, modules=list(settings),
                            target_modules=config.get("target_modules"),
                            feedforward_modules=[p for p, (ff,) in settings.items() if ff])
    return adapter, settings


# What must agree for a saved adapter's weights to be restored into one the model has.
FITTING = "(feed-forward,)"


def fitting_settings(settings):
    """{path: what must agree} of ``from_peft``'s settings."""
    return settings


def held_settings(layers, adapter_name, config):
    """{path: what must agree} of adapter ``adapter_name`` on ``layers``."""
    return {p: (layer.is_feedforward,) for p, layer in layers.items()}


# PEFT's IA3 layers on our op (lowrank.patch_peft_model)

def peft_layer_classes():
    """PEFT's IA3 layer classes that ``peft_forward`` serves (PEFT imported when used)."""
    from peft.tuners import ia3
    from peft.tuners.ia3.bnb import Linear4bit

    return (ia3.Linear, Linear4bit)


def peft_refusals(layer):
    """{adapter name: why PEFT's ``layer`` runs PEFT's forward for it}: every IA3 adapter runs
    on our op."""
    return {}


def _peft_call(layer, base, name, x):
    """(operands, keyword options, output dtype) of ``ops.ia3_linear`` for adapter ``name`` of
    PEFT's ``layer``; raises what the op would refuse in them."""
    check_device(x.device)
    x, weight, bias, out_dtype = base.operands(layer.base_layer, x)
    operands = (x, weight, layer.ia3_l[name])
    options = {"bias": bias, "feedforward": layer.is_feedforward}
    ops.ia3_linear_checks(*operands, **options)
    return operands, options, out_dtype


def peft_forward(layer, base, x, *args, **kwargs):
    """The forward of PEFT's IA3 ``layer`` over a base of kind ``base``: our op for the one
    adapter we serve, PEFT's own forward otherwise."""
    name, why = peft_adapter_to_serve(layer, layer.ia3_l, args, kwargs)
    if name is None:
        return fallbacks.fall_back(layer, why, x, args, kwargs)
    call, why = fallbacks.checked(_peft_call, layer, base, name, x)
    if why is not None:
        return fallbacks.fall_back(layer, why, x, args, kwargs)
    operands, options, out_dtype = call
    return ops.ia3_linear(*operands, **options).to(out_dtype)
