"""``lowrank.patch_model`` and the adapter lifecycle: the patcher, its revert, several adapters.

Patching replaces each targeted linear layer of a model, in place, with a ``lowrank.modules``
layer that keeps the original as ``base_layer``. What was patched, the adapters' settings, and the
``requires_grad`` flags the model had before are kept on the model (``model.lowrank_state``), so
that ``unpatch`` restores the very same module objects and flags.
"""

import contextlib
import functools
import math
import os
import re
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from lowrank.dora import DoraLinear
from lowrank.modules import AdapterLayer, IA3Linear, LoraLinear, layer_kind, nf4_operands

LAYER_CLASSES = {"lora": LoraLinear, "ia3": IA3Linear}
# IA3's default targets and, among them, the feed-forward layers (l scales their input), per
# config.model_type: attention keys/values (queries for Gemma and Qwen2) and the MLP's down
# projection, the choice PEFT makes for these architectures.
IA3_DEFAULTS = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
}
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
    use_dora: bool = False  # LoRA: DoRA adapters (DoraLinear layers)
    target_modules: object = None
    layers: list = None
    feedforward_modules: list = None  # IA3: the patched paths whose input l scales


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


def layer_class_of(config):
    """The layer class that runs adapters of ``config``."""
    return DoraLinear if config.use_dora else LAYER_CLASSES[config.method]


def add_adapter(model, adapter_name, config, layer_settings):
    """Patch (or extend) the layers in ``layer_settings`` with a new adapter: {path: arguments of
    the layer's ``add_adapter`` after the name}, (rank, alpha, dropout, use_rslora) for LoRA,
    (feedforward,) for IA3. Everything is checked before the model is changed."""
    state = getattr(model, "lowrank_state", None)
    peft_layers = [type(m).__name__ for m in model.modules() if type(m).__module__.startswith("peft.")]
    if peft_layers:
        raise ValueError(f"lowrank: the model carries PEFT layers ({sorted(set(peft_layers))}); patch "
                         "the base model instead (lowrank.load_adapter reads PEFT adapters)")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"lowrank: adapter_name must be a non-empty string without '.', got "
                         f"{adapter_name!r}")
    if state is not None and adapter_name in state.adapters:
        raise ValueError(f"lowrank: the model already has an adapter named {adapter_name!r}; "
                         "delete_adapter it first or choose another name")
    layer_class = layer_class_of(config)
    targets = {}
    for name in layer_settings:
        module = model.get_submodule(name)
        if isinstance(module, AdapterLayer) and type(module) is not layer_class:
            raise ValueError(f"lowrank: {name} already carries a {type(module).__name__} adapter; "
                             f"one layer takes adapters of one method (LoRA and DoRA are two)")
        if isinstance(module, IA3Linear) and module.is_feedforward != layer_settings[name][0]:
            raise ValueError(f"lowrank: {name}'s IA3 adapters are "
                             f"{'' if module.is_feedforward else 'not '}feed-forward")
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
        module.add_adapter(adapter_name, *layer_settings[name])
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
        # A partial of a module-level function pickles (torch.save(model), deepcopy); a bound
        # method would be pickled as getattr(model, "_save_pretrained"), which the model lacks.
        model.save_pretrained = functools.partial(_save_pretrained, model)
        _teach_trainer_to_resume()


def _detach_from_transformers(model):
    if isinstance(model, PreTrainedModel):
        del model._hf_peft_config_loaded  # back to the class's False
        del model.save_pretrained


def _save_pretrained(model, save_directory, state_dict=None, is_main_process=True, **kwargs):
    """``save_pretrained`` of a patched transformers model: the active adapter, PEFT's format.
    A ``state_dict`` (Trainer passes the one DeepSpeed or FSDP gathered) is where the weights are
    taken from, as PEFT does. Without one, a sharded adapter is gathered by a collective save
    that every process joins, whatever its ``is_main_process`` (rank 0 writes)."""
    from lowrank.adapters import adapter_is_partitioned, save_adapter  # they build on this module

    name = model.lowrank_state.active
    if is_main_process or (state_dict is None and adapter_is_partitioned(model, name)):
        save_adapter(model, save_directory, adapter_name=name, state_dict=state_dict)


