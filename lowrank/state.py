"""What a patched model carries (``model.lowrank_state``): its adapters' settings, the active
adapter and the ``requires_grad`` flags it had before patching; and the small steps every part of
the lifecycle takes on it (a module swapped in place, the active adapter set, what trains)."""

from dataclasses import dataclass, field

from lowrank.adapter_layer import adapter_layers


@dataclass
class PatchState:
    adapters: dict = field(default_factory=dict)  # name -> AdapterConfig, in order of creation
    active: str = None
    requires_grad: dict = field(default_factory=dict)  # parameter name -> flag before patching
    fused_blocks: dict = field(default_factory=dict)  # block path -> fusion name (lowrank.blocks)


def patch_state(model, what):
    state = getattr(model, "lowrank_state", None)
    if state is None:
        raise ValueError(f"lowrank.{what}: the model is not patched (call lowrank.patch_model first)")
    return state


def check_adapter(state, name, what):
    if name not in state.adapters:
        raise ValueError(f"lowrank.{what}: no adapter named {name!r}; the model has "
                         f"{list(state.adapters)}")


def replace_module(model, path, module):
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def activate(model, state, name):
    state.active = name
    for layer in adapter_layers(model).values():
        layer.active_adapter = name
    mark_trainable(model, state)


def mark_trainable(model, state):
    """Only the active adapter's weights train (as PEFT does): the base and other adapters are frozen."""
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in adapter_layers(model).values():
        if state.active in layer.adapter_names:
            for param in layer.adapter_weights(state.active).values():
                param.requires_grad_(True)
