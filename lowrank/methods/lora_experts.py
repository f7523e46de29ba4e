"""LoRA on the experts of a mixture-of-experts block: ``LoraExperts``, the layer ``patch_model``
puts in place of a transformers experts module (``lowrank.base_layers.ExpertsBase``: Qwen3-MoE,
Mixtral, OLMoE, gpt-oss, ...), with one adapter per targeted expert projection in PEFT's
``target_parameters`` layout, run as ``lowrank.ops.lora_grouped`` (every expert in one launch).

PEFT adapts each targeted 3-D parameter with a ``ParamWrapper`` and nests them in the module's
parameter order, the last one outermost: with both of Qwen3-MoE's projections its keys are
``mlp.experts.base_layer.lora_A.weight`` (gate_up_proj) and ``mlp.experts.lora_A.weight``
(down_proj). ``adapter_weights`` names ours the same way, so saving and loading go through LoRA's
PEFT format (``methods/lora.py``) unchanged. Each projection's A is (E r) x in and B out x (r E),
as PEFT makes them; their product per expert is PEFT's ``get_delta_weight``.
"""

import math

import torch
from torch import nn

from lowrank import ops
from lowrank.adapter_layer import AdapterLayer
from lowrank.base_layers import expert_projections


def projection_shape(experts, name):
    """(E, in_features, out_features) of expert projection ``name``."""
    weight = getattr(experts, name)
    count, first, second = weight.shape
    return (count, first, second) if experts.is_transposed else (count, second, first)


def weight_prefixes(projections):
    """{projection: its PEFT key prefix} for the targeted ``projections`` in the module's
    parameter order: PEFT nests one ParamWrapper per projection, the last outermost."""
    return {name: "base_layer." * (len(projections) - 1 - i) for i, name in enumerate(projections)}