def _teach_trainer_to_resume():
    """Trainer resumes from (and loads the best) adapter-only checkpoint of a ``PeftModel`` alone
    (it tests isinstance); any other model's checkpoint must hold the full weights ("Can't find
    a checkpoint index"). Wrap its two checkpoint loaders, once, so that for a model patched here
    they copy the checkpoint's adapter into the active adapter; other models, and DeepSpeed / FSDP
    runs, which load through their own engines, go to the originals."""
    from transformers import Trainer

    if getattr(Trainer._load_from_checkpoint, "lowrank_wrapped", False):
        return
    from lowrank.adapters import WEIGHTS_NAME, restore_adapter_weights

    def restored(trainer, model, checkpoint):
        if (getattr(model, "lowrank_state", None) is None or trainer.is_deepspeed_enabled
                or trainer.is_fsdp_enabled
                or not os.path.isfile(os.path.join(checkpoint, WEIGHTS_NAME))):
            return False
        restore_adapter_weights(model, checkpoint, model.lowrank_state.active)
        return True

    resume, best = Trainer._load_from_checkpoint, Trainer._load_best_model

    @functools.wraps(resume)
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not restored(self, self.model if model is None else model, resume_from_checkpoint):
            resume(self, resume_from_checkpoint, model)

    @functools.wraps(best)
    def _load_best_model(self):
        if not restored(self, self.model, self.state.best_model_checkpoint):
            best(self)

    _load_from_checkpoint.lowrank_wrapped = True
    Trainer._load_from_checkpoint = _load_from_checkpoint
    Trainer._load_best_model = _load_best_model
    _teach_deepspeed_resume()


def _teach_deepspeed_resume():
    """Under DeepSpeed, Trainer resumes through the engine's own checkpoint, loading the module
    strictly unless the model is a PeftModel. A 4-bit base's state dict holds bitsandbytes' quant
    state entries (``...weight.absmax``, ...), which Linear4bit writes but does not read back, so
    a strict load of a patched 4-bit model fails ("Unexpected key(s)"); load it as Trainer loads a
    PeftModel's: the frozen base comes from ``from_pretrained``, the adapter and optimizer from the
    checkpoint."""
    import transformers.trainer as trainer_module

    load = trainer_module.deepspeed_load_checkpoint

    @functools.wraps(load)
    def deepspeed_load_checkpoint(engine, checkpoint_path, load_module_strict=True):
        if getattr(engine.module, "lowrank_state", None) is not None:
            load_module_strict = False
        return load(engine, checkpoint_path, load_module_strict=load_module_strict)

    trainer_module.deepspeed_load_checkpoint = deepspeed_load_checkpoint


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


def _ia3_targets(model, target_modules, feedforward_modules):
    """(target_modules, feedforward_modules) for IA3: the architecture's defaults where None."""
    if target_modules is not None and feedforward_modules is not None:
        return target_modules, feedforward_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in IA3_DEFAULTS:
        raise ValueError(f"lowrank.patch_model: no IA3 defaults for model type {model_type!r} (known: "
                         f"{sorted(IA3_DEFAULTS)}); pass target_modules and feedforward_modules "
                         "([] for none)")
    default_targets, default_feedforward = IA3_DEFAULTS[model_type]
    return (default_targets if target_modules is None else target_modules,
            default_feedforward if feedforward_modules is None else feedforward_modules)


