"""Which modules of a model an adapter targets: ``target_modules`` and ``layers`` (as PEFT reads
them) resolved to module paths, checked, in model order."""

import re
import warnings

from torch import nn
from transformers.pytorch_utils import Conv1D

from lowrank.base_layers import ExpertsBase, base_layer_class, expert_projections
from lowrank.adapter_layer import AdapterLayer, modules_outside_adapters

# A decoder / encoder block's index in a module path: model.layers.3., transformer.h.3.,
# bert.encoder.layer.3., ... (the container names PEFT's layers_to_transform understands).
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|block|blocks)\.(\d+)\.")


def _linear_candidates(model):
    """The paths a default target patches: every nn.Linear / Conv1D (or already patched layer)
    except the output head, as PEFT's "all-linear" does, and every expert projection of a
    mixture-of-experts block (``expert_weight_paths``)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None

    def is_head(module):
        return head is not None and (module is head or getattr(module, "base_layer", None) is head)

    names = []
    for name, module in modules_outside_adapters(model):
        projections = _projections(module)
        if projections:
            names += [f"{name}.{p}" for p in projections]
        elif isinstance(module, (nn.Linear, Conv1D, AdapterLayer)) and not is_head(module):
            names.append(name)
    return names


def _projections(module):
    """The expert projections of an experts module, patched (``LoraExperts``) or not; ()."""
    if isinstance(module, AdapterLayer):
        return expert_projections(module.base_layer) if isinstance(module.base, ExpertsBase) else ()
    return expert_projections(module)


def split_expert_paths(model, names):
    """``names`` (targets) as (module paths, {experts module path: expert projection names}): an
    expert projection is targeted by its parameter path (``...mlp.experts.gate_up_proj``)."""
    modules, experts = [], {}
    for name in names:
        path, _, param = name.rpartition(".")
        if path and param in _projections(model.get_submodule(path)):
            experts.setdefault(path, []).append(param)
        else:
            modules.append(name)
    return modules, experts


def weights_left_out(model):
    """{parameter path: why} for the weight matrices the default target leaves without an adapter
    because they are not in a linear layer (embeddings and the output head aside, which no default
    adapts): a mixture-of-experts block's 3-D expert weights, a router or other module's own
    weights. Said in ``resolve_targets``' warning, so that nothing is skipped in silence."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    left = {}
    for path, module in modules_outside_adapters(model):
        if (isinstance(module, (nn.Linear, Conv1D, AdapterLayer, nn.Embedding)) or module is head
                or ExpertsBase.serves(module)):
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.dim() < 2:
                continue
            kind = type(module).__name__
            left[f"{path}.{name}" if path else name] = (
                f"{tuple(param.shape)}, one matrix per expert of {kind}, which is not one of "
                "transformers' experts modules lowrank adapts (expert_projections)"
                if param.dim() == 3 else
                f"{tuple(param.shape)}, a weight of {kind}, which is not a linear layer")
    return left


def matches(target_modules, name):
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in target_modules)


def resolve_targets(model, target_modules, layers):
    """The module paths to patch, in model order: errors for targets that match nothing or layers
    the model lacks; layers of a type we cannot patch are an error when named explicitly, and a
    warning listing them when picked by the default (every linear layer)."""
    by_default = target_modules is None or (isinstance(target_modules, str)
                                            and target_modules.lower() == "all-linear")
    if by_default:
        names = _linear_candidates(model)
    else:
        if isinstance(target_modules, str):
            try:
                re.compile(target_modules)
            except re.error as error:
                raise ValueError(f"lowrank.patch_model: target_modules {target_modules!r} is not a "
                                 f"valid regular expression: {error}") from None
        elif (not isinstance(target_modules, (list, tuple, set)) or not target_modules
              or not all(isinstance(t, str) for t in target_modules)):
            raise TypeError("lowrank.patch_model: target_modules must be None, 'all-linear', a "
                            "regular expression or a non-empty list of module name suffixes, got "
                            f"{target_modules!r}")
        names = []
        for name, module in modules_outside_adapters(model):
            projections = _projections(module)
            if projections and matches(target_modules, name):  # the experts module: all of them
                names += [f"{name}.{p}" for p in projections]
            elif projections:
                names += [f"{name}.{p}" for p in projections
                          if matches(target_modules, f"{name}.{p}")]
            elif matches(target_modules, name):
                names.append(name)
        if not isinstance(target_modules, str):
            experts = split_expert_paths(model, names)[1]  # named by their module path too
            unmatched = [t for t in target_modules if not any(matches([t], n) for n in names)
                         and not any(matches([t], path) for path in experts)]
            if unmatched:
                raise ValueError(f"lowrank.patch_model: target_modules {unmatched} match no module "
                                 "of this model")
        elif not names:
            raise ValueError(f"lowrank.patch_model: target_modules {target_modules!r} matches no "
                             "module of this model")
    if layers is not None:
        names = _filter_layers(model, names, layers)
    modules = {name: model.get_submodule(name) for name in split_expert_paths(model, names)[0]}
    unsupported = {}
    for name, module in modules.items():
        try:
            base_layer_class(module.base_layer if isinstance(module, AdapterLayer) else module)
        except TypeError as error:
            unsupported[name] = str(error)
    if unsupported and not by_default:
        details = "; ".join(f"{n}: {e}" for n, e in unsupported.items())
        raise TypeError(f"lowrank.patch_model: cannot patch {len(unsupported)} targeted modules: "
                        f"{details}")
    if unsupported:
        warnings.warn(f"lowrank.patch_model: skipped {len(unsupported)} linear layers of types it "
                      f"cannot patch: {sorted(unsupported)}", stacklevel=4)
    left_out = weights_left_out(model) if by_default else {}
    if left_out:
        warnings.warn(f"lowrank.patch_model: {len(left_out)} weights are not in linear layers and get "
                      "no adapter: " + "; ".join(f"{n} {why}" for n, why in left_out.items()),
                      stacklevel=4)
    names = [n for n in names if n not in unsupported]
    if not names:
        raise ValueError("lowrank.patch_model: no layer to patch")
    return names


def _filter_layers(model, names, layers):
    layers = [layers] if isinstance(layers, int) else list(layers)
    if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise TypeError(f"lowrank.patch_model: layers must be an int or a list of ints, got {layers!r}")
    present = {int(m.group(1)) for name, _ in model.named_modules()
               if (m := LAYER_INDEX.search(f".{name}."))}
    missing = sorted(set(layers) - present)
    if missing:
        raise ValueError(f"lowrank.patch_model: layers {missing} are not in this model (it has "
                         f"layers {sorted(present)})")
    kept = []
    for name in names:
        match = LAYER_INDEX.search(f".{name}.")
        if match and int(match.group(1)) in layers:
            kept.append(name)
    return kept


def feedforward_paths(names, feedforward_modules):
    """The paths among ``names`` that ``feedforward_modules`` (suffixes or a regex) selects; a
    suffix that selects none of them is an error (feed-forward layers must be targets)."""
    if not isinstance(feedforward_modules, (str, list, tuple, set)):
        raise TypeError("lowrank.patch_model: feedforward_modules must be a list of module name "
                        f"suffixes or a regular expression, got {feedforward_modules!r}")
    chosen = [n for n in names if matches(feedforward_modules, n)]
    if not isinstance(feedforward_modules, str):
        unmatched = [t for t in feedforward_modules if not any(matches([t], n) for n in names)]
        if unmatched:
            raise ValueError(f"lowrank.patch_model: feedforward_modules {unmatched} match no "
                             "targeted module")
    return chosen