class LoraExperts(AdapterLayer):
    """A transformers experts module with LoRA adapters on its expert projections: for the
    rows routed to expert e, each adapted projection computes ``x W_e^T + scaling x A_e^T B_e^T``,
    all experts in one ``lowrank.ops.lora_grouped`` per projection; the rest of the module's
    forward (sorting by expert, gate, biases, routing weights, combine) is its own, as
    transformers' grouped_mm forward does it.

    ``lora_A[adapter][projection]`` / ``lora_B[...]``: nn.Linear weights (E r) x in and
    out x (r E), fp32, as PEFT's ``ParamWrapper`` holds them. No dropout and no DoRA, as in PEFT.
    """

    adapter_names_attr = ("lora_A", "lora_B")

    def __init__(self, base_layer):
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r, self.lora_alpha, self.scaling, self.projections = {}, {}, {}, {}

    def check_settings(self, path, settings):
        rank, alpha, dropout, use_rslora, use_dora, projections = settings
        if dropout:
            raise ValueError(f"lowrank.patch_model: LoRA on the experts at {path} takes no dropout "
                             f"(got {dropout}): the experts' input cannot be dropped per "
                             "projection (PEFT's ParamWrapper refuses it too); use dropout=0, or "
                             "target_modules that leave the experts out")
        if use_dora:
            raise ValueError(f"lowrank.patch_model: DoRA has no form for the experts at {path} "
                             "(nor in PEFT); use target_modules that leave them out")
        held = next(iter(self.projections.values()), None)
        if held is not None and tuple(projections) != held:
            raise ValueError(f"lowrank.patch_model: the experts at {path} carry adapters on "
                             f"{list(held)}; another adapter must adapt the same projections "
                             f"(as PEFT requires), got {list(projections)}")

    def add_adapter(self, name, rank, alpha, dropout, use_rslora, use_dora, projections):
        """A new adapter on ``projections``: each A Kaiming-uniform (a = sqrt 5), B zero, as
        PEFT initializes them, so it adds nothing yet."""
        self.check_settings(type(self.base_layer).__name__, (rank, alpha, dropout, use_rslora,
                                                             use_dora, projections))
        if name in self.lora_A:
            raise ValueError(f"lowrank: adapter {name!r} already exists on this layer")
        order = expert_projections(self.base_layer)
        unknown = [p for p in projections if p not in order]
        if unknown:
            raise ValueError(f"lowrank: {type(self.base_layer).__name__} has no expert projections "
                             f"{unknown}; it has {list(order)}")
        device = getattr(self.base_layer, order[0]).device
        self.lora_A[name], self.lora_B[name] = nn.ModuleDict(), nn.ModuleDict()
        for projection in (p for p in order if p in projections):
            experts, in_features, out_features = projection_shape(self.base_layer, projection)
            lora_A = nn.Linear(in_features, rank * experts, bias=False, device=device)
            lora_B = nn.Linear(rank * experts, out_features, bias=False, device=device)
            nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(lora_B.weight)
            self.lora_A[name][projection], self.lora_B[name][projection] = lora_A, lora_B
        self.projections[name] = tuple(self.lora_A[name])
        self.r[name], self.lora_alpha[name] = rank, alpha
        self.scaling[name] = alpha / math.sqrt(rank) if use_rslora else alpha / rank

    def delete_adapter(self, name):
        super().delete_adapter(name)
        for table in (self.r, self.lora_alpha, self.scaling, self.projections):
            del table[name]

    def adapter_weights(self, name):
        """{attribute as PEFT's nested ParamWrappers name it: weight}."""
        prefixes = weight_prefixes(self.projections[name])
        return {f"{prefixes[p]}{kind}": getattr(self, kind)[name][p].weight
                for p in self.projections[name] for kind in ("lora_A", "lora_B")}

    def delta(self, name, projection):
        """s B_e A_e for every expert, shaped as the stored weight (PEFT's get_delta_weight), in
        fp32."""
        lora_A = self.lora_A[name][projection].weight.detach()
        lora_B = self.lora_B[name][projection].weight.detach()
        experts, in_features, out_features = projection_shape(self.base_layer, projection)
        rank = self.r[name]
        a = lora_A.float().reshape(experts, rank, in_features)
        b = lora_B.float().reshape(out_features, rank, experts).permute(2, 0, 1)
        delta = torch.bmm(b, a) * self.scaling[name]  # E x out x in
        return delta.transpose(1, 2) if self.base_layer.is_transposed else delta

    def merge_in_place(self, name, experts, unmerge):
        """Add (or take out) every adapted projection's s B_e A_e into its stored weight."""
        for projection in self.projections[name]:
            weight = getattr(experts, projection).data
            delta = self.delta(name, projection).to(weight.dtype)
            weight.sub_(delta) if unmerge else weight.add_(delta)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        name = self.runs_adapter()
        if name is None:
            return self.base_layer(hidden_states, top_k_index, top_k_weights)
        adapters = {p: (self.lora_A[name][p].weight, self.lora_B[name][p].weight,
                        self.scaling[name]) for p in self.projections[name]}
        return experts_forward(self.base_layer, adapters, hidden_states, top_k_index,
                               top_k_weights)

    def extra_repr(self):
        return f"{super().extra_repr()}, projections={self.projections.get(self.active_adapter)}"


