"""``lowrank.mixed_batch``: a patched model's forward with one LoRA adapter per batch row.

Inside the block every LoRA layer runs ``lowrank.ops.lora_mixed``: the base GEMM once for the
batch and each row's adapter gathered from the adapters stacked for that layer. Rows follow PEFT's
``adapter_names=``: ``"__base__"`` runs the base model, and a row whose adapter a layer does not
have runs that layer's base alone.
"""

import contextlib

import torch

from lowrank import fallbacks, ops
from lowrank._dispatch import check_device
from lowrank.adapter_layer import adapter_layers
from lowrank.base_layers import ExpertsBase
from lowrank.state import patch_state

BASE = "__base__"  # PEFT's name for a row without adapter
MIXED_STACKS = "_lowrank_mixed_stacks"  # the attribute of a PEFT layer caching its stacked adapters


def _row_names(state, adapters):
    """Each row's adapter name (or BASE) from names or a tensor of indices into the model's
    adapters (in order of creation), -1 for the base."""
    order = list(state.adapters)
    if isinstance(adapters, torch.Tensor):
        if adapters.dim() != 1 or adapters.dtype not in (torch.int32, torch.int64):
            raise ValueError("lowrank.mixed_batch: an index tensor must be 1-D int32 / int64 (one "
                             f"adapter per row), got {adapters.dtype} {tuple(adapters.shape)}")
        indices = adapters.tolist()
        bad = [i for i in indices if not -1 <= i < len(order)]
        if bad:
            raise ValueError(f"lowrank.mixed_batch: indices {bad[:3]} are outside [-1, "
                             f"{len(order)}) (the model's adapters: {order}; -1: the base)")
        names = [BASE if i == -1 else order[i] for i in indices]
    elif isinstance(adapters, (list, tuple)) and adapters and all(isinstance(n, str) for n in adapters):
        names = list(adapters)
    else:
        raise TypeError("lowrank.mixed_batch: adapters must be a list of adapter names (one per "
                        f"row, {BASE!r} for the base) or an index tensor, got {adapters!r}")
    unknown = sorted({n for n in names if n != BASE and n not in state.adapters})
    if unknown:
        raise ValueError(f"lowrank.mixed_batch: the model has no adapter {unknown} (it has "
                         f"{order}; {BASE!r} runs the base)")
    not_lora = sorted({n for n in names if n != BASE and state.adapters[n].method != "lora"})
    if not_lora:
        raise ValueError(f"lowrank.mixed_batch: adapters {not_lora} are not LoRA adapters")
    dora = sorted({n for n in names if n != BASE and state.adapters[n].use_dora})
    if dora:
        raise ValueError(f"lowrank.mixed_batch: adapters {dora} are DoRA adapters; mixed batches "
                         "run plain LoRA adapters (lowrank.ops.lora_mixed)")
    return names


def _stacked(layer, used):
    """(A (n x R x K), B (n x N x R), scalings (n,)) of the adapters ``used`` of one layer, fp32,
    each padded with zeros to the largest rank."""
    # From the weights, not layer.r: PEFT's compiled hot swap pads A and B beyond r with zeros.
    ranks = [layer.lora_A[name].weight.shape[0] for name in used]
    rank = max(ranks)
    device = layer.lora_A[used[0]].weight.device
    lora_a = torch.zeros(len(used), rank, layer.in_features, device=device)
    lora_b = torch.zeros(len(used), layer.out_features, rank, device=device)
    for i, (name, r) in enumerate(zip(used, ranks)):
        lora_a[i, :r] = layer.lora_A[name].weight.detach()
        lora_b[i, :, :r] = layer.lora_B[name].weight.detach()
    scalings = torch.tensor([float(layer.scaling[name]) for name in used], device=device)
    return lora_a, lora_b, scalings


def _mixed_forward(layer, row_index, stacks, x):
    """``layer``'s forward for one mixed batch: ``row_index`` (batch,) local adapter indices."""
    if torch.is_grad_enabled():
        raise ValueError("lowrank.mixed_batch: mixed-adapter batches are inference only (no "
                         "backward: train each adapter on batches of its own, with "
                         "lowrank.set_adapter); run the model under torch.no_grad() or "
                         "torch.inference_mode()")
    if x.dim() < 2 or x.shape[0] != row_index.shape[0]:
        raise ValueError(f"lowrank.mixed_batch: the batch has {x.shape[0] if x.dim() else 0} rows "
                         f"but {row_index.shape[0]} adapters were named, one per row")
    x, weight, bias, out_dtype = layer.frozen_operands(x)
    return _run_mixed(x, weight, bias, out_dtype, row_index, stacks)


def _run_mixed(x, weight, bias, out_dtype, row_index, stacks):
    """``lora_mixed`` over the frozen operands; ``stacks`` holds the stacked adapters under
    "fp32" and gains the compute dtype's copy at its first use (converted once, not per call)."""
    lora_a, lora_b, scalings = stacks.setdefault(
        x.dtype, tuple(t.to(x.dtype) for t in stacks["fp32"][:2]) + (stacks["fp32"][2],))
    index = row_index.view(-1, *(1,) * (x.dim() - 2)).expand(x.shape[:-1])
    y = ops.lora_mixed(x, weight, lora_a, lora_b, scalings, index, bias=bias, index_in_range=True)
    return y.to(out_dtype)


