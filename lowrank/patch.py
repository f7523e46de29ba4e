"""``lowrank.patch_model`` and the adapter lifecycle: the patcher, its revert, several adapters.

Patching replaces each targeted linear layer of a model, in place, with a ``lowrank.modules``
layer that keeps the original as ``base_layer``. What was patched, the adapters' settings, and the
``requires_grad`` flags the model had before are kept on the model (``model.lowrank_state``), so
that ``unpatch`` restores the very same module objects and flags.
"""

import contextlib
import math
import re
import types
import warnings
from dataclasses import dataclass, field

from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from lowrank.modules import AdapterLayer, LoraLinear, layer_kind

METHODS = ("lora",)
# A decoder / encoder block's index in a module path: model.layers.3., transformer.h.3.,
# bert.encoder.layer.3., ... (the container names PEFT's layers_to_transform understands).
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|block|blocks)\.(\d+)\.")


@dataclass
class AdapterConfig:
    """One adapter's settings, as ``patch_model`` or ``load_adapter`` got them."""

    method: str
    modules: list  # the module paths it patched
    rank: int = None
    alpha: float = None
    dropout: float = 0.0
    use_rslora: bool = False
    target_modules: object = None
    layers: list = None


@dataclass
class PatchState:
    adapters: dict = field(default_factory=dict)  # name -> AdapterConfig, in order of creation
    active: str = None
    requires_grad: dict = field(default_factory=dict)  # parameter name -> flag before patching


def patch_state(model, what):
    state = getattr(model, "lowrank_state", None)
    if state is None:
        raise ValueError(f"lowrank.{what}: the model is not patched (call lowrank.patch_model first)")
    return state


def check_adapter(state, name, what):
    if name not in state.adapters:
        raise ValueError(f"lowrank.{what}: no adapter named {name!r}; the model has "
                         f"{list(state.adapters)}")


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


def _linear_candidates(model):
    """The paths a default target patches: every nn.Linear / Conv1D (or already patched layer)
    except the output head, as PEFT's "all-linear" does."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None

    def is_head(module):
        return head is not None and (module is head or getattr(module, "base_layer", None) is head)

    return [name for name, module in modules_outside_adapters(model)
            if isinstance(module, (nn.Linear, Conv1D, AdapterLayer)) and not is_head(module)]


def _matches(target_modules, name):
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
        names = [name for name, _ in modules_outside_adapters(model)
                 if _matches(target_modules, name)]
        if not isinstance(target_modules, str):
            unmatched = [t for t in target_modules if not any(_matches([t], n) for n in names)]
            if unmatched:
                raise ValueError(f"lowrank.patch_model: target_modules {unmatched} match no module "
                                 "of this model")
        elif not names:
            raise ValueError(f"lowrank.patch_model: target_modules {target_modules!r} matches no "
                             "module of this model")
    if layers is not None:
        names = _filter_layers(model, names, layers)
    modules = {name: model.get_submodule(name) for name in names}
    unsupported = {}
    for name, module in modules.items():
        try:
            layer_kind(module.base_layer if isinstance(module, AdapterLayer) else module)
        except TypeError as error:
            unsupported[name] = str(error)
    if unsupported and not by_default:
        details = "; ".join(f"{n}: {e}" for n, e in unsupported.items())
        raise TypeError(f"lowrank.patch_model: cannot patch {len(unsupported)} targeted modules: "
                        f"{details}")
    if unsupported:
        warnings.warn(f"lowrank.patch_model: skipped {len(unsupported)} linear layers of types it "
                      f"cannot patch: {sorted(unsupported)}", stacklevel=3)
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


def add_adapter(model, adapter_name, config, layer_settings):
    """Patch (or extend) the layers in ``layer_settings`` ({path: (rank, alpha)} for LoRA) with a new
    adapter. Everything is checked before the model is changed."""
    state = getattr(model, "lowrank_state", None)
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"lowrank: adapter_name must be a non-empty string without '.', got "
                         f"{adapter_name!r}")
    if state is not None and adapter_name in state.adapters:
        raise ValueError(f"lowrank: the model already has an adapter named {adapter_name!r}; "
                         "delete_adapter it first or choose another name")
    layer_class = LoraLinear
    targets = {}
    for name in layer_settings:
        module = model.get_submodule(name)
        if isinstance(module, AdapterLayer) and not isinstance(module, layer_class):
            raise ValueError(f"lowrank: {name} already carries a {type(module).__name__} adapter; "
                             f"one layer takes adapters of one method")
        if not isinstance(module, AdapterLayer):
            layer_kind(module)
        targets[name] = module
    if state is None:
        state = PatchState(requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
        model.lowrank_state = state
        _attach_to_transformers(model)
    for name, module in targets.items():
        if not isinstance(module, AdapterLayer):
            module = layer_class(module).train(module.training)  # new modules start in train mode
            _replace(model, name, module)
        module.add_adapter(adapter_name, *layer_settings[name], config.dropout, config.use_rslora)
        module.active_adapter = state.active
    state.adapters[adapter_name] = config
    if state.active is None:
        _activate(model, state, adapter_name)
    else:
        _mark_trainable(model, state)


def _attach_to_transformers(model):
    """Tell a transformers model that it carries an adapter, as PEFT's integration does: Trainer
    then trains a 4-bit model (it refuses purely quantized ones), gradient checkpointing keeps
    input gradients flowing to the adapters, and ``save_pretrained`` (what ``trainer.save_model``
    and checkpoints call) writes the active adapter in PEFT's format instead of the whole model."""
    if isinstance(model, PreTrainedModel):
        model._hf_peft_config_loaded = True
        model.save_pretrained = types.MethodType(_save_pretrained, model)


