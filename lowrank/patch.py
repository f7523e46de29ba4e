"""``lowrank.patch_model`` and the adapter lifecycle: the patcher, its revert, several adapters.

Patching replaces each targeted linear layer of a model, in place, with its method's layer
(``lowrank/methods``) that keeps the original as ``base_layer``. What was patched, the adapters' settings, and the
``requires_grad`` flags the model had before are kept on the model (``model.lowrank_state``), so
that ``unpatch`` restores the very same module objects and flags.
"""

import contextlib
import warnings

import torch

from lowrank import blocks, trainer_hooks
from lowrank.adapters import copy_weights, read_adapter
from lowrank._quant_state import FLOAT_DTYPES
from lowrank.base_layers import base_layer_class
from lowrank.methods import METHODS
from lowrank.adapter_layer import AdapterLayer, adapter_layers
from lowrank.state import (PatchState, activate, check_adapter, mark_trainable, patch_state,
                           replace_module)


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
    targets = {}
    for name in layer_settings:
        module = model.get_submodule(name)
        layer_class = METHODS[config.method].layer_class(module)  # LoRA: LoraExperts for experts
        if isinstance(module, AdapterLayer) and not isinstance(module, layer_class):
            raise ValueError(f"lowrank: {name} already carries a {type(module).__name__} adapter; "
                             f"one layer takes adapters of one method")
        if isinstance(module, AdapterLayer):
            module.check_settings(name, layer_settings[name])
        else:
            dtype = base_layer_class(module).compute_dtype(module)
            if dtype is not None and dtype not in FLOAT_DTYPES:
                raise TypeError(f"lowrank: layer {name!r} computes in {dtype}, which lowrank's "
                                f"kernels do not take (they take "
                                f"{', '.join(map(str, FLOAT_DTYPES))}); cast the model first, or "
                                "use PEFT (lowrank.patch_peft_model leaves such layers to PEFT's "
                                "forward)")
        targets[name] = module, layer_class
    if state is None:
        state = PatchState(requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
        model.lowrank_state = state
        trainer_hooks.attach(model)
    for name, (module, layer_class) in targets.items():
        if not isinstance(module, AdapterLayer):
            module = layer_class(module).train(module.training)  # new modules start in train mode
            replace_module(model, name, module)
        module.add_adapter(adapter_name, *layer_settings[name])
        module.active_adapter = state.active
    state.adapters[adapter_name] = config
    if state.active is None:
        activate(model, state, adapter_name)
    else:
        mark_trainable(model, state)


def patch_model(model, rank=None, alpha=None, target_modules=None, method="lora", dropout=0.0,
                use_rslora=False, adapter_name="default", layers=None, feedforward_modules=None,
                fuse_blocks=True, use_dora=False):
    """Add an adapter to ``model``'s linear layers, in place; return the model.

    - ``method="lora"``: ``rank`` (default 16), ``alpha`` (default 2 * rank); scaling alpha / rank,
      or alpha / sqrt(rank) with ``use_rslora``; ``dropout`` on the LoRA branch while training.
      ``use_dora=True``: DoRA (PEFT's ``use_dora``), each adapter with a magnitude vector m,
      initialized as PEFT does, run as ``lowrank.ops.dora_linear``.
    - ``method="ia3"``: a vector l per layer (ones at first); ``feedforward_modules`` names the
      targets whose input l scales (the others scale their output). rank, alpha, dropout and
      use_rslora, use_dora are LoRA's and refused here.
    - ``target_modules``: LoRA's default (None or "all-linear") is every nn.Linear / Linear4bit /
      Conv1D except the output head; IA3's is per architecture (attention k/v or q/v and the MLP
      down projection, as feed-forward). Else a list of module name suffixes (``["q_proj",
      "v_proj"]``) or a regular expression matched against whole module paths. ``layers``: an int
      or list of block indices.
    - Base weights are frozen; the active adapter's weights train. A second call with another
      ``adapter_name`` adds an adapter; ``lowrank.set_adapter`` picks the one that runs.
    - ``fuse_blocks``: run whole blocks over the patched layers as one fused op where a fusion of
      ``lowrank.blocks`` serves them (today the gated MLP and attention's q, k and v of
      Llama-style models); names, state dict, saving and merging do not change, and a call a
      fusion cannot serve runs the block's own forward.
    """
    if method not in METHODS:
        raise ValueError(f"lowrank.patch_model: method must be one of {sorted(METHODS)}, got "
                         f"{method!r}")
    config, layer_settings = METHODS[method].patch_settings(
        model, rank, alpha, dropout, use_rslora, use_dora, target_modules, layers,
        feedforward_modules)
    add_adapter(model, adapter_name, config, layer_settings)
    if fuse_blocks:
        blocks.install(model, model.lowrank_state)
    return model


def load_adapter(model, path, adapter_name="default", fuse_blocks=True):
    """Load a LoRA or IA3 adapter saved by PEFT (or ``save_adapter``) onto ``model`` (plain,
    4-bit, or already patched with other adapters) under ``adapter_name``; return the model.

    The layers to patch are the ones the weights name. LoRA's rank and alpha follow the config's
    ``r`` / ``lora_alpha`` and its ``rank_pattern`` / ``alpha_pattern`` as PEFT reads them; IA3's
    feed-forward layers follow ``feedforward_modules``. ``fuse_blocks``: as in ``patch_model``."""
    config, layer_settings, weights = read_adapter(model, path)
    add_adapter(model, adapter_name, config, layer_settings)
    copy_weights(model, adapter_name, weights)
    if fuse_blocks:
        blocks.install(model, model.lowrank_state)
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
        _check_unmerge(layers, lambda layer: layer.merged_adapters, "unpatch")
        for layer in layers.values():
            layer.unmerge()
    for name, layer in layers.items():
        replace_module(model, name, layer.release_base_layer())
    _restore(model, state)
    return model


def _restore(model, state):
    """Give back the flags, hooks and block forwards patching changed, once no patched layer is
    left."""
    blocks.uninstall(model, state)
    for name, param in model.named_parameters():
        param.requires_grad_(state.requires_grad.get(name, False))
    del model.lowrank_state
    trainer_hooks.detach(model)


def _warn_if_tied(model, layers, what):
    """Warn, as PEFT does, when a merge writes into a weight tied to the input embeddings (an
    ``lm_head`` targeted in a model with ``tie_word_embeddings``): the embeddings change too."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    tied = [path for path, layer in layers.items()
            if weight is not None and getattr(layer.base_layer, "weight", None) is weight]
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
    _check_unmerge(adapter_layers(model), lambda layer: [adapter_name] if adapter_name in
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
    _check_unmerge(layers, lambda layer: layer.merged_adapters, "unmerge")
    for layer in layers.values():
        layer.unmerge()


def _check_unmerge(layers, adapters, what):
    """Every layer's refusal of unmerging (``AdapterLayer.check_unmerge``; IA3: zeros in l),
    before any weight is written; at merge time too, as what is merged must unmerge. ``adapters``:
    layer -> the adapter names to check."""
    for path, layer in layers.items():
        layer.check_unmerge(path, adapters(layer), what)


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
    if dtype != "nf4" and any(layer.base.merge_keeps_original and layer.merged_adapters
                              for layer in layers.values()):
        raise ValueError("lowrank.merge_and_unload: adapters are merged into NF4 weights (lossy); "
                         "unmerge first, so that the dense merge starts from the original weights")
    _warn_if_tied(model, _merging_active(layers), "merge_and_unload")
    plain = {}
    for path, layer in layers.items():
        name = layer.active_adapter
        name = name if name in layer.adapter_names and name not in layer.merged_adapters else None
        plain[path] = layer.merged_module(name, layer.base.unloaded_dtype(layer.base_layer, dtype))
    for path, module in plain.items():
        replace_module(model, path, module)
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
    activate(model, state, adapter_name)


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
                replace_module(model, name, layer.release_base_layer())
    blocks.prune(model, state)
    del state.adapters[adapter_name]
    if state.active == adapter_name:
        successor = next(iter(state.adapters))
        warnings.warn(f"lowrank.delete_adapter: deleted the active adapter {adapter_name!r}; "
                      f"{successor!r} is active now", stacklevel=2)
        activate(model, state, successor)


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