def _feedforward_paths(names, feedforward_modules):
    """The paths among ``names`` that ``feedforward_modules`` (suffixes or a regex) selects; a
    suffix that selects none of them is an error (feed-forward layers must be targets)."""
    if not isinstance(feedforward_modules, (str, list, tuple, set)):
        raise TypeError("lowrank.patch_model: feedforward_modules must be a list of module name "
                        f"suffixes or a regular expression, got {feedforward_modules!r}")
    chosen = [n for n in names if _matches(feedforward_modules, n)]
    if not isinstance(feedforward_modules, str):
        unmatched = [t for t in feedforward_modules if not any(_matches([t], n) for n in names)]
        if unmatched:
            raise ValueError(f"lowrank.patch_model: feedforward_modules {unmatched} match no "
                             "targeted module")
    return chosen


def patch_model(model, rank=None, alpha=None, target_modules=None, method="lora", dropout=0.0,
                use_rslora=False, adapter_name="default", layers=None, feedforward_modules=None,
                use_dora=False):
    """Add an adapter to ``model``'s linear layers, in place; return the model.

    - ``method="lora"``: ``rank`` (default 16), ``alpha`` (default 2 * rank); scaling alpha / rank,
      or alpha / sqrt(rank) with ``use_rslora``; ``dropout`` on the LoRA branch while training.
      ``use_dora=True``: DoRA (PEFT's ``use_dora``), each adapter with a magnitude vector m,
      initialized as PEFT does, run as ``lowrank.ops.dora_linear``.
    - ``method="ia3"``: a vector l per layer (ones at first); ``feedforward_modules`` names the
      targets whose input l scales (the others scale their output). rank, alpha, dropout and
      use_rslora are LoRA's and refused here.
    - ``target_modules``: LoRA's default (None or "all-linear") is every nn.Linear / Linear4bit /
      Conv1D except the output head; IA3's is per architecture (attention k/v or q/v and the MLP
      down projection, as feed-forward). Else a list of module name suffixes (``["q_proj",
      "v_proj"]``) or a regular expression matched against whole module paths. ``layers``: an int
      or list of block indices.
    - Base weights are frozen; the active adapter's weights train. A second call with another
      ``adapter_name`` adds an adapter; ``lowrank.set_adapter`` picks the one that runs.
    """
    if method not in LAYER_CLASSES:
        raise ValueError(f"lowrank.patch_model: method must be one of {sorted(LAYER_CLASSES)}, got "
                         f"{method!r}")
    if method == "ia3":
        given = [k for k, v in dict(rank=rank, alpha=alpha, dropout=dropout or None,
                                    use_rslora=use_rslora or None,
                                    use_dora=use_dora or None).items() if v is not None]
        if given:
            raise ValueError(f"lowrank.patch_model: {given} are LoRA settings; IA3 has none")
        target_modules, feedforward_modules = _ia3_targets(model, target_modules,
                                                           feedforward_modules)
        names = resolve_targets(model, target_modules, layers)
        feedforward = _feedforward_paths(names, feedforward_modules)
        config = AdapterConfig(method=method, modules=names, target_modules=target_modules,
                               layers=layers, feedforward_modules=feedforward)
        add_adapter(model, adapter_name, config, {n: (n in feedforward,) for n in names})
        return model
    if feedforward_modules is not None:
        raise ValueError("lowrank.patch_model: feedforward_modules is an IA3 setting")
    rank = 16 if rank is None else rank
    _check_lora_args(rank, alpha, dropout, use_rslora)
    if not isinstance(use_dora, bool):
        raise TypeError(f"lowrank.patch_model: use_dora must be a bool, got {use_dora!r}")
    alpha = 2 * rank if alpha is None else alpha
    names = resolve_targets(model, target_modules, layers)
    config = AdapterConfig(method=method, modules=names, rank=rank, alpha=alpha,
                           dropout=float(dropout), use_rslora=use_rslora, use_dora=use_dora,
                           target_modules=target_modules, layers=layers)
    add_adapter(model, adapter_name, config,
                {name: (rank, alpha, float(dropout), use_rslora) for name in names})
    return model