def experts_forward(experts, adapters, hidden_states, top_k_index, top_k_weights):
    """The forward of a transformers experts module (as its grouped_mm forward computes it:
    rows sorted by expert, gate, biases, routing weights, combine) with each projection run as
    one ``lowrank.ops.lora_grouped``; ``adapters``: {projection: (A, B, scaling)} in PEFT's
    layout, a projection without one running the grouped GEMM alone."""
    check_experts_call(experts, hidden_states)
    top_k = top_k_index.shape[-1]
    expert_ids, order = torch.sort(top_k_index.reshape(-1))
    offsets = ops.expert_offsets(expert_ids, experts.num_experts)
    x = hidden_states.to(experts.down_proj.dtype)
    # The first projection gathers each sorted row's token inside the kernels (no sorted copy).
    h = _project(experts, adapters, expert_projections(experts)[0], x, offsets, expert_ids,
                 row_index=order // top_k)
    h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
    h = _project(experts, adapters, "down_proj", h, offsets, expert_ids)
    if experts.has_post_expert_norm:
        h = experts.post_expert_norm(h)
    h = h * top_k_weights.reshape(-1)[order].unsqueeze(-1)
    restore = torch.empty_like(order)
    restore[order] = torch.arange(order.numel(), device=order.device)
    out = h[restore].view(hidden_states.shape[0], top_k, h.shape[-1]).sum(dim=1)
    return out.to(hidden_states.dtype)


def check_experts_call(experts, hidden_states):
    """Refuse (NotImplementedError, ValueError) a call ``experts_forward`` cannot run as the
    module would."""
    if getattr(experts, "_is_expert_parallel", False):
        raise NotImplementedError("lowrank: LoRA on experts sharded by expert parallelism is not "
                                  "supported")
    if hidden_states.dim() != 2:
        raise ValueError(f"lowrank: the experts take (tokens, hidden) inputs, got "
                         f"{tuple(hidden_states.shape)}")


def _project(experts, adapters, projection, x, offsets, expert_ids, row_index=None):
    """One projection of the rows sorted by expert (x[row_index] if given), its adapter (if it
    has one) fused in."""
    weight = getattr(experts, projection)
    count, in_features, out_features = projection_shape(experts, projection)
    if projection in adapters:
        lora_A, lora_B, scaling = adapters[projection]
    else:  # rank 0: the grouped GEMM alone
        lora_A = weight.new_zeros(0, in_features, dtype=torch.float32)
        lora_B = weight.new_zeros(out_features, 0, dtype=torch.float32)
        scaling = 0.0
    bias = getattr(experts, f"{projection}_bias") if experts.has_bias else None
    # A frozen bias is added in the GEMM's epilogue (no gather and add over the output); one that
    # trains (PEFT's bias="all") is added here, where autograd gives it its gradient.
    trains = bias is not None and bias.requires_grad and torch.is_grad_enabled()
    y = ops.lora_grouped(x, weight, lora_A, lora_B, scaling, offsets, experts.is_transposed,
                         row_index, None if trains else bias)
    if trains:
        y = y + bias[expert_ids]
    return y


# PEFT's ParamWrapper layers on lowrank_grouped (lowrank.patch_peft_model)

def peft_wrapper_chain(layer):
    """(PEFT's ParamWrappers from ``layer`` inwards, the experts module they adapt): PEFT nests one
    per targeted parameter of the module."""
    from peft.tuners.lora import ParamWrapper

    chain = [layer]
    while isinstance(chain[-1].base_layer, ParamWrapper):
        chain.append(chain[-1].base_layer)
    return chain, chain[-1].base_layer


def _peft_experts_adapters(chain, name, hidden_states):
    """{projection: (A, B, scaling)} of adapter ``name`` over PEFT's ``chain``, with what the op
    would refuse raised here (TypeError, ValueError, NotImplementedError)."""
    from lowrank._dispatch import check_device
    from lowrank._quant_state import FLOAT_DTYPES

    experts = chain[-1].base_layer
    check_device(hidden_states.device)
    check_experts_call(experts, hidden_states)
    if experts.down_proj.dtype not in FLOAT_DTYPES:
        raise TypeError(f"the experts' weights are {experts.down_proj.dtype}, which lowrank's "
                        "kernels do not take")
    return {wrapper.parameter_name: (wrapper.lora_A[name].weight, wrapper.lora_B[name].weight,
                                     wrapper.scaling[name])
            for wrapper in chain if name in wrapper.lora_A}


def peft_experts_forward(layer, peft_refusal, hidden_states, *args, **kwargs):
    """The forward of PEFT's outermost ParamWrapper ``layer`` over an experts module: every
    projection its chain adapts run by ``experts_forward`` for the one active adapter; PEFT's own
    forward (``lowrank.fallbacks``) for a call we do not serve. ``peft_refusal(wrapper, name)``:
    why a wrapper's adapter cannot run on our op (LoRA's checks), or None."""
    from lowrank import fallbacks

    chain, experts = peft_wrapper_chain(layer)
    if any(wrapper.disable_adapters or wrapper.merged for wrapper in chain):
        return fallbacks.fall_back(layer, None, hidden_states, args, kwargs)
    active = {name for wrapper in chain for name in wrapper.active_adapters
              if name in wrapper.lora_A}
    why = None
    if not active:
        return fallbacks.fall_back(layer, None, hidden_states, args, kwargs)
    if kwargs or len(args) != 2:
        why = f"extra forward arguments ({', '.join(sorted(kwargs)) or 'positional'})"
    elif len(active) > 1:
        why = "several adapters active at once"
    else:
        name = next(iter(active))
        why = next((refusal for wrapper in chain if name in wrapper.lora_A
                    if (refusal := peft_refusal(wrapper, name)) is not None), None)
    if why is None:
        adapters, why = fallbacks.checked(_peft_experts_adapters, chain, name, hidden_states)
    if why is not None:
        return fallbacks.fall_back(layer, why, hidden_states, args, kwargs)
    return experts_forward(experts, adapters, hidden_states, *args)
