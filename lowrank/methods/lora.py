"""LoRA: ``y = base(x) + scaling * dropout(x) A^T B^T``, everything lowrank does for it in one
place: the layer ``patch_model`` puts in place (``LoraLinear``), its settings checked, its weights
and config in PEFT's format both ways, and the forward ``patch_peft_model`` gives PEFT's LoRA
layers. All of them run ``lowrank.ops.lora_linear`` (``lowrank/ops/lora.py``).

Variants (DoRA, ...) change LoRA's forward and merge for one adapter while its weights, names and
settings stay LoRA's; PEFT keeps them in ``tuners/lora/variants.py``. Here one is a
``LoraVariant`` subclass set for an adapter in ``LoraLinear.variants``, running its own op:
``DoraVariant`` (``patch_model(use_dora=True)``, PEFT's ``use_dora``) on
``lowrank.ops.dora_linear``. PEFT's layers of other variants are left to PEFT's forward by
``peft_refusals``.
"""

import math
import re
from collections import Counter

import torch
from torch import nn

from lowrank import fallbacks, nf4, ops
from lowrank._dispatch import check_device
from lowrank.adapter_layer import (KEY_PREFIX, AdapterConfig, AdapterLayer, common_peft_config,
                                   is_int, is_number, layer_features, peft_adapter_to_serve)
from lowrank.mixed import peft_mixed_forward
from lowrank.base_layers import ExpertsBase, expert_projections
from lowrank.methods.lora_experts import (LoraExperts, peft_experts_forward, projection_shape,
                                          weight_prefixes)
from lowrank.targets import resolve_targets, split_expert_paths

NAME, LABEL, PEFT_TYPE = "lora", "LoRA", "LORA"
# A PEFT weight key, after KEY_PREFIX. DoRA's magnitude: PEFT writes ``...lora_magnitude_vector``
# (its module's ``.weight`` left out) and reads the older ``...lora_magnitude_vector.weight`` too;
# so do we.
# Expert projections (``target_parameters``) carry PEFT's nesting in the name
# (``mlp.experts.base_layer.lora_A.weight``): the module path is the experts module's, the
# ``base_layer.`` prefixes part of the weight's name, as ``LoraExperts.adapter_weights`` names it.
KEY = re.compile(r"(.+?)\.((?:base_layer\.)*(?:lora_A|lora_B)(?=\.weight$)|lora_magnitude_vector)"
                 r"(?:\.weight)?")
KEY_WHAT = "a LoRA A or B (or DoRA magnitude) of a linear layer or an expert projection"
MAGNITUDE = "lora_magnitude_vector"  # DoRA's magnitudes on the layer, as PEFT names them


class LoraVariant:
    """What a LoRA variant implements for one adapter of a ``LoraLinear``: its forward (the
    layer's ``forward`` hands it the call) and its merged weight (``merged_weight`` /
    ``merge_in_place``); extra weights it registers on the layer itself (``weights`` names them,
    ``delete`` removes them)."""

    def weights(self, layer, name):
        """{attribute: parameter} of the variant's own weights of adapter ``name``."""
        return {}

    def delete(self, layer, name):
        """Remove the variant's own weights of adapter ``name``."""

    def forward(self, layer, name, x):
        raise NotImplementedError

    def merged_weight(self, layer, name, weight, bias, dtype):
        raise NotImplementedError

    def merge_in_place(self, layer, name, weight, bias, unmerge):
        raise NotImplementedError


