"""Adapters saved and loaded in PEFT's format, both ways.

A directory with ``adapter_config.json`` (PEFT's ``LoraConfig`` / ``IA3Config`` fields) and
``adapter_model.safetensors`` whose keys are PEFT's, the adapter's name left out:
``base_model.model.<module path>.lora_A.weight`` (r x in) and ``...lora_B.weight`` (out x r), or
``...ia3_l`` ((out, 1), or (1, in) for a feed-forward layer). ``peft.PeftModel.from_pretrained``
loads what ``save_adapter`` writes, and ``load_adapter`` loads what PEFT's ``save_pretrained`` writes.
"""

import contextlib
import json
import math
import os
import re
import shutil
import uuid
from collections import Counter

import torch
from safetensors.torch import load_file, save_file

from lowrank.modules import AdapterLayer, is_sharded, layer_features, layer_kind
from lowrank.patch import (AdapterConfig, adapter_layers, add_adapter, check_adapter,
                           modules_outside_adapters, patch_state)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
# DoRA's magnitude: PEFT writes ``...lora_magnitude_vector`` (its module's ``.weight`` left out) and
# reads the older ``...lora_magnitude_vector.weight`` too; so do we.
LORA_KEY = re.compile(r"(.+)\.(lora_A(?=\.weight$)|lora_B(?=\.weight$)|lora_magnitude_vector)(?:\.weight)?")
IA3_KEY = re.compile(r"(.+)\.(ia3_l)")
# PEFT features an adapter config can ask for that we do not implement yet: loading such an
# adapter without them would give other outputs than PEFT's, so they are refused by name.
UNSUPPORTED = {
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


def _common_config(model, peft_type, layers):
    return {
        "peft_type": peft_type,
        "task_type": "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "revision": None,
        "target_modules": _target_modules(model, list(layers)),
        "exclude_modules": None,
        # PEFT's flag for GPT-2's Conv1D, whose weight is stored (in, out).
        "fan_in_fan_out": any(layer.kind == "conv1d" for layer in layers.values()),
        "modules_to_save": None,
        "inference_mode": True,
    }


def _lora_contents(model, adapter_name, config, layers):
    ranks = {p: layer.r[adapter_name] for p, layer in layers.items()}
    alphas = {p: layer.lora_alpha[adapter_name] for p, layer in layers.items()}
    # The most common rank / alpha is the default; layers that differ go into the patterns.
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    # DoRA layers add lora_magnitude_vector (adapter_names_attr names what each layer holds).
    tensors = {f"{KEY_PREFIX}{p}.{attr}{'' if attr == 'lora_magnitude_vector' else '.weight'}":
               getattr(layer, attr)[adapter_name].weight
               for p, layer in layers.items() for attr in layer.adapter_names_attr}
    return tensors, {
        **_common_config(model, "LORA", layers),
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


def _feedforward_modules(layers, target_modules):
    """IA3's feedforward_modules as PEFT matches them (``path.endswith(entry)``), a subset of
    ``target_modules`` as PEFT requires: leaf names when the targets are leaf names and those
    select exactly the feed-forward layers, else the full paths."""
    feedforward = {p for p, layer in layers.items() if layer.is_feedforward}
    leaves = sorted({p.rpartition(".")[2] for p in feedforward})
    selected = {p for p in layers if any(p.endswith(leaf) for leaf in leaves)}
    if selected == feedforward and set(leaves) <= set(target_modules):
        return leaves
    return sorted(feedforward)


def _ia3_contents(model, adapter_name, layers):
    tensors = {f"{KEY_PREFIX}{p}.ia3_l": layer.ia3_l[adapter_name] for p, layer in layers.items()}
    config = _common_config(model, "IA3", layers)
    return tensors, {**config, "init_ia3_weights": True,
                     "feedforward_modules": _feedforward_modules(layers, config["target_modules"])}


def save_adapter(model, path, adapter_name="default", state_dict=None):
    """Write adapter ``adapter_name`` of a patched model to directory ``path`` in PEFT's format.

    ``state_dict``: a full state dict of the model to take the adapter's weights from instead of
    its layers, as PEFT does (what Trainer passes to ``save_pretrained`` under DeepSpeed and FSDP,
    gathered by their engines); only this process writes.

    Without one, on a model whose adapter is sharded (FSDP2's DTensors, DeepSpeed ZeRO-3's
    partitions) the save is collective: every rank calls it, the adapter alone is gathered, rank 0
    writes, and every rank returns once the files are in place or raises rank 0's error. An
    adapter that is not sharded (one process, DDP, ZeRO-1/2, FSDP2 between ``unshard`` and
    ``reshard``) is written by whichever process calls this."""
    state = patch_state(model, "save_adapter")
    check_adapter(state, adapter_name, "save_adapter")
    config = state.adapters[adapter_name]
    layers = {p: layer for p, layer in adapter_layers(model).items()
              if adapter_name in layer.adapter_names}
    if config.method == "lora":
        params, peft_config = _lora_contents(model, adapter_name, config, layers)
    else:
        params, peft_config = _ia3_contents(model, adapter_name, layers)
    shapes = {key: _full_shape(param) for key, param in params.items()}
    if state_dict is not None:
        tensors = _from_state_dict(model, params, state_dict)
    elif any(is_partitioned(param) for param in params.values()):
        _save_gathered(path, peft_config, params, shapes)
        return
    else:
        tensors = params
    _write_adapter_files(path, peft_config, _complete(tensors, shapes))


def _adapter_weights(model, adapter_name):
    """The weights of adapter ``adapter_name`` in every layer that has it."""
    for layer in adapter_layers(model).values():
        if adapter_name in layer.adapter_names:
            for attr in layer.adapter_names_attr:
                held = getattr(layer, attr)[adapter_name]
                yield held if attr == "ia3_l" else held.weight


def adapter_is_partitioned(model, adapter_name):
    """True when adapter ``adapter_name`` is sharded (see ``is_partitioned``): saving it is then
    collective."""
    return any(is_partitioned(param) for param in _adapter_weights(model, adapter_name))


def is_partitioned(param):
    """True for an adapter weight sharded by FSDP2 (a DTensor) or partitioned by DeepSpeed ZeRO-3
    and not gathered now (then its data is an empty tensor, its shape in ``ds_shape``)."""
    if is_sharded(param):
        return True
    return hasattr(param, "ds_id") and param.ds_status.name != "AVAILABLE"


def _full_shape(param):
    """The shape of the whole weight: a DTensor's shape is the global one; a ZeRO-3 parameter keeps
    it in ``ds_shape``."""
    return tuple(getattr(param, "ds_shape", param.shape))


def _from_state_dict(model, params, state_dict):
    """{PEFT key: tensor} taken from a full state dict of ``model``, keyed as the model names its
    parameters."""
    names = {id(param): name for name, param in model.named_parameters()}
    # Under ZeRO-3 named_parameters still lists every parameter; under FSDP2 too (DTensors).
    wanted = {key: names[id(param)] for key, param in params.items()}
    missing = [name for name in wanted.values() if name not in state_dict]
    if missing:
        empty = " (it is empty)" if not state_dict else ""
        raise ValueError(
            f"lowrank.save_adapter: the state_dict passed{empty} lacks {len(missing)} of the "
            f"adapter's {len(wanted)} weights, e.g. {missing[:2]}. Under DeepSpeed ZeRO-3, Trainer "
            "passes an empty one unless the config sets "
            '"stage3_gather_16bit_weights_on_model_save": true; set it')
    return {key: state_dict[name] for key, name in wanted.items()}


def _complete(tensors, shapes):
    """The tensors on the CPU, after checking that each is a whole weight: a shard or an
    ungathered ZeRO-3 partition (an empty tensor) must not be written as the adapter."""
    for key, tensor in tensors.items():
        if is_sharded(tensor):
            raise ValueError(f"lowrank.save_adapter: {key} is a DTensor (an FSDP2 shard); pass a "
                             "full state dict, or call save_adapter on every rank without one")
        if tuple(tensor.shape) != shapes[key]:
            raise ValueError(
                f"lowrank.save_adapter: {key} has shape {tuple(tensor.shape)}, not the adapter's "
                f"{shapes[key]}: it is a partition (DeepSpeed ZeRO-3 leaves empty tensors outside "
                "a gather), not the whole weight; nothing was written. Call save_adapter on every "
                "rank (it gathers the adapter), or pass a gathered state dict")
    return {key: tensor.detach().cpu().contiguous() for key, tensor in tensors.items()}


def _save_gathered(path, peft_config, params, shapes):
    """The collective save of a sharded adapter: gather, write on rank 0, share its outcome."""
    import torch.distributed as dist

    rank = dist.get_rank()
    with _gathered(params) as whole:
        # Copied out before the context partitions the weights again (freeing their storage).
        tensors = {key: t.detach().to("cpu", copy=True) for key, t in whole.items()} if rank == 0 \
            else None
    error = [None]
    if rank == 0:
        try:
            _write_adapter_files(path, peft_config, _complete(tensors, shapes))
        except Exception as exc:
            error = [f"{type(exc).__name__}: {exc}"]
            raise
        finally:
            # The other ranks wait here for rank 0: they return when the files are in place, and
            # raise when rank 0 failed instead of hanging at their next collective.
            dist.broadcast_object_list(error, src=0)
    else:
        dist.broadcast_object_list(error, src=0)
        if error[0] is not None:
            raise RuntimeError(f"lowrank.save_adapter: rank 0 failed to write {path}: {error[0]}")


@contextlib.contextmanager
def _gathered(params):
    """{key: whole weight} on every rank: FSDP2 shards gathered one weight at a time
    (``full_tensor``, the adapter's bytes alone, not the base's), ZeRO-3 partitions in one
    ``GatheredParameters`` (read only, so nothing is broadcast back on exit)."""
    zero3 = [param for param in params.values() if hasattr(param, "ds_id")]
    with contextlib.ExitStack() as stack:
        if zero3:
            import deepspeed

            stack.enter_context(deepspeed.zero.GatheredParameters(zero3, modifier_rank=None))
        yield {key: param.full_tensor() if is_sharded(param) else param.data
               for key, param in params.items()}


def _write_adapter_files(path, peft_config, tensors):
    """Write the two files into a new directory beside ``path``, then move them in, so that a
    failed or killed save leaves ``path`` as it was: a new ``path`` is that directory renamed (one
    step); in an existing one (a Trainer checkpoint, the user's own folder) only our two files
    are replaced, the old config removed first, so that an interruption between the two renames
    leaves weights without a config (a load error) rather than a config beside other weights
    (which would load with the wrong scaling)."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"lowrank.save_adapter: {path} exists and is not a directory")
    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{name}.lowrank-saving-{uuid.uuid4().hex[:12]}")
    os.mkdir(staging)  # not mkdtemp: its mode 0o700 would stay on a renamed new directory
    try:
        with open(os.path.join(staging, CONFIG_NAME), "w") as f:
            json.dump(peft_config, f, indent=2, sort_keys=True)
        save_file(tensors, os.path.join(staging, WEIGHTS_NAME), metadata={"format": "pt"})
        for file in (CONFIG_NAME, WEIGHTS_NAME):  # on disk before any rename makes them visible
            _fsync(os.path.join(staging, file))
        if not os.path.isdir(path):
            os.rename(staging, path)
            return
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(path, CONFIG_NAME))
        os.replace(os.path.join(staging, WEIGHTS_NAME), os.path.join(path, WEIGHTS_NAME))
        os.replace(os.path.join(staging, CONFIG_NAME), os.path.join(path, CONFIG_NAME))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fsync(file):
    with open(file, "rb") as f:
        os.fsync(f.fileno())


def _read_peft_adapter(path):
    config_path, weights_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"lowrank.load_adapter: no {CONFIG_NAME} in {path}")
    if not os.path.isfile(weights_path):
        other = " (only safetensors weights are read; found adapter_model.bin)" if os.path.isfile(
            os.path.join(path, "adapter_model.bin")) else ""
        raise FileNotFoundError(f"lowrank.load_adapter: no {WEIGHTS_NAME} in {path}{other}")
    with open(config_path) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"lowrank.load_adapter: {config_path} is not valid JSON: "
                             f"{error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"lowrank.load_adapter: {config_path} holds a JSON "
                         f"{type(config).__name__}, not an object of PEFT config fields")
    if config.get("peft_type") not in ("LORA", "IA3"):
        raise ValueError(f"lowrank.load_adapter: peft_type {config.get('peft_type')!r} is not "
                         "supported; LORA and IA3 are")
    refused = [label for key, label in UNSUPPORTED.items() if config.get(key)]
    if config.get("bias", "none") != "none":
        refused.append(f"bias={config['bias']!r}")
    if refused:
        raise ValueError(f"lowrank.load_adapter: the adapter in {path} uses PEFT features lowrank "
                         f"does not support yet: {', '.join(refused)}")
    _check_config(config, config_path)
    return config, load_file(weights_path)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_regex(value):
    try:
        re.compile(value)
    except re.error:
        return False
    return True


def _is_module_names(value):
    """PEFT's target_modules / feedforward_modules: a regular expression or a list of names."""
    if isinstance(value, str):
        return _is_regex(value)
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _check_config(config, config_path):
    """Every field load_adapter reads, checked before the model is touched (a bad value found while
    patching would leave it half patched), each error naming the field."""
    def check(key, valid, expected, default=None):
        value = config.get(key, default)
        if not valid(value):
            raise ValueError(f"lowrank.load_adapter: {key!r} in {config_path} must be {expected}, "
                             f"got {value!r}")

    def check_pattern(key, valid, expected):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise ValueError(f"lowrank.load_adapter: {key!r} in {config_path} must be an object "
                             f"{{module regex: {expected}}}, got {pattern!r}")
        for regex, value in pattern.items():
            if not _is_regex(rf"(.*\.)?({regex})$"):  # as _pattern_value matches it
                raise ValueError(f"lowrank.load_adapter: {key!r} in {config_path} has key "
                                 f"{regex!r}, which is not a valid regular expression")
            if not valid(value):
                raise ValueError(f"lowrank.load_adapter: {key!r} in {config_path} maps {regex!r} "
                                 f"to {value!r}; values must be {expected}")

    check("target_modules", lambda v: v is None or _is_module_names(v),
          "null, a regular expression or a list of module names")
    if config["peft_type"] == "IA3":
        check("feedforward_modules", lambda v: v is None or _is_module_names(v),
              "null, a regular expression or a list of module names")
        return
    positive_int, positive_number = "a positive integer", "a positive finite number"
    check("r", lambda v: _is_int(v) and v >= 1, positive_int)
    check("lora_alpha", lambda v: _is_number(v) and v > 0, positive_number)
    check("lora_dropout", lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)", 0.0)
    check("use_rslora", lambda v: isinstance(v, bool), "true or false", False)
    check("use_dora", lambda v: isinstance(v, bool), "true or false", False)
    check("layers_to_transform", lambda v: v is None or _is_int(v) or (
        isinstance(v, list) and all(_is_int(i) for i in v)), "null, an integer or a list of them")
    check_pattern("rank_pattern", lambda v: _is_int(v) and v >= 1, positive_int)
    check_pattern("alpha_pattern", lambda v: _is_number(v) and v > 0, positive_number)


def _weights_by_module(path, tensors, key_pattern, what):
    """{module path: {weight name: tensor}} from PEFT's keys; any other key is an error."""
    weights = {}
    for key, tensor in tensors.items():
        match = key_pattern.fullmatch(key[len(KEY_PREFIX):]) if key.startswith(KEY_PREFIX) else None
        if match is None:
            raise ValueError(f"lowrank.load_adapter: {path} holds weight {key!r}, which is not {what}")
        weights.setdefault(match.group(1), {})[match.group(2)] = tensor
    if not weights:
        raise ValueError(f"lowrank.load_adapter: {path} holds no adapter weights")
    return weights


def _base_layer(modules, module_path):
    if module_path not in modules:
        raise ValueError(f"lowrank.load_adapter: the adapter has weights for {module_path}, "
                         "which this model does not have")
    module = modules[module_path]
    if isinstance(module, AdapterLayer):
        # Read when it was patched: under FSDP2 the base's weight is a DTensor that no longer
        # tells a Linear4bit's quant type.
        return module.in_features, module.out_features
    return layer_features(module, layer_kind(module))


def _lora_settings(config, weights, modules):
    settings = {}
    for module_path, pair in weights.items():
        in_features, out_features = _base_layer(modules, module_path)
        use_dora = bool(config.get("use_dora", False))
        expected = {"lora_A", "lora_B"} | ({"lora_magnitude_vector"} if use_dora else set())
        if set(pair) != expected:
            raise ValueError(f"lowrank.load_adapter: {module_path} has {sorted(pair)}; an adapter "
                             f"with use_dora={str(use_dora).lower()} has {sorted(expected)}")
        if use_dora and tuple(pair["lora_magnitude_vector"].shape) != (out_features,):
            raise ValueError(f"lowrank.load_adapter: {module_path} needs lora_magnitude_vector "
                             f"({out_features},), got {tuple(pair['lora_magnitude_vector'].shape)}")
        rank = _pattern_value(config.get("rank_pattern") or {}, config["r"], module_path)
        if tuple(pair["lora_A"].shape) != (rank, in_features) or \
                tuple(pair["lora_B"].shape) != (out_features, rank):
            raise ValueError(
                f"lowrank.load_adapter: {module_path} needs lora_A ({rank}, {in_features}) and lora_B "
                f"({out_features}, {rank}) for rank {rank}, got {tuple(pair['lora_A'].shape)} and "
                f"{tuple(pair['lora_B'].shape)}")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, config["lora_alpha"], module_path)
        settings[module_path] = (rank, alpha, float(config.get("lora_dropout", 0.0)),
                                 bool(config.get("use_rslora", False)))
    adapter = AdapterConfig(method="lora", modules=list(settings), rank=config["r"],
                            alpha=config["lora_alpha"], dropout=float(config.get("lora_dropout", 0.0)),
                            use_rslora=bool(config.get("use_rslora", False)),
                            use_dora=bool(config.get("use_dora", False)),
                            target_modules=config.get("target_modules"),
                            layers=config.get("layers_to_transform"))
    return adapter, settings


def _is_feedforward(feedforward_modules, module_path):
    """PEFT's test: a regex must match the whole path, a list entry its end."""
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, module_path) is not None
    return any(module_path.endswith(entry) for entry in feedforward_modules or ())