def unpatch(model, merge=False):
    """Put back the original modules (the same objects) and ``requires_grad`` flags; return the
    model. Merged adapters are unmerged first, unless ``merge``: then the active adapter is merged
    too (if it is not yet) and the base layers keep the merged weights (NF4: requantized)."""
    state = patch_state(model, "unpatch")
    layers = adapter_layers(model)
    if merge:
        _warn_if_tied(model, _merging_active(layers), "unpatch")
        for layer in layers.values():
            name = layer.active_adapter
            if name in layer.adapter_names and name not in layer.merged_adapters:
                layer.merge(name)
    else:
        _refuse_zeros_in_l(layers, lambda layer: layer.merged_adapters, "unpatch")
        for layer in layers.values():
            layer.unmerge()
    for name, layer in layers.items():
        _replace(model, name, layer.release_base_layer())
    _restore(model, state)
    return model


def _restore(model, state):
    """Give back the flags and hooks patching changed, once no patched layer is left."""
    for name, param in model.named_parameters():
        param.requires_grad_(state.requires_grad.get(name, False))
    del model.lowrank_state
    _detach_from_transformers(model)


def _warn_if_tied(model, layers, what):
    """Warn, as PEFT does, when a merge writes into a weight tied to the input embeddings (an
    ``lm_head`` targeted in a model with ``tie_word_embeddings``): the embeddings change too."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    tied = [path for path, layer in layers.items()
            if weight is not None and layer.base_layer.weight is weight]
    if tied:
        warnings.warn(f"lowrank.{what}: {tied} share their weight with the input embeddings (tied "
                      "word embeddings): merging writes the adapter into the embeddings too, so "
                      "the merged model no longer computes what the adapted one did. Untie them "
                      "first (load with tie_word_embeddings=False and copy the embedding weight "
                      "into the head), or keep the adapter unmerged", stacklevel=3)


def _merging_active(layers):
    """The layers among ``layers`` ({path: layer}) where merging the active adapter writes to the
    weight: it is there and not merged yet."""
    return {path: layer for path, layer in layers.items()
            if layer.active_adapter in layer.adapter_names
            and layer.active_adapter not in layer.merged_adapters}


def merge(model, adapter_name=None):
    """Write an adapter (default: the active one) into the base weights of every layer that has
    it; those layers then run their base weights alone, as PEFT's do: another active adapter that
    is not merged stops running there (a warning says so) and still runs in other layers. The
    active adapter does not change. Dense weights change in place; NF4 weights are requantized (a
    second rounding) and their original bytes kept for ``unmerge``."""
    state = patch_state(model, "merge")
    adapter_name = state.active if adapter_name is None else adapter_name
    check_adapter(state, adapter_name, "merge")
    layers = {path: layer for path, layer in adapter_layers(model).items()
              if adapter_name in layer.adapter_names}
    if any(adapter_name in layer.merged_adapters for layer in layers.values()):
        raise ValueError(f"lowrank.merge: adapter {adapter_name!r} is already merged")
    _refuse_zeros_in_l(adapter_layers(model), lambda layer: [adapter_name] if adapter_name in
                       layer.adapter_names else [], "merge")
    _warn_if_tied(model, layers, "merge")
    silenced = sum(layer.runs_adapter() not in (None, adapter_name) for layer in layers.values())
    if silenced:
        warnings.warn(f"lowrank.merge: merged {adapter_name!r} while {state.active!r} is active: a "
                      f"layer with a merged adapter runs its base weights alone (as in PEFT), so "
                      f"{state.active!r} no longer runs in the {silenced} layers that have both "
                      f"(until lowrank.unmerge)", stacklevel=2)
    for layer in layers.values():
        layer.merge(adapter_name)


def unmerge(model):
    """Take every merged adapter out of the base weights again: NF4 weights get their original
    bytes back exactly; dense ones have the adapters subtracted (LoRA) or divided out (IA3), equal
    to the originals up to the rounding of the weight's dtype."""
    patch_state(model, "unmerge")
    layers = adapter_layers(model)
    if not any(layer.merged_adapters for layer in layers.values()):
        raise ValueError("lowrank.unmerge: no adapter is merged")
    _refuse_zeros_in_l(layers, lambda layer: layer.merged_adapters, "unmerge")
    for layer in layers.values():
        layer.unmerge()


