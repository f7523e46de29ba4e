"""``lowrank.hotswap_adapter``: new weights for an adapter the model has, copied in place.

The adapter's parameters stay the same tensors (same shapes, dtypes and devices) and its scalings
stay the same Python numbers, so a ``torch.compile``d model runs the new weights without
recompiling (its guards check neither the parameters' values nor their identity changes), and
CUDA graphs, optimizers or anything else holding the parameters see the new values.
"""

import os

import torch

from lowrank.adapter_layer import adapter_layers
from lowrank.adapters import (_adapter_weights, _refuse_zero3, _weights_by_module, copy_weights,
                              restore_adapter_weights)
from lowrank.methods import METHODS
from lowrank.state import check_adapter, patch_state


def hotswap_adapter(model, source, adapter_name="default"):
    """Replace the weights of ``adapter_name`` in place with those of ``source``: a directory
    saved in PEFT's format (``save_adapter``, PEFT's ``save_pretrained``) or a state dict with
    PEFT's keys (``base_model.model.<module path>.lora_A.weight``, ``...lora_B.weight``,
    DoRA's ``...lora_magnitude_vector``, ``...ia3_l``, as ``peft.get_peft_model_state_dict`` returns
    them); return the model.

    The new adapter must be of the same method on the same layers with the same shapes; from a
    directory also with the same rank, alpha, rsLoRA and DoRA per layer (the scaling is part of the
    compiled graph: a new one would recompile). Every check runs before the first weight is
    copied: on an error the adapter is as it was. A merged adapter is refused (its weights are in
    the base weights: unmerge first)."""
    state = patch_state(model, "hotswap_adapter")
    check_adapter(state, adapter_name, "hotswap_adapter")
    layers = {path: layer for path, layer in adapter_layers(model).items()
              if adapter_name in layer.adapter_names}
    merged = [path for path, layer in layers.items() if adapter_name in layer.merged_adapters]
    if merged:
        raise ValueError(f"lowrank.hotswap_adapter: adapter {adapter_name!r} is merged into "
                         f"{merged[:3]}{' ...' if len(merged) > 3 else ''}; lowrank.unmerge first")
    if isinstance(source, (str, os.PathLike)):
        restore_adapter_weights(model, source, adapter_name)
        return model
    if not isinstance(source, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in source.items()):
        raise TypeError("lowrank.hotswap_adapter: source must be a directory or a state dict of "
                        f"{{PEFT key: tensor}}, got {type(source).__name__}")
    method = METHODS[state.adapters[adapter_name].method]
    weights = _weights_by_module("the state dict", source, method.KEY, method.KEY_WHAT)
    if weights.keys() != layers.keys():
        extra, missing = sorted(weights.keys() - layers.keys()), sorted(layers.keys() - weights.keys())
        raise ValueError(f"lowrank.hotswap_adapter: the state dict's layers differ from those of "
                         f"adapter {adapter_name!r}: weights for layers it is not on {extra[:3]}, "
                         f"none for layers it is on {missing[:3]}")
    for path, named in weights.items():
        held = layers[path].adapter_weights(adapter_name)  # DoRA: with its magnitude
        if named.keys() != held.keys():
            raise ValueError(f"lowrank.hotswap_adapter: {path} has {sorted(named)} in the state "
                             f"dict, needs {sorted(held)}")
        for attr, tensor in named.items():
            if tensor.shape != held[attr].shape or not tensor.is_floating_point():
                raise ValueError(f"lowrank.hotswap_adapter: {path}.{attr} is {tuple(tensor.shape)} "
                                 f"{tensor.dtype} in the state dict; adapter {adapter_name!r} "
                                 f"holds a floating-point {tuple(held[attr].shape)}")
    _refuse_zero3(_adapter_weights(model, adapter_name), "hotswap_adapter")
    copy_weights(model, adapter_name, weights)
    return model
