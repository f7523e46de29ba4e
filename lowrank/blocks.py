"""Block fusions: a second, revertible patching stage that runs a whole block (an MLP over its
three patched projections, ...) as one fused op.

The first stage (``patch_model``) puts an adapter layer in place of each targeted linear layer;
names, the state dict, saving, merging and ``disable_adapters`` are those of the layers. This
stage changes nothing of that: it binds a block's ``forward`` (an instance attribute; the class
and its forward are untouched) to a fusion's forward over the block's already-patched layers.

A fusion is ``BlockFusion(name, finds, forward)``:

- ``finds(model, architecture) -> {module path: block}``: the blocks it can serve in ``model``;
  ``architecture`` is the model's entry of ``lowrank.architectures`` (projection names and
  activation by ``config.model_type``), or None for an architecture not in the table.
- ``forward(block, *args, **kwargs)``: the block's output, computed by the fusion, or
  ``NotImplemented`` for any call it cannot serve (adapters disabled or merged, a layer without
  the active adapter, several adapters, a dtype or argument it does not take): the block's own
  forward then runs that call. ``serving_adapter`` answers the common part of that question.

Fusions are listed in ``FUSIONS``, asked in order; a block is fused by the first that finds it.
``patch_model(..., fuse_blocks=True)`` (the default) and ``load_adapter`` install them;
``unpatch`` and ``merge_and_unload`` remove them, and ``delete_adapter`` removes those of blocks
left without a patched layer. Which blocks are fused, by which fusion,
is ``model.lowrank_state.fused_blocks`` ({path: fusion name}).

``patch_peft_model`` installs them too (``install_peft``), on the blocks whose projections
(``BlockFusion.projections``) are all PEFT LoRA layers it patched, and reports them in
``PeftPatchReport.fused_blocks``; ``unpatch_peft_model`` removes them, and a fused block whose
layers PEFT replaced by their base layers (``merge_and_unload``, ``unload``) takes its own forward
back at its next call. PEFT's state is read at every call as the layers read it.
"""

import functools
from dataclasses import dataclass
from typing import Callable

from lowrank.adapter_layer import AdapterLayer
from lowrank.architectures import architecture
from lowrank.block_forwards import QKV, attention_forward, gated_mlp_forward, peft_base


@dataclass(frozen=True)
class BlockFusion:
    name: str
    finds: Callable  # (model, architecture or None) -> {module path: block module}
    forward: Callable  # (block, *args, **kwargs) -> output, or NotImplemented
    # The block's attributes holding the projections the fusion runs: patch_peft_model fuses a
    # block only when each is a PEFT LoRA layer it patched.
    projections: tuple = ()


def _gated_mlps(model, table):
    """The Llama-style gated MLPs of ``model`` (``gate_proj``, ``up_proj``, ``down_proj`` and
    ``act_fn``, the names ``gated_mlp_forward`` reads), where the architecture table knows them."""
    if table is None or table.mlp[1] != {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}:
        return {}
    suffix = "." + table.mlp[0]
    return {path: module for path, module in model.named_modules()
            if path.endswith(suffix) and hasattr(module, "act_fn")
            and all(hasattr(module, name) for name in table.mlp[1].values())}


def _qkv_attentions(model, table):
    """The Llama-style attentions of ``model`` (``q_proj``, ``k_proj`` and ``v_proj``, called on
    the attention's ``hidden_states``: what ``attention_forward`` serves), where the architecture
    table knows them."""
    if table is None or [table.attention[1].get(role) for role in "qkv"] != list(QKV):
        return {}
    suffix = "." + table.attention[0]
    return {path: module for path, module in model.named_modules()
            if path.endswith(suffix) and all(hasattr(module, name) for name in QKV)}


# The registered fusions, asked in order.
FUSIONS = [
    # The MLP saves x, gate and up only (issue 18): activation and product recomputed in backward.
    BlockFusion("lora_gated_mlp", _gated_mlps, gated_mlp_forward,
                ("gate_proj", "up_proj", "down_proj")),
    # q, k and v share one shrink over x and one Function (issue 18): x is read once for the
    # three LoRA A's, and kept once (unfused, the three nodes hold one storage already).
    BlockFusion("lora_qkv_attention", _qkv_attentions, attention_forward, QKV),
]


def serving_adapter(layers, layer_class):
    """The one adapter that all ``layers`` (a block's projections) run for this call, when every
    one is a patched ``layer_class`` running it unmerged and enabled; else None (the fusion then
    returns NotImplemented)."""
    names = {layer.runs_adapter() if isinstance(layer, layer_class) else None for layer in layers}
    if len(names) != 1:
        return None
    (name,) = names
    return name


def _fused_forward(fusion, block, *args, **kwargs):
    output = fusion.forward(block, *args, **kwargs)
    if output is NotImplemented:
        return type(block).forward(block, *args, **kwargs)
    return output


def _serves_every_projection(fusion, block):
    return bool(fusion.projections) and all(
        peft_base(getattr(block, name, None)) is not None for name in fusion.projections)


def _fused_peft_forward(fusion, block, *args, **kwargs):
    if not _serves_every_projection(fusion, block):
        # PEFT replaced the block's layers by their base layers (merge_and_unload, unload): the
        # block is a plain block again, with its own forward from now on.
        del block.forward
        return type(block).forward(block, *args, **kwargs)
    return _fused_forward(fusion, block, *args, **kwargs)


def _is_fused(module):
    forward = vars(module).get("forward")
    return isinstance(forward, functools.partial) and forward.func in (_fused_forward,
                                                                       _fused_peft_forward)


def install(model, state):
    """Bind every registered fusion's forward on the blocks it finds in the patched ``model``
    (``state``: its ``PatchState``), recording them in ``state.fused_blocks``. Blocks already
    fused, holding no patched layer, or whose forward something else replaced, are left alone."""
    table = architecture(model)
    for fusion in FUSIONS:
        for path, block in fusion.finds(model, table).items():
            if path in state.fused_blocks or "forward" in vars(block):
                continue
            if not any(isinstance(m, AdapterLayer) for m in block.modules()):
                continue
            block.forward = functools.partial(_fused_forward, fusion, block)
            state.fused_blocks[path] = fusion.name


def install_peft(model):
    """Bind every registered fusion's forward on the blocks of the PEFT ``model`` it finds whose
    projections (``BlockFusion.projections``) are all PEFT LoRA layers patched by
    ``patch_peft_model``; return {path: fusion name} of the model's fused blocks. Blocks whose
    forward something else replaced are left alone."""
    table = architecture(model)
    for fusion in FUSIONS:
        for block in fusion.finds(model, table).values():
            if "forward" not in vars(block) and _serves_every_projection(fusion, block):
                block.forward = functools.partial(_fused_peft_forward, fusion, block)
    return {path: module.forward.args[0].name for path, module in model.named_modules()
            if _is_fused(module)}


def uninstall_peft(model):
    """Give every block ``install_peft`` fused in ``model`` its own forward back."""
    for module in model.modules():
        if _is_fused(module):
            del module.forward


def uninstall(model, state):
    """Give every fused block its own forward back."""
    for path in state.fused_blocks:
        block = model.get_submodule(path)
        if _is_fused(block):
            del block.forward
    state.fused_blocks.clear()


def prune(model, state):
    """Give their own forward back to fused blocks left without a patched layer (after
    ``delete_adapter`` gave some layers back)."""
    for path in list(state.fused_blocks):
        block = model.get_submodule(path)
        if not any(isinstance(m, AdapterLayer) for m in block.modules()):
            if _is_fused(block):
                del block.forward
            del state.fused_blocks[path]