def _detach_from_transformers(model):
    if isinstance(model, PreTrainedModel):
        del model._hf_peft_config_loaded  # back to the class's False
        del model.save_pretrained


def _save_pretrained(model, save_directory, state_dict=None, is_main_process=True, **kwargs):
    """``save_pretrained`` of a patched transformers model: the active adapter, PEFT's format."""
    from lowrank.adapters import save_adapter  # adapters.py builds on this module

    if state_dict is not None:
        raise NotImplementedError("lowrank: save_pretrained of a patched model writes the adapter "
                                  "from its layers; a state_dict argument is not supported")
    if is_main_process:
        save_adapter(model, save_directory, adapter_name=model.lowrank_state.active)


def _replace(model, path, module):
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _activate(model, state, name):
    state.active = name
    for layer in adapter_layers(model).values():
        layer.active_adapter = name
    _mark_trainable(model, state)


def _mark_trainable(model, state):
    """Only the active adapter's weights train (as PEFT does): the base and other adapters are frozen."""
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in adapter_layers(model).values():
        if state.active in layer.adapter_names:
            for attr in layer.adapter_names_attr:
                getattr(layer, attr)[state.active].requires_grad_(True)


def _check_lora_args(rank, alpha, dropout, use_rslora):
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"lowrank.patch_model: rank must be a positive int, got {rank!r}")
    if alpha is not None and (not isinstance(alpha, (int, float)) or not math.isfinite(alpha)
                              or alpha <= 0):
        raise ValueError(f"lowrank.patch_model: alpha must be a positive number, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"lowrank.patch_model: dropout must be in [0, 1), got {dropout!r}")
    if not isinstance(use_rslora, bool):
        raise TypeError(f"lowrank.patch_model: use_rslora must be a bool, got {use_rslora!r}")


def patch_model(model, rank=16, alpha=None, target_modules=None, method="lora", dropout=0.0,
                use_rslora=False, adapter_name="default", layers=None):
    """Add an adapter to ``model``'s linear layers, in place; return the model.

    - ``alpha``: default 2 * rank. LoRA's scaling is alpha / rank, or alpha / sqrt(rank) with
      ``use_rslora``.
    - ``target_modules``: None or "all-linear" (every nn.Linear / Linear4bit / Conv1D except the
      output head), a list of module name suffixes (``["q_proj", "v_proj"]``), or a regular
      expression matched against whole module paths. ``layers``: an int or list of block indices.
    - Base weights are frozen; the active adapter's weights train. A second call with another
      ``adapter_name`` adds an adapter; ``lowrank.set_adapter`` picks the one that runs.
    """
    if method not in METHODS:
        raise ValueError(f"lowrank.patch_model: method must be one of {METHODS}, got {method!r}")
    _check_lora_args(rank, alpha, dropout, use_rslora)
    alpha = 2 * rank if alpha is None else alpha
    names = resolve_targets(model, target_modules, layers)
    config = AdapterConfig(method=method, modules=names, rank=rank, alpha=alpha,
                           dropout=float(dropout), use_rslora=use_rslora,
                           target_modules=target_modules, layers=layers)
    add_adapter(model, adapter_name, config, {name: (rank, alpha) for name in names})
    return model


def unpatch(model):
    """Put back the original modules (the same objects) and ``requires_grad`` flags; return the model."""
    state = patch_state(model, "unpatch")
    merged = {n for layer in adapter_layers(model).values() for n in layer.merged_adapters}
    if merged:
        raise ValueError(f"lowrank.unpatch: adapters {sorted(merged)} are merged into the base "
                         "weights; unmerge them first")
    for name, layer in adapter_layers(model).items():
        _replace(model, name, layer.release_base_layer())
    for name, param in model.named_parameters():
        param.requires_grad_(state.requires_grad.get(name, param.requires_grad))
    del model.lowrank_state
    _detach_from_transformers(model)
    return model


def set_adapter(model, adapter_name):
    """Make ``adapter_name`` the adapter that runs (and trains) in every layer that has it."""
    state = patch_state(model, "set_adapter")
    check_adapter(state, adapter_name, "set_adapter")
    _activate(model, state, adapter_name)


@contextlib.contextmanager
def disable_adapters(model):
    """Within the block the model computes exactly what its base model computes."""
    patch_state(model, "disable_adapters")
    layers = adapter_layers(model).values()
    merged = {n for layer in layers for n in layer.merged_adapters}
    if merged:
        raise ValueError(f"lowrank.disable_adapters: adapters {sorted(merged)} are merged into the "
                         "base weights; unmerge them first")
    for layer in layers:
        layer.adapters_disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.adapters_disabled = False


def delete_adapter(model, adapter_name):
    """Remove an adapter; layers left without any adapter get their original module back."""
    state = patch_state(model, "delete_adapter")
    check_adapter(state, adapter_name, "delete_adapter")
    if len(state.adapters) == 1:
        raise ValueError(f"lowrank.delete_adapter: {adapter_name!r} is the model's only adapter; "
                         "use lowrank.unpatch to remove it")
    layers = adapter_layers(model)
    if any(adapter_name in layer.merged_adapters for layer in layers.values()):
        raise ValueError(f"lowrank.delete_adapter: {adapter_name!r} is merged; unmerge it first")
    for name, layer in layers.items():
        if adapter_name in layer.adapter_names:
            layer.delete_adapter(adapter_name)
            if not layer.adapter_names:
                _replace(model, name, layer.release_base_layer())
    del state.adapters[adapter_name]
    if state.active == adapter_name:
        successor = next(iter(state.adapters))
        warnings.warn(f"lowrank.delete_adapter: deleted the active adapter {adapter_name!r}; "
                      f"{successor!r} is active now", stacklevel=2)
        _activate(model, state, successor)


def trainable_parameters(model):
    """(trainable, all) parameter counts, counted as PEFT counts them (a packed 4-bit weight counts
    two parameters per byte)."""
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        if type(param).__name__ == "Params4bit":
            count *= 2 * param.element_size()
        total += count
        trainable += count if param.requires_grad else 0
    return trainable, total


def print_trainable_parameters(model):
    """Print the counts in PEFT's format."""
    trainable, total = trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
          f"trainable%: {100 * trainable / total:.4f}")