class Magnitude(nn.Module):
    """One DoRA adapter's magnitude m (out_features values, fp32) as the module PEFT keeps it in,
    so that the state-dict key is PEFT's: ``lora_magnitude_vector.<adapter>.weight``."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight)


class DoraVariant(LoraVariant):
    """DoRA (Liu et al. 2024) as PEFT computes it: ``y = base(x) + (g - 1) x_d W^T + g s x_d A^T
    B^T`` with g = m / ||W + s B A|| per output row, the norm detached (without dropout:
    ``g (x W^T + s x A^T B^T) + b``), run as ``lowrank.ops.dora_linear``. The magnitude m is
    registered on the layer as ``lora_magnitude_vector[name]`` and starts, as PEFT's, at the row
    norms of W + s B A (B being zero: those of W).

    Merging writes g (W + s B A) into the base weight, the norm taken over the unmerged weight as
    PEFT takes it: a dense weight in place (unmerging divides by the same g and subtracts s B A
    again), an NF4 weight requantized (its base layer keeps the original bytes and restores them
    bit for bit)."""

    def __init__(self, layer, name):
        if not hasattr(layer, MAGNITUDE):
            setattr(layer, MAGNITUDE, nn.ModuleDict())
        getattr(layer, MAGNITUDE)[name] = Magnitude(self.weight_norm(layer, name))
        self.merged_scale = None  # g when merged into a dense weight, to unmerge by

    def weights(self, layer, name):
        return {MAGNITUDE: getattr(layer, MAGNITUDE)[name].weight}

    def delete(self, layer, name):
        del getattr(layer, MAGNITUDE)[name]

    @staticmethod
    def weight_norm(layer, name):
        """||W + s B A|| per output row, fp32, over the base weight as it is now."""
        return ops.dora_norm(layer.base.frozen_weight(layer.base_layer), *layer.factors(name))

    def merge_scale(self, layer, name):
        """g = m / ||W + s B A|| (fp32), the norm over the unmerged base weight."""
        if layer.merged_adapters:
            raise ValueError(f"lowrank.merge: DoRA adapter {name!r} takes its norm over the "
                             f"unmerged weight, which already holds {layer.merged_adapters}; "
                             "unmerge first")
        magnitude = getattr(layer, MAGNITUDE)[name].weight.detach().float()
        return magnitude / self.weight_norm(layer, name)

    def forward(self, layer, name, x):
        x, weight, bias, out_dtype = layer.frozen_operands(x)
        dropout = layer.lora_dropout[name] if layer.training else 0.0
        y = ops.dora_linear(x, weight, layer.lora_A[name].weight, layer.lora_B[name].weight,
                            getattr(layer, MAGNITUDE)[name].weight, layer.scaling[name],
                            bias=bias, dropout=dropout)
        return y.to(out_dtype)

    def merged_weight(self, layer, name, weight, bias, dtype):
        """(g (W + s B A) of the NF4 ``weight``, bias): requantized as the weight was quantized
        (dtype None) or dense in ``dtype``."""
        merged = ops.merge_lora(weight, *layer.factors(name), dtype=torch.float32)
        merged = merged * self.merge_scale(layer, name)[:, None]
        if dtype is not None:
            return merged.to(dtype), bias
        frozen = layer.base.frozen_weight(layer.base_layer)
        state = frozen.quant_state
        packed, new_state = nf4.quantize(merged, blocksize=state.blocksize,
                                         double_quant=state.nested,
                                         quant_storage=frozen.stored.dtype)
        new_state.dtype = state.dtype  # the merged weight stands for the original's compute dtype
        return (packed.reshape(frozen.stored.shape), new_state), bias

    def merge_in_place(self, layer, name, weight, bias, unmerge):
        lora_A, lora_B, scaling = layer.factors(name)
        if unmerge:
            ops.unmerge_ia3_(weight, self.merged_scale)
            ops.unmerge_lora_(weight, lora_A, lora_B, scaling)
            self.merged_scale = None
        else:
            scale = self.merge_scale(layer, name)
            ops.merge_lora_(weight, lora_A, lora_B, scaling)
            ops.merge_ia3_(weight, scale)
            self.merged_scale = scale


class LoraLinear(AdapterLayer):
    """A linear layer with LoRA adapters: ``y = base(x) + scaling * dropout(x) A^T B^T``, run as
    one fused ``lowrank.ops.lora_linear`` for the active adapter.

    Adapters are fp32 (as PEFT keeps them) whatever the base's dtype; the fused op casts them to
    the compute dtype for the products. One adapter runs at a time (``lowrank.set_adapter``).
    A DoRA adapter (``use_dora``) runs through its ``DoraVariant`` (``variants``).
    """

    adapter_names_attr = ("lora_A", "lora_B")

    def __init__(self, base_layer):
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r, self.lora_alpha, self.scaling, self.lora_dropout = {}, {}, {}, {}
        self.variants = {}  # adapter name -> LoraVariant, for adapters that are not plain LoRA

    def add_adapter(self, name, rank, alpha, dropout, use_rslora, use_dora=False):
        """A new adapter: A Kaiming-uniform (a = sqrt 5), B zero, so it adds nothing yet; with
        ``use_dora`` a DoRA adapter (its magnitude as PEFT initializes it)."""
        if name in self.lora_A:
            raise ValueError(f"lowrank: adapter {name!r} already exists on this layer")
        device = self.base_layer.weight.device
        self.lora_A[name] = nn.Linear(self.in_features, rank, bias=False, device=device,
                                      dtype=torch.float32)
        self.lora_B[name] = nn.Linear(rank, self.out_features, bias=False, device=device,
                                      dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        self.r[name], self.lora_alpha[name], self.lora_dropout[name] = rank, alpha, dropout
        self.scaling[name] = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        if use_dora:
            self.variants[name] = DoraVariant(self, name)

    def delete_adapter(self, name):
        super().delete_adapter(name)
        for table in (self.r, self.lora_alpha, self.scaling, self.lora_dropout):
            del table[name]
        variant = self.variants.pop(name, None)
        if variant is not None:
            variant.delete(self, name)

    def check_unmerge(self, path, names, what):
        """Unmerging a DoRA adapter from a dense weight divides its rows by g = m / ||W + s B A||:
        a row that a zero in m scaled to zero cannot be divided out (inf / NaN in the frozen base,
        which ``unpatch`` cannot undo), so the merge is refused (a merged g has no zeros). A base
        that keeps its original weight on merge (NF4) is exempt: its unmerge puts the original
        back."""
        if self.base.merge_keeps_original or what != "merge":
            return
        for name in names:
            if not isinstance(self.variants.get(name), DoraVariant):
                continue
            zeros = int((getattr(self, MAGNITUDE)[name].weight == 0).sum())
            if zeros:
                raise ValueError(
                    f"lowrank.{what}: DoRA adapter {name!r} has {zeros} zeros in its magnitude at "
                    f"{path}: merging would scale those rows of the dense weight to zero, which "
                    "unmerging cannot divide out; nothing was changed")

    def adapter_weights(self, name):
        weights = {"lora_A": self.lora_A[name].weight, "lora_B": self.lora_B[name].weight}
        if name in self.variants:
            weights.update(self.variants[name].weights(self, name))
        return weights

    def factors(self, name):
        return self.lora_A[name].weight.detach(), self.lora_B[name].weight.detach(), self.scaling[name]

    def merged_weight(self, name, weight, bias, dtype):
        """(W + s B A of the NF4 ``weight``, bias): requantized (dtype None) or dense in ``dtype``."""
        if name in self.variants:
            return self.variants[name].merged_weight(self, name, weight, bias, dtype)
        return ops.merge_lora(weight, *self.factors(name), dtype=dtype), bias

    def merge_in_place(self, name, weight, bias, unmerge):
        """Add (or take out) s B A into the dense (out, in) ``weight``."""
        if name in self.variants:
            return self.variants[name].merge_in_place(self, name, weight, bias, unmerge)
        (ops.unmerge_lora_ if unmerge else ops.merge_lora_)(weight, *self.factors(name))

    def forward(self, x):
        name = self.runs_adapter()
        if name is None:
            return self.base_layer(x)
        if name in self.variants:
            return self.variants[name].forward(self, name, x)
        x, weight, bias, out_dtype = self.frozen_operands(x)
        dropout = self.lora_dropout[name] if self.training else 0.0
        y = ops.lora_linear(x, weight, self.lora_A[name].weight, self.lora_B[name].weight,
                            self.scaling[name], bias=bias, dropout=dropout)
        return y.to(out_dtype)


Layer = LoraLinear


def layer_class(module):
    """The layer ``patch_model`` wraps ``module`` in: ``LoraExperts`` for a mixture-of-experts
    experts module, ``LoraLinear`` for the others."""
    base = module.base if isinstance(module, AdapterLayer) else None
    return LoraExperts if isinstance(base, ExpertsBase) or ExpertsBase.serves(module) else LoraLinear


# patch_model's settings

def check_patch_args(rank, alpha, dropout, use_rslora, use_dora=False):
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"lowrank.patch_model: rank must be a positive int, got {rank!r}")
    if alpha is not None and (not isinstance(alpha, (int, float)) or not math.isfinite(alpha)
                              or alpha <= 0):
        raise ValueError(f"lowrank.patch_model: alpha must be a positive number, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"lowrank.patch_model: dropout must be in [0, 1), got {dropout!r}")
    if not isinstance(use_rslora, bool):
        raise TypeError(f"lowrank.patch_model: use_rslora must be a bool, got {use_rslora!r}")
    if not isinstance(use_dora, bool):
        raise TypeError(f"lowrank.patch_model: use_dora must be a bool, got {use_dora!r}")


def patch_settings(model, rank, alpha, dropout, use_rslora, use_dora, target_modules, layers,
                   feedforward_modules):
    """(AdapterConfig, {path: arguments of ``add_adapter`` after the name}) for ``patch_model``."""
    if feedforward_modules is not None:
        raise ValueError("lowrank.patch_model: feedforward_modules is an IA3 setting")
    rank = 16 if rank is None else rank
    check_patch_args(rank, alpha, dropout, use_rslora, use_dora)
    alpha = 2 * rank if alpha is None else alpha
    linear, experts = split_expert_paths(model, resolve_targets(model, target_modules, layers))
    settings = {name: (rank, alpha, float(dropout), use_rslora, use_dora) for name in linear}
    # An experts module: one layer, the expert projections it adapts as its last setting.
    settings.update({path: (rank, alpha, float(dropout), use_rslora, use_dora, tuple(projections))
                     for path, projections in experts.items()})
    config = AdapterConfig(method=NAME, modules=list(settings), rank=rank, alpha=alpha,
                           dropout=float(dropout), use_rslora=use_rslora, use_dora=use_dora,
                           target_modules=target_modules, layers=layers)
    return config, settings


# PEFT's format: config and weights, both ways

def to_peft(model, adapter_name, config, layers):
    """({PEFT key: weight}, PEFT's adapter config) of adapter ``adapter_name`` on ``layers``."""
    # An experts layer's settings are PEFT's for each of its parameters (target_parameters).
    keyed = {f"{p}.{projection}" if isinstance(layer, LoraExperts) else p: layer
             for p, layer in layers.items()
             for projection in getattr(layer, "projections", {}).get(adapter_name, (None,))}
    ranks = {p: layer.r[adapter_name] for p, layer in keyed.items()}
    alphas = {p: layer.lora_alpha[adapter_name] for p, layer in keyed.items()}
    linear = {p: layer for p, layer in layers.items() if not isinstance(layer, LoraExperts)}
    # The most common rank / alpha is the default; layers that differ go into the patterns.
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    # DoRA's magnitude is written without ``.weight``, as PEFT writes it.
    tensors = {f"{KEY_PREFIX}{p}.{attr}{'' if attr == MAGNITUDE else '.weight'}": weight
               for p, layer in layers.items()
               for attr, weight in layer.adapter_weights(adapter_name).items()}
    return tensors, {
        **common_peft_config(model, PEFT_TYPE, linear),
        "target_parameters": sorted(p for p, layer in keyed.items()
                                    if isinstance(layer, LoraExperts)) or None,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {re.escape(p): r for p, r in ranks.items() if r != rank},
        "alpha_pattern": {re.escape(p): a for p, a in alphas.items() if a != alpha},
        "bias": "none",
        "init_lora_weights": True,
        "use_dora": config.use_dora,
    }


def check_peft_config(config, check, check_pattern):
    """LoRA's fields of a PEFT config, checked with adapters.py's ``check`` / ``check_pattern``."""
    positive_int, positive_number = "a positive integer", "a positive finite number"
    check("r", lambda v: is_int(v) and v >= 1, positive_int)
    check("lora_alpha", lambda v: is_number(v) and v > 0, positive_number)
    check("lora_dropout", lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)", 0.0)
    check("use_rslora", lambda v: isinstance(v, bool), "true or false", False)
    check("use_dora", lambda v: isinstance(v, bool), "true or false", False)
    check("target_parameters", lambda v: v is None or (
        isinstance(v, list) and all(isinstance(t, str) for t in v)), "null or a list of names")
    check("layers_to_transform", lambda v: v is None or is_int(v) or (
        isinstance(v, list) and all(is_int(i) for i in v)), "null, an integer or a list of them")
    check_pattern("rank_pattern", lambda v: is_int(v) and v >= 1, positive_int)
    check_pattern("alpha_pattern", lambda v: is_number(v) and v > 0, positive_number)


def pattern_value(pattern, default, module):
    """A rank_pattern / alpha_pattern lookup, matched as PEFT matches it (first key whose regex
    matches the end of the module path)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def from_peft(config, weights, modules):
    """(AdapterConfig, {path: arguments of ``add_adapter`` after the name}) of a PEFT adapter:
    its ``config`` and ``weights`` ({module path: {weight name: tensor}}) on ``modules``."""
    settings = {}
    use_dora = bool(config.get("use_dora", False))
    expected = {"lora_A", "lora_B"} | ({MAGNITUDE} if use_dora else set())
    for module_path, pair in weights.items():
        module = modules.get(module_path)
        experts = module.base_layer if isinstance(module, LoraExperts) else module
        if experts is not None and ExpertsBase.serves(experts):
            settings[module_path] = _experts_from_peft(config, module_path, experts, pair)
            continue
        in_features, out_features = layer_features(modules, module_path, "load_adapter")
        if set(pair) != expected:
            raise ValueError(f"lowrank.load_adapter: {module_path} has {sorted(pair)}; an adapter "
                             f"with use_dora={str(use_dora).lower()} has {sorted(expected)}")
        if use_dora and tuple(pair[MAGNITUDE].shape) != (out_features,):
            raise ValueError(f"lowrank.load_adapter: {module_path} needs {MAGNITUDE} "
                             f"({out_features},), got {tuple(pair[MAGNITUDE].shape)}")
        rank = pattern_value(config.get("rank_pattern") or {}, config["r"], module_path)
        if tuple(pair["lora_A"].shape) != (rank, in_features) or \
                tuple(pair["lora_B"].shape) != (out_features, rank):
            raise ValueError(
                f"lowrank.load_adapter: {module_path} needs lora_A ({rank}, {in_features}) and lora_B "
                f"({out_features}, {rank}) for rank {rank}, got {tuple(pair['lora_A'].shape)} and "
                f"{tuple(pair['lora_B'].shape)}")
        alpha = pattern_value(config.get("alpha_pattern") or {}, config["lora_alpha"], module_path)
        settings[module_path] = (rank, alpha, float(config.get("lora_dropout", 0.0)),
                                 bool(config.get("use_rslora", False)), use_dora)
    adapter = AdapterConfig(method=NAME, modules=list(settings), rank=config["r"],
                            alpha=config["lora_alpha"], dropout=float(config.get("lora_dropout", 0.0)),
                            use_rslora=bool(config.get("use_rslora", False)), use_dora=use_dora,
                            target_modules=config.get("target_modules"),
                            layers=config.get("layers_to_transform"))
    return adapter, settings


def _experts_from_peft(config, path, experts, weights):
    """``add_adapter``'s settings of the experts module at ``path`` from PEFT's
    ``target_parameters`` adapter, its ``weights`` checked: the projections the config targets,
    each with A (E r) x in and B out x (r E), one rank and alpha for all of them."""
    targets = config.get("target_parameters") or []
    projections = tuple(p for p in expert_projections(experts)
                        if any(f"{path}.{p}" == t or f"{path}.{p}".endswith(f".{t}")
                               for t in targets))
    expected = {f"{prefix}{kind}" for prefix in weight_prefixes(projections).values()
                for kind in ("lora_A", "lora_B")}
    if not projections or set(weights) != expected:
        raise ValueError(f"lowrank.load_adapter: the experts at {path} have weights "
                         f"{sorted(weights)}; target_parameters {targets} give them "
                         f"{sorted(expected)}")
    if config.get("use_dora") or config.get("lora_dropout"):
        raise ValueError(f"lowrank.load_adapter: LoRA on the experts at {path} takes neither DoRA "
                         "nor dropout (nor does PEFT's ParamWrapper)")
    found = set()
    for projection, prefix in weight_prefixes(projections).items():
        key = f"{path}.{projection}"
        rank = pattern_value(config.get("rank_pattern") or {}, config["r"], key)
        alpha = pattern_value(config.get("alpha_pattern") or {}, config["lora_alpha"], key)
        count, in_features, out_features = projection_shape(experts, projection)
        lora_A, lora_B = weights[f"{prefix}lora_A"], weights[f"{prefix}lora_B"]
        if (tuple(lora_A.shape) != (rank * count, in_features)
                or tuple(lora_B.shape) != (out_features, rank * count)):
            raise ValueError(
                f"lowrank.load_adapter: {key} needs lora_A ({rank * count}, {in_features}) and "
                f"lora_B ({out_features}, {rank * count}) for rank {rank} over {count} experts, "
                f"got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
        found.add((rank, alpha))
    if len(found) > 1:
        raise ValueError(f"lowrank.load_adapter: the projections of the experts at {path} have "
                         f"ranks and alphas {sorted(found)}; lowrank takes one per experts module")
    (rank, alpha), = found
    return rank, alpha, 0.0, bool(config.get("use_rslora", False)), False, projections


# What must agree for a saved adapter's weights to be restored into one the model has.
FITTING = "(rank, alpha, use_rslora, use_dora)"


def fitting_settings(settings):
    """{path: what must agree} of ``from_peft``'s settings."""
    return {p: (rank, alpha, rslora, dora)
            for p, (rank, alpha, _, rslora, dora, *_) in settings.items()}


def held_settings(layers, adapter_name, config):
    """{path: what must agree} of adapter ``adapter_name`` on ``layers``."""
    return {p: (layer.r[adapter_name], layer.lora_alpha[adapter_name], config.use_rslora,
                config.use_dora) for p, layer in layers.items()}


# PEFT's LoRA layers on our op (lowrank.patch_peft_model)

def peft_layer_classes():
    """PEFT's LoRA layer classes that ``peft_forward`` serves (PEFT imported when used)."""
    from peft.tuners import lora
    from peft.tuners.lora.bnb import Linear4bit

    return (lora.Linear, Linear4bit, lora.ParamWrapper)


def is_peft_dora(layer, name):
    """True for a PEFT DoRA adapter on a linear layer (what ``ops.dora_linear`` computes)."""
    from peft.tuners.lora.variants import DoraLinearVariant

    return type(layer.lora_variant.get(name)) is DoraLinearVariant


def peft_refusal(layer, name):
    """Why PEFT's ``layer`` cannot run LoRA adapter ``name`` on our op, or None if it can."""
    if name in layer.lora_variant and not is_peft_dora(layer, name):
        return f"the LoRA variant {type(layer.lora_variant[name]).__name__} has no lowrank kernel"
    if is_peft_dora(layer, name) and layer.lora_B[name].bias is not None:
        # PEFT's config refuses lora_bias with DoRA; a layer built otherwise is left to PEFT.
        return "DoRA with lora_bias has no lowrank kernel"
    if type(layer.lora_dropout[name]) not in (nn.Dropout, nn.Identity):
        return f"its dropout is a {type(layer.lora_dropout[name]).__name__}, not nn.Dropout"
    lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
    if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear or lora_A.bias is not None:
        return "its lora_A / lora_B are not plain nn.Linear layers"
    return None


def peft_mixed_refusal(layer, name):
    """Why PEFT's ``layer`` cannot run adapter ``name`` in a mixed batch on ``lora_mixed``, or
    None: a LoRA variant (DoRA included) is not plain LoRA, which ``lora_mixed`` computes."""
    if name in layer.lora_variant:
        return f"the LoRA variant {type(layer.lora_variant[name]).__name__} in a mixed batch"
    return peft_refusal(layer, name)


def peft_refusals(layer):
    """{adapter name: why PEFT's ``layer`` runs PEFT's forward for it}."""
    return {name: why for name in layer.lora_A if (why := peft_refusal(layer, name)) is not None}


def _peft_call(layer, base, name, x):
    """(op, operands, keyword options, output dtype) of the op for adapter ``name`` of PEFT's
    ``layer`` (``dora_linear`` for a DoRA adapter, else ``lora_linear``); raises what the op would
    refuse in them."""
    check_device(x.device)
    x, weight, bias, out_dtype = base.operands(layer.base_layer, x)
    lora_B, scaling = layer.lora_B[name], layer.scaling[name]
    if lora_B.bias is not None:  # PEFT's lora_bias: B's bias, scaled, is one more output bias
        lora_bias = lora_B.bias * scaling
        bias = (lora_bias if bias is None else bias + lora_bias).to(x.dtype)
    dropout = layer.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    if is_peft_dora(layer, name):
        op, checks = ops.dora_linear, ops.dora_linear_checks
        operands = (x, weight, layer.lora_A[name].weight, lora_B.weight,
                    layer.lora_magnitude_vector[name].weight, scaling)
    else:
        op, checks = ops.lora_linear, ops.lora_linear_checks
        operands = (x, weight, layer.lora_A[name].weight, lora_B.weight, scaling)
    options = {"bias": bias, "dropout": p}
    checks(*operands, **options)
    return op, operands, options, out_dtype


def peft_forward(layer, base, x, *args, **kwargs):
    """The forward of PEFT's LoRA ``layer`` over a base of kind ``base``: our op (``dora_linear``
    for a DoRA adapter) for the one adapter we serve (``adapter_names=``, one per row:
    ``lowrank.mixed``'s op), PEFT's own forward otherwise. PEFT's ParamWrappers over an experts
    module run ``lowrank.ops.lora_grouped`` (``methods/lora_experts.py``)."""
    if isinstance(base, ExpertsBase):
        return peft_experts_forward(layer, peft_refusal, x, *args, **kwargs)
    if not args and kwargs.keys() == {"adapter_names"}:
        y, why = peft_mixed_forward(layer, base, x, kwargs["adapter_names"], peft_mixed_refusal)
        if y is not None:
            return y
        if why is not None:
            return fallbacks.fall_back(layer, why, x, args, kwargs)
    name, why = peft_adapter_to_serve(layer, layer.lora_A, args, kwargs)
    if name is None:
        return fallbacks.fall_back(layer, why, x, args, kwargs)
    why = peft_refusal(layer, name)
    if why is None:
        call, why = fallbacks.checked(_peft_call, layer, base, name, x)
    if why is not None:
        return fallbacks.fall_back(layer, why, x, args, kwargs)
    op, operands, options, out_dtype = call
    return op(*operands, **options).to(out_dtype)


def peft_projection(layer, base, x):
    """What ``peft_forward`` runs for PEFT's ``layer`` (over a base of kind ``base``) on ``x``,
    where that is ``lora_linear``, as (``ops.LoraProjection``, the compute dtype, the output
    dtype): a block fusion runs it inside its fused op. None where ``peft_forward`` would run
    something else: PEFT's forward (no adapter or several, a variant, a fallback the op's checks
    give) or ``dora_linear``."""
    name, _ = peft_adapter_to_serve(layer, layer.lora_A, (), {})
    if name is None or peft_refusal(layer, name) is not None or is_peft_dora(layer, name):
        return None
    call, why = fallbacks.checked(_peft_call, layer, base, name, x)
    if why is not None:
        return None
    _, (x, weight, lora_A, lora_B, scaling), options, out_dtype = call
    return ops.LoraProjection(weight, lora_A, lora_B, scaling, **options), x.dtype, out_dtype
