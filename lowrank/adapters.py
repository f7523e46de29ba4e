"""Adapters saved and loaded in PEFT's format, both ways.

A directory with ``adapter_config.json`` (PEFT's ``LoraConfig`` fields) and
``adapter_model.safetensors`` whose keys are PEFT's: ``base_model.model.<module path>.lora_A.weight``
(r x in) and ``...lora_B.weight`` (out x r), the adapter's name left out. ``peft.PeftModel.from_pretrained``
loads what ``save_adapter`` writes, and ``load_adapter`` loads what PEFT's ``save_pretrained`` writes.
"""

import json
import os
import re
from collections import Counter

import torch
from safetensors.torch import load_file, save_file

from lowrank.modules import layer_features, layer_kind
from lowrank.patch import (AdapterConfig, adapter_layers, add_adapter, check_adapter,
                           modules_outside_adapters, patch_state)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"(.+)\.(lora_A|lora_B)\.weight")
# PEFT features an adapter config can ask for that we do not implement yet: loading such an
# adapter without them would give other outputs than PEFT's, so they are refused by name.
UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)",
    "modules_to_save": "modules_to_save",
    "layer_replication": "layer_replication",
    "lora_bias": "lora_bias",
    "use_qalora": "QA-LoRA (use_qalora)",
    "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable_token_indices",
    "megatron_config": "megatron_config",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
    "arrow_config": "arrow_config",
}


def _pattern_value(pattern, default, module):
    """A rank_pattern / alpha_pattern lookup, matched as PEFT matches it (first key whose regex
    matches the end of the module path)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _target_modules(model, paths):
    """The leaf names of ``paths`` when, as PEFT suffixes, they select exactly ``paths`` on the
    base model; otherwise the full paths (which select exactly themselves)."""
    leaves = sorted({p.rpartition(".")[2] for p in paths})
    selected = {name for name, _ in modules_outside_adapters(model)
                if name.rpartition(".")[2] in leaves}
    return leaves if selected == set(paths) else sorted(paths)


def save_adapter(model, path, adapter_name="default"):
    """Write adapter ``adapter_name`` of a patched model to directory ``path`` in PEFT's format."""
    state = patch_state(model, "save_adapter")
    check_adapter(state, adapter_name, "save_adapter")
    config = state.adapters[adapter_name]
    layers = {p: layer for p, layer in adapter_layers(model).items()
              if adapter_name in layer.adapter_names}
    ranks = {p: layer.r[adapter_name] for p, layer in layers.items()}
    alphas = {p: layer.lora_alpha[adapter_name] for p, layer in layers.items()}
    # The most common rank / alpha is the default; layers that differ go into the patterns.
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    tensors = {}
    for p, layer in layers.items():
        for attr in ("lora_A", "lora_B"):
            tensors[f"{KEY_PREFIX}{p}.{attr}.weight"] = (
                getattr(layer, attr)[adapter_name].weight.detach().cpu().contiguous())
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "revision": None,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "target_modules": _target_modules(model, list(layers)),
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {re.escape(p): r for p, r in ranks.items() if r != rank},
        "alpha_pattern": {re.escape(p): a for p, a in alphas.items() if a != alpha},
        # PEFT's flag for GPT-2's Conv1D, whose weight is stored (in, out).
        "fan_in_fan_out": any(layer.kind == "conv1d" for layer in layers.values()),
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "use_dora": False,
        "inference_mode": True,
    }
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(peft_config, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})


def _read_peft_adapter(path):
    config_path, weights_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"lowrank.load_adapter: no {CONFIG_NAME} in {path}")
    if not os.path.isfile(weights_path):
        other = " (only safetensors weights are read; found adapter_model.bin)" if os.path.isfile(
            os.path.join(path, "adapter_model.bin")) else ""
        raise FileNotFoundError(f"lowrank.load_adapter: no {WEIGHTS_NAME} in {path}{other}")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"lowrank.load_adapter: peft_type {config.get('peft_type')!r} is not "
                         "supported; LORA is")
    refused = [label for key, label in UNSUPPORTED.items() if config.get(key)]
    if config.get("bias", "none") != "none":
        refused.append(f"bias={config['bias']!r}")
    if refused:
        raise ValueError(f"lowrank.load_adapter: the adapter in {path} uses PEFT features lowrank "
                         f"does not support yet: {', '.join(refused)}")
    return config, load_file(weights_path)


def load_adapter(model, path, adapter_name="default"):
    """Load a LoRA adapter saved by PEFT (or ``save_adapter``) onto ``model`` (plain, 4-bit, or
    already patched with other adapters) under ``adapter_name``; return the model.

    The layers to patch are the ones the weights name; rank and alpha follow the config's ``r`` /
    ``lora_alpha`` and its ``rank_pattern`` / ``alpha_pattern`` as PEFT reads them."""
    config, tensors = _read_peft_adapter(path)
    weights = {}
    for key, tensor in tensors.items():
        match = LORA_KEY.fullmatch(key[len(KEY_PREFIX):]) if key.startswith(KEY_PREFIX) else None
        if match is None:
            raise ValueError(f"lowrank.load_adapter: {path} holds weight {key!r}, which is not a "
                             "LoRA A or B of a linear layer")
        weights.setdefault(match.group(1), {})[match.group(2)] = tensor
    modules = dict(modules_outside_adapters(model))
    settings = {}
    for module_path, pair in weights.items():
        if module_path not in modules:
            raise ValueError(f"lowrank.load_adapter: the adapter has weights for {module_path}, "
                             "which this model does not have")
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"lowrank.load_adapter: {module_path} has only {list(pair)}")
        module = modules[module_path]
        module = getattr(module, "base_layer", module)
        in_features, out_features = layer_features(module, layer_kind(module))
        rank = _pattern_value(config.get("rank_pattern") or {}, config["r"], module_path)
        if tuple(pair["lora_A"].shape) != (rank, in_features) or \
                tuple(pair["lora_B"].shape) != (out_features, rank):
            raise ValueError(
                f"lowrank.load_adapter: {module_path} needs lora_A ({rank}, {in_features}) and lora_B "
                f"({out_features}, {rank}) for rank {rank}, got {tuple(pair['lora_A'].shape)} and "
                f"{tuple(pair['lora_B'].shape)}")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, config["lora_alpha"], module_path)
        settings[module_path] = (rank, alpha)
    if not settings:
        raise ValueError(f"lowrank.load_adapter: {path} holds no LoRA weights")
    adapter = AdapterConfig(method="lora", modules=list(settings), rank=config["r"],
                            alpha=config["lora_alpha"], dropout=float(config.get("lora_dropout", 0.0)),
                            use_rslora=bool(config.get("use_rslora", False)),
                            target_modules=config.get("target_modules"),
                            layers=config.get("layers_to_transform"))
    add_adapter(model, adapter_name, adapter, settings)
    layers = adapter_layers(model)
    with torch.no_grad():
        for module_path, pair in weights.items():
            for attr, tensor in pair.items():
                getattr(layers[module_path], attr)[adapter_name].weight.copy_(tensor)
    return model