def _ia3_settings(config, weights, modules):
    settings = {}
    for module_path, vector in weights.items():
        in_features, out_features = _base_layer(modules, module_path)
        feedforward = _is_feedforward(config.get("feedforward_modules"), module_path)
        shape = (1, in_features) if feedforward else (out_features, 1)
        if tuple(vector["ia3_l"].shape) != shape:
            raise ValueError(f"lowrank.load_adapter: {module_path} is "
                             f"{'' if feedforward else 'not '}feed-forward and needs ia3_l {shape}, "
                             f"got {tuple(vector['ia3_l'].shape)}")
        settings[module_path] = (feedforward,)
    adapter = AdapterConfig(method="ia3", modules=list(settings),
                            target_modules=config.get("target_modules"),
                            feedforward_modules=[p for p, (ff,) in settings.items() if ff])
    return adapter, settings


def load_adapter(model, path, adapter_name="default"):
    """Load a LoRA or IA3 adapter saved by PEFT (or ``save_adapter``) onto ``model`` (plain,
    4-bit, or already patched with other adapters) under ``adapter_name``; return the model.

    The layers to patch are the ones the weights name. LoRA's rank and alpha follow the config's
    ``r`` / ``lora_alpha`` and its ``rank_pattern`` / ``alpha_pattern`` as PEFT reads them; IA3's
    feed-forward layers follow ``feedforward_modules``."""
    state = getattr(model, "lowrank_state", None)
    held = [param for name in (state.adapters if state else ())
            for param in _adapter_weights(model, name)]
    if any(is_sharded(param) for param in model.parameters()) or any(
            hasattr(param, "ds_id") for param in held):
        # New weights added after fully_shard / deepspeed.initialize would be neither sharded nor
        # reduced by the engine: each rank would train its own copy.
        raise ValueError("lowrank.load_adapter: the model is already sharded by FSDP2 or DeepSpeed "
                         "ZeRO-3, which would not manage a new adapter's weights; load it before "
                         "fully_shard / deepspeed.initialize / Trainer (or, to resume an adapter "
                         "the model has, use Trainer's resume_from_checkpoint)")
    config, tensors = _read_peft_adapter(path)
    modules = dict(modules_outside_adapters(model))
    if config["peft_type"] == "LORA":
        weights = _weights_by_module(path, tensors, LORA_KEY,
                                     "a LoRA A or B (or DoRA magnitude) of a linear layer")
        adapter, settings = _lora_settings(config, weights, modules)
    else:
        weights = _weights_by_module(path, tensors, IA3_KEY, "an IA3 vector of a linear layer")
        adapter, settings = _ia3_settings(config, weights, modules)
    add_adapter(model, adapter_name, adapter, settings)
    _copy_weights(model, adapter_name, weights)
    return model


