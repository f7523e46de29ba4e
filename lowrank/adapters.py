"""Adapters saved and loaded in PEFT's format, both ways.

A directory with ``adapter_config.json`` (PEFT's ``LoraConfig`` / ``IA3Config`` fields) and
``adapter_model.safetensors`` whose keys are PEFT's, the adapter's name left out:
``base_model.model.<module path>.lora_A.weight`` (r x in) and ``...lora_B.weight`` (out x r)
(DoRA also ``...lora_magnitude_vector``, (out,)), or ``...ia3_l`` ((out, 1), or (1, in) for a
feed-forward layer). ``peft.PeftModel.from_pretrained`` loads what ``save_adapter`` writes, and ``lowrank.load_adapter`` (``patch.py``) loads what PEFT's
``save_pretrained`` writes, read and checked here by ``read_adapter``. The files, sharded saves and
checks are here; each method's own config fields and weight keys are in its ``lowrank/methods``
module.
"""

import contextlib
import json
import os
import shutil
import uuid

import torch
from safetensors.torch import load_file, save_file

from lowrank.base_layers import is_sharded
from lowrank.methods import BY_PEFT_TYPE, METHODS
from lowrank.adapter_layer import (KEY_PREFIX, adapter_layers, is_module_names, is_regex,
                                   modules_outside_adapters)
from lowrank.state import check_adapter, patch_state

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# PEFT features an adapter config can ask for that we do not implement yet: loading such an
# adapter without them would give other outputs than PEFT's, so they are refused by name.
UNSUPPORTED = {
    "modules_to_save": "modules_to_save",
    "layer_replication": "layer_replication",
    "lora_bias": "lora_bias",
    "use_qalora": "QA-LoRA (use_qalora)",
    "trainable_token_indices": "trainable_token_indices",
    "megatron_config": "megatron_config",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
    "arrow_config": "arrow_config",
}


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
    params, peft_config = METHODS[config.method].to_peft(model, adapter_name, config, layers)
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
            yield from layer.adapter_weights(adapter_name).values()


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
    (which would load with the wrong scaling). Processes saving to the same new ``path`` at once
    each leave a whole adapter: the first rename makes the directory, the others replace its
    files."""
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
            try:
                os.rename(staging, path)
                return
            except OSError:
                # Another process made ``path`` since the check (every rank saving the same
                # unsharded adapter, as the DeepSpeed example does): replace the files in it.
                if not os.path.isdir(path):
                    raise
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
    if config.get("peft_type") not in BY_PEFT_TYPE:
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
            if not is_regex(rf"(.*\.)?({regex})$"):  # as lora.pattern_value matches it
                raise ValueError(f"lowrank.load_adapter: {key!r} in {config_path} has key "
                                 f"{regex!r}, which is not a valid regular expression")
            if not valid(value):
                raise ValueError(f"lowrank.load_adapter: {key!r} in {config_path} maps {regex!r} "
                                 f"to {value!r}; values must be {expected}")

    check("target_modules", lambda v: v is None or is_module_names(v),
          "null, a regular expression or a list of module names")
    BY_PEFT_TYPE[config["peft_type"]].check_peft_config(config, check, check_pattern)


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


def read_adapter(model, path):
    """(AdapterConfig, {module path: arguments of the layer's ``add_adapter`` after the name},
    {module path: {weight name: tensor}}) of the adapter PEFT (or ``save_adapter``) saved in
    ``path``, for ``model``, all checked before the model is touched (``lowrank.load_adapter``
    then adds it). The layers are the ones the weights name; the settings are read as PEFT reads
    them (see each method's ``from_peft``)."""
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
    method = BY_PEFT_TYPE[config["peft_type"]]
    weights = _weights_by_module(path, tensors, method.KEY, method.KEY_WHAT)
    adapter, settings = method.from_peft(config, weights, dict(modules_outside_adapters(model)))
    return adapter, settings, weights


def copy_weights(model, adapter_name, weights):
    """Copy the loaded weights into the adapter. An FSDP2-sharded adapter (each rank reads the
    same file) keeps on each rank its own shard of the whole weight, without communication."""
    layers = adapter_layers(model)
    with torch.no_grad():
        for module_path, named in weights.items():
            layer = layers[module_path]
            for attr, tensor in named.items():
                held = layer.adapter_weights(adapter_name)[attr]
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
    method = METHODS[held.method]
    if config["peft_type"] != method.PEFT_TYPE:
        raise ValueError(f"lowrank: {path} holds a {config['peft_type']} adapter; adapter "
                         f"{adapter_name!r} of this model is {method.PEFT_TYPE}")
    weights = _weights_by_module(path, tensors, method.KEY, method.KEY_WHAT)
    settings = method.fitting_settings(method.from_peft(config, weights, modules)[1])
    ours = method.held_settings(layers, adapter_name, held)
    _refuse_zero3(_adapter_weights(model, adapter_name), "restore_adapter_weights")
    if settings != ours:
        differ = sorted(p for p in settings.keys() | ours.keys() if settings.get(p) != ours.get(p))
        raise ValueError(
            f"lowrank: the adapter in {path} does not fit adapter {adapter_name!r} of this model: "
            f"{method.FITTING} per layer differ at {differ[:3]}{' ...' if len(differ) > 3 else ''} (saved: "
            f"{[settings.get(p) for p in differ[:3]]}, model: {[ours.get(p) for p in differ[:3]]})")
    copy_weights(model, adapter_name, weights)