def _refuse_zeros_in_l(layers, adapters, what):
    """Unmerging IA3 from a dense weight divides it by l, so a zero in l, whose rows (or columns)
    the merge multiplied to zero, cannot be divided out: it would write inf / NaN into the frozen
    base, where ``unpatch`` cannot undo it. Checked on every layer before any weight is written,
    at merge time too (PEFT instead divides by l + 1e-8 and leaves those weights zero). NF4
    layers are exempt: their unmerge puts the original bytes back. ``adapters``: layer -> the
    adapter names to check."""
    for path, layer in layers.items():
        if not isinstance(layer, IA3Linear) or layer.kind == "nf4":
            continue
        for name in adapters(layer):
            zeros = int((layer.ia3_l[name] == 0).sum())
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


MERGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, "nf4")


def merge_and_unload(model, dtype=None):
    """Merge the active adapter and put plain layers back; return the model (no longer patched).

    Dense layers keep their module and dtype, with the merged weight. NF4 layers become
    ``nn.Linear`` in ``dtype``, merged losslessly from the original packed weight (one rounding to
    ``dtype``). By default that is the dtype the weight was loaded in (its quant state's dtype):
    the dtype the rest of the model runs in, 16-bit for a model loaded with
    ``dtype=torch.bfloat16`` as QLoRA models are. ``dtype="nf4"`` keeps them Linear4bit,
    requantized. A model left without 4-bit layers drops its quantization config."""
    state = patch_state(model, "merge_and_unload")
    if dtype not in (None, *MERGE_DTYPES):
        raise TypeError(f"lowrank.merge_and_unload: dtype must be None or one of {MERGE_DTYPES}, "
                        f"got {dtype!r}")
    layers = adapter_layers(model)
    if dtype != "nf4" and any(layer.kind == "nf4" and layer.merged_adapters
                              for layer in layers.values()):
        raise ValueError("lowrank.merge_and_unload: adapters are merged into NF4 weights (lossy); "
                         "unmerge first, so that the dense merge starts from the original weights")
    _warn_if_tied(model, _merging_active(layers), "merge_and_unload")
    plain = {}
    for path, layer in layers.items():
        name = layer.active_adapter
        name = name if name in layer.adapter_names and name not in layer.merged_adapters else None
        layer_dtype = dtype
        if layer.kind == "nf4" and dtype is None:
            layer_dtype = nf4_operands(layer.base_layer)[1].dtype  # as loaded, even if repacked
        plain[path] = layer.merged_module(name, layer_dtype)
    for path, module in plain.items():
        _replace(model, path, module)
    _restore(model, state)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not any(type(m).__name__ == "Linear4bit" for m in model.modules()):
        quantizer.remove_quantization_config(model)
    return model


def set_adapter(model, adapter_name):
    """Make ``adapter_name`` the adapter that runs (and trains) in every layer that has it. Merged
    adapters are unmerged first, with a warning, as PEFT does: a layer with a merged adapter runs
    its base weights alone, so the new adapter would not run there."""
    state = patch_state(model, "set_adapter")
    check_adapter(state, adapter_name, "set_adapter")
    layers = adapter_layers(model).values()
    merged = sorted({name for layer in layers for name in layer.merged_adapters})
    if merged:
        warnings.warn(f"lowrank.set_adapter: adapters {merged} are merged; unmerging them first "
                      "(as PEFT does)", stacklevel=2)
        for layer in layers:
            layer.unmerge()
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