def _copy_weights(model, adapter_name, weights):
    """Copy the loaded weights into the adapter. An FSDP2-sharded adapter (each rank reads the
    same file) keeps on each rank its own shard of the whole weight, without communication."""
    layers = adapter_layers(model)
    with torch.no_grad():
        for module_path, named in weights.items():
            layer = layers[module_path]
            for attr, tensor in named.items():
                held = getattr(layer, attr)[adapter_name]
                held = held if attr == "ia3_l" else held.weight
                if is_sharded(held):
                    from torch.distributed.tensor import distribute_tensor

                    tensor = distribute_tensor(tensor.to(held.device), held.device_mesh,
                                               held.placements, src_data_rank=None)
                held.copy_(tensor)


def _refuse_zero3(params, what):
    """A ZeRO-3 engine's optimizer keeps its own (fp32, partitioned) copy of the weights it
    trains: a copy into the module's weights would be undone at the next step."""
    if any(hasattr(param, "ds_id") for param in params):
        raise ValueError(
            f"lowrank.{what}: the adapter is partitioned by DeepSpeed ZeRO-3, whose optimizer "
            "keeps its own copy of the weights, so copying into them would not last. Resume "
            "through the engine's checkpoint (Trainer: resume_from_checkpoint), or load the "
            "adapter before deepspeed.initialize / Trainer")


