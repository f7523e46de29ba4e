"""``lowrank.add_weighted_adapter``: a new LoRA adapter made of weighted existing ones, PEFT's
combination types with PEFT's results.

Two families, as in PEFT's ``LoraModel.add_weighted_adapter``:

- On the factors (``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``): A and
  B are each combined over the adapters, with weight ``sqrt(|w s|)`` (the sign of ``w s`` on A's
  side only), so that a single adapter's ``B A`` comes back scaled by ``w s``. All adapters must
  have one rank.
- On the products (``svd`` and the ``*_svd`` forms of the others): each layer's ``s B A`` is
  combined, then truncated to ``svd_rank`` by an SVD (B = U S, A = Vh).
- ``cat``: A's rows and B's columns concatenated (A scaled by ``w s``), the rank the sum of ranks:
  the exact sum of the weighted adapters.

The combinations (TIES, DARE, magnitude pruning) run the same torch operations in the same order
as PEFT's ``merge_utils``, so the results are equal to PEFT's bit for bit; DARE's random masks
are drawn from torch's global generator, layer by layer in module order, A's then B's, as PEFT
draws them, so the same seed gives the same masks. The new adapter has scaling 1 (alpha = rank,
no rsLoRA): the combined factors carry every scaling already.
"""

import math

import torch

from lowrank.adapter_layer import AdapterConfig, adapter_layers
from lowrank.base_layers import Conv1DBase, ExpertsBase
from lowrank.methods.lora import LoraLinear
from lowrank.patch import add_adapter
from lowrank.state import patch_state

ON_FACTORS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
ON_PRODUCTS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = ON_FACTORS + ON_PRODUCTS + ("cat",)
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
MAJORITY_SIGN_METHODS = ("total", "frequency")


def _magnitude_pruned(tensor, density):
    """Keep the int(density * numel) largest magnitudes, zero the rest (torch.topk's choice)."""
    keep = torch.zeros_like(tensor).reshape(-1)
    keep[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)[1]] = 1
    return tensor * keep.reshape(tensor.shape)


def _randomly_pruned(tensor, density):
    """DARE: keep each value with probability density (torch's global generator), rescaled by
    1 / density to keep the expected value."""
    return tensor * torch.bernoulli(torch.full_like(tensor, density)) / density


def _pruned(tensors, density, random):
    if density >= 1:  # nothing pruned, and no random numbers drawn (as PEFT)
        return tensors
    return [_randomly_pruned(t, density) if random else _magnitude_pruned(t, density)
            for t in tensors]


def _combined(kind, tensors, weights, density, majority_sign_method):
    """The weighted combination of same-shaped ``tensors``; ``kind`` without its ``_svd``."""
    if kind in ("ties", "dare_ties", "magnitude_prune", "dare_linear"):
        tensors = _pruned(tensors, density, random=kind.startswith("dare"))
    stacked = torch.stack(tensors, dim=0)
    weighted = stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))
    if kind in ("linear", "svd", "magnitude_prune", "dare_linear"):
        return weighted.sum(dim=0)
    # TIES: per element, the sign with the larger total (summed values, or counts for
    # "frequency") of the pruned, unweighted tensors; the weighted values of that sign averaged.
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if majority_sign_method == "total" else signs.sum(dim=0)
    agrees = signs == torch.where(votes >= 0, 1, -1)
    return (weighted * agrees).sum(dim=0) / torch.clamp(agrees.sum(dim=0), min=1.0)


def _on_factors(kind, layer, names, weights, density, majority_sign_method):
    factor_a, factor_b, lora_a, lora_b = [], [], [], []
    for name, weight in zip(names, weights):
        scaled = weight * layer.scaling[name]
        root = math.sqrt(abs(scaled))
        factor_a.append(root if scaled >= 0 else -root)  # the sign on one side only
        factor_b.append(root)
        lora_a.append(layer.lora_A[name].weight.detach())
        lora_b.append(layer.lora_B[name].weight.detach())
    dtype = lora_a[0].dtype
    return tuple(_combined(kind, tensors, torch.tensor(factors).to(tensors[0].device), density,
                           majority_sign_method).to(dtype)
                 for tensors, factors in ((lora_a, factor_a), (lora_b, factor_b)))