@contextlib.contextmanager
def mixed_batch(model, adapters):
    """Run ``model``'s forward inside the block with one LoRA adapter per batch row (inference).

    ``adapters``: a list of adapter names, one per row of the batch (``"__base__"``: the base
    model), as PEFT's ``adapter_names=``; or an int tensor of indices into the model's adapters
    in order of creation (``list(model.lowrank_state.adapters)``), -1 for the base. Each layer
    stacks the adapters of the batch it has when the block starts (later changes to their weights
    are not seen inside it); a row whose adapter a layer lacks runs that layer's base alone, as
    in PEFT. Dropout does not apply (refused in training mode with dropout), nor do merged or
    disabled adapters (refused), nor gradients."""
    state = patch_state(model, "mixed_batch")
    names = _row_names(state, adapters)
    # LoRA layers (IA3 layers have no lora_A); lowrank.methods.lora imports this module.
    layers = {p: m for p, m in adapter_layers(model).items() if hasattr(m, "lora_A")}
    for path, layer in layers.items():
        if isinstance(layer.base, ExpertsBase) and any(n in layer.lora_A for n in names):
            raise ValueError(f"lowrank.mixed_batch: {path} is a mixture-of-experts experts module "
                             "with adapters of the batch; mixed batches serve linear layers only")
        if layer.merged_adapters or layer.adapters_disabled:
            raise ValueError(f"lowrank.mixed_batch: {path} has "
                             f"{'merged adapters' if layer.merged_adapters else 'adapters disabled'}"
                             "; unmerge (or leave disable_adapters) first, as PEFT requires")
        dropping = [n for n in set(names) if n in layer.lora_dropout and layer.lora_dropout[n] > 0]
        if layer.training and dropping:
            raise ValueError(f"lowrank.mixed_batch: {path} is in training mode with dropout for "
                             f"{sorted(dropping)}; mixed batches run in eval mode (model.eval())")
    overridden = []
    try:
        with torch.no_grad():
            for layer in layers.values():
                used = [n for n in dict.fromkeys(names) if n in layer.lora_A]
                if not used:  # (a function: a module assigned here would become a submodule)
                    layer.forward = lambda x, base=layer.base_layer: base(x)
                else:
                    device = layer.lora_A[used[0]].weight.device
                    row_index = torch.tensor([used.index(n) if n in used else -1 for n in names],
                                             device=device)
                    stacks = {"fp32": _stacked(layer, used)}
                    layer.forward = lambda x, layer=layer, row_index=row_index, stacks=stacks: \
                        _mixed_forward(layer, row_index, stacks, x)
                overridden.append(layer)
        yield model
    finally:
        for layer in overridden:
            del layer.forward  # the class's forward again


def peft_mixed_forward(layer, base, x, adapter_names, refusal):
    """(A PEFT LoRA layer's forward for PEFT's ``adapter_names=`` (one per row) on ``lora_mixed``,
    None), or (None, why) where PEFT's own forward must run: why is what ``lora_mixed`` refuses
    in these operands, or None where the call is not one this op serves (gradients wanted: PEFT's
    masks train; adapters merged or disabled; a named adapter ``refusal(layer, name)`` refuses or
    with a bias; dropout in training mode; a batch that does not match the names: PEFT's error
    then)."""
    if (torch.is_grad_enabled() or layer.disable_adapters or layer.merged or x.dim() < 2
            or not isinstance(adapter_names, (list, tuple)) or len(adapter_names) != x.shape[0]):
        return None, None
    used = [n for n in dict.fromkeys(adapter_names) if n in layer.lora_A]
    if not used or any(refusal(layer, n) is not None or layer.lora_B[n].bias is not None
                       or (layer.training and getattr(layer.lora_dropout[n], "p", 0.0) > 0)
                       for n in used):
        return None, None
    params = [p for n in used for p in (layer.lora_A[n].weight, layer.lora_B[n].weight)]
    # Stacked once per set of adapters and weights: a weight changed in place bumps its version.
    key = (tuple(used), tuple((p.data_ptr(), p._version) for p in params),
           tuple(float(layer.scaling[n]) for n in used))
    cached = getattr(layer, MIXED_STACKS, None)
    if cached is None or cached[0] != key:
        cached = (key, {"fp32": _stacked(layer, used)})
        setattr(layer, MIXED_STACKS, cached)
    stacks = cached[1]
    names = tuple(adapter_names)
    if stacks.get("names") != names:  # the rows' indices, copied to the device once per batch
        stacks["names"] = names
        stacks["row_index"] = torch.tensor([used.index(n) if n in used else -1 for n in names],
                                           device=params[0].device)
    operands, why = fallbacks.checked(_peft_mixed_operands, layer, base, x, stacks)
    if why is not None:
        return None, why
    return _run_mixed(*operands, stacks["row_index"], stacks), None


def _peft_mixed_operands(layer, base, x, stacks):
    """(x, weight, bias, output dtype) of PEFT's ``layer`` for ``lora_mixed``; raises what the op
    would refuse in them."""
    check_device(x.device)
    x, weight, bias, out_dtype = base.operands(layer.base_layer, x)
    index = stacks["row_index"].view(-1, *(1,) * (x.dim() - 2)).expand(x.shape[:-1])
    ops.lora_mixed_checks(x, weight, *stacks["fp32"], index, bias, index_in_range=True)
    return x, weight, bias, out_dtype