def restore_adapter_weights(model, path, adapter_name):
    """Copy the adapter saved in ``path`` into the model's existing adapter ``adapter_name``, as
    Trainer resuming from a checkpoint needs (the adapter is already there, only its weights are
    the checkpoint's). The saved adapter must be of the same method, on the same layers, with the
    same ranks and scalings (feed-forward forms for IA3): all checked before any weight is
    copied."""
    state = patch_state(model, "restore_adapter_weights")
    check_adapter(state, adapter_name, "restore_adapter_weights")
    held = state.adapters[adapter_name]
    config, tensors = _read_peft_adapter(path)
    modules = dict(modules_outside_adapters(model))
    layers = {p: layer for p, layer in adapter_layers(model).items()
              if adapter_name in layer.adapter_names}
    if config["peft_type"] != held.method.upper():
        raise ValueError(f"lowrank: {path} holds a {config['peft_type']} adapter; adapter "
                         f"{adapter_name!r} of this model is {held.method.upper()}")
    if held.method == "lora" and bool(config.get("use_dora", False)) != held.use_dora:
        raise ValueError(f"lowrank: {path} holds an adapter with use_dora="
                         f"{bool(config.get('use_dora', False))}; adapter {adapter_name!r} of this "
                         f"model has use_dora={held.use_dora}")
    if held.method == "lora":
        weights = _weights_by_module(path, tensors, LORA_KEY,
                                     "a LoRA A or B (or DoRA magnitude) of a linear layer")
        settings = {p: (rank, alpha, rslora) for p, (rank, alpha, _, rslora) in
                    _lora_settings(config, weights, modules)[1].items()}
        ours = {p: (layer.r[adapter_name], layer.lora_alpha[adapter_name], held.use_rslora)
                for p, layer in layers.items()}
        what = "(rank, alpha, use_rslora)"
    else:
        weights = _weights_by_module(path, tensors, IA3_KEY, "an IA3 vector of a linear layer")
        settings = _ia3_settings(config, weights, modules)[1]
        ours = {p: (layer.is_feedforward,) for p, layer in layers.items()}
        what = "(feed-forward,)"
    _refuse_zero3(_adapter_weights(model, adapter_name), "restore_adapter_weights")
    if settings != ours:
        differ = sorted(p for p in settings.keys() | ours.keys() if settings.get(p) != ours.get(p))
        raise ValueError(
            f"lowrank: the adapter in {path} does not fit adapter {adapter_name!r} of this model: "
            f"{what} per layer differ at {differ[:3]}{' ...' if len(differ) > 3 else ''} (saved: "
            f"{[settings.get(p) for p in differ[:3]]}, model: {[ours.get(p) for p in differ[:3]]})")
    _copy_weights(model, adapter_name, weights)