def _on_products(kind, layer, names, weights, rank, density, majority_sign_method, svd_clamp,
                 svd_full_matrices, svd_driver):
    # PEFT combines the delta weights in the layout the base stores them (Conv1D: in x out), which
    # decides where DARE's random masks fall; the SVD then runs on out x in.
    conv1d = isinstance(layer.base, Conv1DBase)
    deltas = []
    for name in names:
        product = layer.lora_B[name].weight.detach() @ layer.lora_A[name].weight.detach()
        deltas.append((product.T if conv1d else product) * layer.scaling[name])
    delta = _combined(kind.removesuffix("_svd"), deltas,
                      torch.tensor(weights).to(deltas[0].device), density, majority_sign_method)
    u, s, vh = torch.linalg.svd(delta.T if conv1d else delta, full_matrices=svd_full_matrices,
                                driver=svd_driver)
    lora_b = u[:, :rank] @ torch.diag(s[:rank])
    lora_a = vh[:rank, :]
    if svd_clamp is not None:
        limit = torch.quantile(torch.cat([lora_b.flatten(), lora_a.flatten()]), svd_clamp)
        lora_b, lora_a = lora_b.clamp(-limit, limit), lora_a.clamp(-limit, limit)
    return lora_a, lora_b


def _concatenated(layer, names, weights, rank):
    lora_a = torch.cat([layer.lora_A[n].weight.detach() * w * layer.scaling[n]
                        for n, w in zip(names, weights)], dim=0)
    lora_b = torch.cat([layer.lora_B[n].weight.detach() for n in names], dim=1)
    # Layers without some of the adapters leave the last ranks zero, as PEFT does.
    padded_a = lora_a.new_zeros(rank, lora_a.shape[1])
    padded_b = lora_b.new_zeros(lora_b.shape[0], rank)
    padded_a[:lora_a.shape[0]], padded_b[:, :lora_b.shape[1]] = lora_a, lora_b
    return padded_a, padded_b


def _check(state, adapters, weights, adapter_name, combination_type, svd_rank, density,
           majority_sign_method, svd_clamp):
    what = "lowrank.add_weighted_adapter"
    if not isinstance(adapters, (list, tuple)) or not adapters:
        raise ValueError(f"{what}: adapters must be a non-empty list of adapter names")
    if not isinstance(weights, (list, tuple)) or len(weights) != len(adapters) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
            for w in weights):
        raise ValueError(f"{what}: weights must be a list of finite numbers, one per adapter "
                         f"({len(adapters)}), got {weights!r}")
    if len(set(adapters)) != len(adapters):
        raise ValueError(f"{what}: adapters {list(adapters)} name one adapter twice")
    missing = [a for a in adapters if a not in state.adapters]
    if missing:
        raise ValueError(f"{what}: the model has no adapter {missing} (it has "
                         f"{list(state.adapters)})")
    not_lora = [a for a in adapters if state.adapters[a].method != "lora"]
    if not_lora:
        raise ValueError(f"{what}: adapters {not_lora} are not LoRA adapters; only LoRA "
                         "adapters are combined")
    dora = [a for a in adapters if state.adapters[a].use_dora]
    if dora:
        raise ValueError(f"{what}: adapters {dora} are DoRA adapters, whose magnitudes have no "
                         "weighted combination; only plain LoRA adapters are combined")
    if adapter_name in state.adapters:
        # PEFT returns silently here, leaving the old adapter: an error says it instead.
        raise ValueError(f"{what}: the model already has an adapter named {adapter_name!r}")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"{what}: combination_type must be one of {list(COMBINATION_TYPES)}, got "
                         f"{combination_type!r}")
    kind = combination_type.removesuffix("_svd")
    if kind in NEEDS_DENSITY and len(adapters) > 1:
        if density is None or not isinstance(density, (int, float)) or not density >= 0:
            raise ValueError(f"{what}: combination_type {combination_type!r} needs a density "
                             f">= 0 (the fraction of values kept; >= 1 keeps all), got {density!r}")
    if kind in ("ties", "dare_ties") and majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise ValueError(f"{what}: majority_sign_method must be one of "
                         f"{list(MAJORITY_SIGN_METHODS)}, got {majority_sign_method!r}")
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank < 1):
        raise ValueError(f"{what}: svd_rank must be a positive int, got {svd_rank!r}")
    if svd_clamp is not None and not 0 <= svd_clamp <= 1:
        raise ValueError(f"{what}: svd_clamp is a quantile in [0, 1], got {svd_clamp!r}")
    # PEFT writes the new adapter's target_modules from theirs, which it cannot do for a mix of
    # regular expressions and lists of names.
    regex = {a: isinstance(state.adapters[a].target_modules, str)
             and state.adapters[a].target_modules != "all-linear" for a in adapters}
    if len(set(regex.values())) > 1:
        raise ValueError(f"{what}: adapters {[a for a in adapters if regex[a]]} target modules by "
                         f"a regular expression and {[a for a in adapters if not regex[a]]} by "
                         "names; PEFT does not combine the two kinds and neither does lowrank")


def add_weighted_adapter(model, adapters, weights, adapter_name, combination_type="svd",
                         svd_rank=None, svd_clamp=None, svd_full_matrices=True, svd_driver=None,
                         density=None, majority_sign_method="total"):
    """Add LoRA adapter ``adapter_name`` to a patched ``model``: the ``adapters`` combined with
    ``weights`` (negative ones subtract), as PEFT's ``add_weighted_adapter`` with the same
    arguments computes it. It goes on every layer that has any of them, is not made active, and
    has scaling 1.

    ``combination_type``: ``svd`` (default), ``linear``, ``cat``, ``ties``, ``dare_linear``,
    ``dare_ties``, ``magnitude_prune`` and the ``_svd`` forms of the last four. ``linear`` and the
    other factor-wise types need one rank for all adapters and give it to the new one; ``cat``
    gives the sum of the ranks; the SVD types ``svd_rank`` (default: the largest rank), with
    ``svd_clamp`` (a quantile of the factors' values to clamp them to), ``svd_full_matrices`` and
    ``svd_driver`` passed to ``torch.linalg.svd``. ``density`` (the fraction of values kept) for
    TIES, DARE and magnitude pruning; ``majority_sign_method`` ("total" or "frequency") for TIES.
    One adapter is always combined ``linear``ly, as PEFT does. DARE draws its masks from torch's
    global generator (``torch.manual_seed`` makes them repeatable).

    Everything is checked and computed before the model changes."""
    state = patch_state(model, "add_weighted_adapter")
    _check(state, adapters, weights, adapter_name, combination_type, svd_rank, density,
           majority_sign_method, svd_clamp)
    if len(adapters) == 1:
        combination_type = "linear"
    layers = {path: layer for path, layer in adapter_layers(model).items()
              if any(a in layer.adapter_names for a in adapters)}
    experts = [path for path, layer in layers.items() if isinstance(layer.base, ExpertsBase)]
    if experts:
        raise ValueError(f"lowrank.add_weighted_adapter: the adapters are on mixture-of-experts "
                         f"experts ({experts[:3]}), whose per-expert factors are not combined yet; "
                         "combine adapters of linear layers")
    ranks = [max(layer.r[a] for layer in layers.values() if a in layer.adapter_names)
             for a in adapters]
    if combination_type in ON_FACTORS:
        if len(set(ranks)) != 1:
            raise ValueError(f"lowrank.add_weighted_adapter: combination_type {combination_type!r} "
                             f"needs adapters of one rank, got ranks {dict(zip(adapters, ranks))} "
                             "(cat or svd combine different ranks)")
        rank = ranks[0]
        differ = [p for p, layer in layers.items() for a in adapters
                  if a in layer.adapter_names and layer.r[a] != rank]
        if differ:
            raise ValueError(f"lowrank.add_weighted_adapter: combination_type {combination_type!r} "
                             f"needs one rank in every layer; {differ[:3]} have another "
                             "(rank_pattern)")
    elif combination_type == "cat":
        rank = sum(ranks)
    else:
        rank = svd_rank or max(ranks)
        sides = {p: min(layer.in_features, layer.out_features) for p, layer in layers.items()}
        small = [p for p, side in sides.items() if rank > side]
        if small:
            raise ValueError(f"lowrank.add_weighted_adapter: svd rank {rank} is larger than "
                             f"{small[0]}'s smaller side ({sides[small[0]]})")
    factors = {}
    with torch.no_grad():
        for path, layer in layers.items():
            here = [(a, w) for a, w in zip(adapters, weights) if a in layer.adapter_names]
            names, layer_weights = [a for a, _ in here], [w for _, w in here]
            if combination_type == "cat":
                factors[path] = _concatenated(layer, names, layer_weights, rank)
            elif combination_type in ON_FACTORS:
                factors[path] = _on_factors(combination_type, layer, names, layer_weights, density,
                                            majority_sign_method)
            else:
                factors[path] = _on_products(combination_type, layer, names, layer_weights, rank,
                                             density, majority_sign_method, svd_clamp,
                                             svd_full_matrices, svd_driver)
    first = state.adapters[adapters[0]]
    config = AdapterConfig(method="lora", modules=list(layers), rank=rank, alpha=rank,
                           dropout=first.dropout, use_rslora=False, target_modules=list(layers))
    add_adapter(model, adapter_name, config,
                {path: (rank, rank, first.dropout, False) for path in layers})
    with torch.no_grad():
        for path, (lora_a, lora_b) in factors.items():
            layer = model.get_submodule(path)
            assert isinstance(layer, LoraLinear)
            layer.lora_A[adapter_name].weight.copy_(lora_a)
            layer.lora_B[adapter_name].weight.copy_(lora_b)
    return model

