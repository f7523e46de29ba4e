"""The frozen base layers lowrank's adapter layers run over: one class per kind of layer.

A ``BaseLayer`` knows one kind of layer: whether it can serve a module, its (in, out) features,
how to read it into an ``ops.FrozenWeight`` on every call (FSDP2 swaps tensors between calls), and
how a merge writes into its stored weight and an unmerge takes it out again. Everything above
(``lowrank.methods``, ``patch``, ``peft_backend``, ``adapters``) asks ``base_layer_of(module)``
and talks to the object it returns; nothing above branches on the kind of layer.

A new base (bitsandbytes 8-bit, torchao NF4, fp8, ...) is one subclass here, listed in
``BASE_LAYERS``: ``serves``, ``features``, ``operands`` and, if its weight is not a dense tensor
written in place, ``merge`` / ``unmerge`` / ``plain_module``. It needs an op that reads its weight:
a ``FrozenWeight`` form (``lowrank/frozen_weight.py``) and the kernels' ``_weight.py``.
"""

import torch
from bitsandbytes.nn import Linear4bit
from torch import nn
from transformers.pytorch_utils import Conv1D

from lowrank import nf4, ops
from lowrank._quant_state import is_repacked_for_cpu, read_nf4


def is_sharded(tensor):
    """True for a tensor that FSDP2 has sharded (a DTensor)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


class BaseLayer:
    """One kind of frozen base layer; an instance serves one module (``module`` below) for the
    adapter layer that wraps it, and holds what that needs between calls."""

    description = None  # how reports name the kind ("nn.Linear", ...)
    # Stored (in, out) rather than (out, in): PEFT's fan_in_fan_out.
    stored_transposed = False
    # Merges requantize the stored weight and keep the original, which unmerge puts back exactly
    # (dense weights change in place and unmerge computes the original back, to rounding).
    merge_keeps_original = False

    @staticmethod
    def serves(module):
        """True if this class serves ``module``; a TypeError naming why not for a module of its
        type that it cannot serve (a 4-bit layer in another format)."""
        raise NotImplementedError

    def __init__(self, module):
        pass

    @staticmethod
    def features(module):
        """(in_features, out_features)."""
        return module.in_features, module.out_features

    @staticmethod
    def compute_dtype(module):
        """The dtype the GEMMs over ``module`` run in, as far as it is known before a call (None:
        the input's); ``patch_model`` refuses one the kernels do not take."""
        return module.weight.dtype

    def operands(self, module, x):
        """(x in the compute dtype, the frozen weight as an ``ops.FrozenWeight``, bias or None,
        output dtype), read from the module on every call."""
        raise NotImplementedError

    def frozen_weight(self, module):
        """The stored weight as an ``ops.FrozenWeight`` (as stored: no compute dtype), read outside
        a forward call: what DoRA takes its norm ||W + s B A|| over."""
        raise NotImplementedError

    def hold(self, module):
        """Called when an adapter layer starts wrapping ``module``: set what it needs while patched."""

    def release(self, module):
        """Undo ``hold`` (the adapter layer gives ``module`` back)."""

    def merge(self, module, layer, name):
        """Write adapter ``name`` of the adapter layer ``layer`` into the stored weight."""
        raise NotImplementedError

    def unmerge(self, module, layer, names):
        """Take the merged adapters ``names`` (in merge order) out of the stored weight again."""
        raise NotImplementedError

    def unloaded_dtype(self, module, dtype):
        """The dtype ``merge_and_unload`` gives this layer for its ``dtype`` argument."""
        return dtype

    def plain_module(self, module, layer, name, dtype):
        """A plain layer computing what ``layer`` computes with adapter ``name`` (None: none to
        merge): by default the module itself, the adapter merged into it."""
        if name is not None:
            layer.merge(name)
        return layer.release_base_layer()


class DenseBase(BaseLayer):
    """A base whose weight is a dense tensor: merges write into it in place."""

    def stored_weight(self, tensor):
        """The stored weight (or its data) as (out, in), a view."""
        return tensor

    def operands(self, module, x):
        # Under torch.autocast the base computes in the autocast dtype, as its own F.linear /
        # addmm would.
        weight, bias = self.stored_weight(module.weight), module.bias
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        return x, ops.FrozenWeight.of(weight), bias, x.dtype

    def frozen_weight(self, module):
        return ops.FrozenWeight.of(self.stored_weight(module.weight.data))

    def merge(self, module, layer, name):
        layer.merge_in_place(name, self.stored_weight(module.weight.data),
                             None if module.bias is None else module.bias.data, unmerge=False)

    def unmerge(self, module, layer, names):
        for name in reversed(names):
            layer.merge_in_place(name, self.stored_weight(module.weight.data),
                                 None if module.bias is None else module.bias.data, unmerge=True)


class LinearBase(DenseBase):
    description = "nn.Linear"

    @staticmethod
    def serves(module):
        # Not its subclasses (bitsandbytes' 8-bit layers, attention out_proj read directly by
        # F.multi_head_attention_forward, ...): they store or use their weight differently.
        return type(module) is nn.Linear


class Conv1DBase(DenseBase):
    """GPT-2's ``Conv1D``: its weight is stored (in, out) and read through its strides."""

    description = "transformers Conv1D"
    stored_transposed = True

    @staticmethod
    def serves(module):
        return isinstance(module, Conv1D)

    @staticmethod
    def features(module):
        return module.weight.shape[0], module.nf

    def stored_weight(self, tensor):
        return tensor.t()


class Linear4bitBase(BaseLayer):
    """A bitsandbytes ``Linear4bit`` in NF4: its packed weight read in place with its quant state.
    It computes in its ``compute_dtype`` (autocast or not) and returns the input's dtype, as
    bitsandbytes does. A merge requantizes (a second rounding) and keeps the original bytes."""

    description = "bitsandbytes Linear4bit (NF4)"
    merge_keeps_original = True

    @staticmethod
    def serves(module):
        if not isinstance(module, Linear4bit):
            return False
        quant_type = getattr(module.weight, "quant_state", None)
        quant_type = module.weight.quant_type if quant_type is None else quant_type.quant_type
        if quant_type != "nf4":
            raise TypeError(f"lowrank: a bitsandbytes Linear4bit with quant_type {quant_type!r} "
                            "cannot be patched; only 'nf4' is supported")
        return True

    def __init__(self, module):
        # The dtype the packed bytes are stored in (bnb_4bit_quant_storage) when patched: one that
        # differs later means something cast them (see ``nf4_operands``).
        self.storage = nf4_storage_dtype(module)
        self.original = None  # (packed, quant state, bias) before the first merge
        self.cpu_repack = None

    @staticmethod
    def compute_dtype(module):
        return module.compute_dtype

    def operands(self, module, x):
        weight, state = nf4_operands(module, self.storage)
        compute_dtype = module.compute_dtype or x.dtype
        bias = None if module.bias is None else module.bias.to(compute_dtype)
        return x.to(compute_dtype), ops.FrozenWeight.of(weight, state), bias, x.dtype

    def frozen_weight(self, module):
        return ops.FrozenWeight.of(*nf4_operands(module, self.storage))

    def hold(self, module):
        # bitsandbytes repacks a Linear4bit's weight in place the first time it runs in eval mode
        # without grad on a CPU with AVX512-BF16 (and crashes, half way, on shapes its layout
        # cannot hold). A weight repacked before patching is read through ``read_nf4``; while
        # patched, keep the layout bitsandbytes loaded (``release`` restores the flag).
        self.cpu_repack = getattr(module, "support_avx512bf16_for_cpu", None)
        if self.cpu_repack is not None:
            module.support_avx512bf16_for_cpu = False

    def release(self, module):
        if self.cpu_repack is not None:
            module.support_avx512bf16_for_cpu = self.cpu_repack

    def merge(self, module, layer, name):
        if self.original is None:
            self.original = (module.weight.data, module.weight.quant_state,
                             None if module.bias is None else module.bias.data)
        (packed, state), bias = layer.merged_weight(name, module.weight, module.bias, None)
        set_nf4_weight(module, packed, state)
        if bias is not None:
            module.bias.data = bias

    def unmerge(self, module, layer, names):
        if self.original is None:
            return
        packed, state, bias = self.original
        set_nf4_weight(module, packed, state)
        if bias is not None:
            module.bias.data = bias
        self.original = None

    def unloaded_dtype(self, module, dtype):
        # By default the dtype the weight was loaded in, even if bitsandbytes repacked it.
        return nf4_operands(module)[1].dtype if dtype is None else dtype

    def plain_module(self, module, layer, name, dtype):
        """``dtype`` "nf4": the Linear4bit, requantized; else a new ``nn.Linear`` in ``dtype``
        holding the lossless merge of the original packed weight."""
        if dtype == "nf4":
            return super().plain_module(module, layer, name, dtype)
        bias = module.bias
        if name is None:
            weight = nf4.dequantize(*nf4_operands(module), dtype=dtype)
        else:
            weight, bias = layer.merged_weight(name, module.weight, bias, dtype)
        in_features, out_features = self.features(module)
        linear = nn.Linear(in_features, out_features, bias=bias is not None,
                           device=weight.device, dtype=dtype)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        return linear.train(layer.training)


def expert_projections(module):
    """The names of the 3-D expert weights of a transformers mixture-of-experts module
    (``@use_experts_implementation``: Qwen3-MoE, Mixtral, OLMoE, gpt-oss, ...) in the module's
    parameter order, which is PEFT's nesting order: ("gate_up_proj", "down_proj") for gated
    experts, ("up_proj", "down_proj") otherwise; () for any other module."""
    if not all(hasattr(module, a) for a in ("num_experts", "has_gate", "has_bias", "is_transposed")):
        return ()
    names = ("gate_up_proj" if module.has_gate else "up_proj", "down_proj")
    params = dict(module.named_parameters(recurse=False))
    if not all(n in params and params[n].dim() == 3 for n in names):
        return ()
    return tuple(n for n in params if n in names)


class ExpertsBase(BaseLayer):
    """A mixture-of-experts experts module of transformers (``expert_projections``): E stacked
    expert weights per projection, E x out x in (E x in x out where the module says
    ``is_transposed``, as gpt-oss stores them), dense. ``lowrank.methods.lora_experts`` runs it."""

    description = "MoE experts"

    @staticmethod
    def serves(module):
        return bool(expert_projections(module))

    @staticmethod
    def features(module):
        """(in, out) of the experts block as a whole: hidden size to hidden size."""
        first, last = (getattr(module, n) for n in (expert_projections(module)[0], "down_proj"))
        in_features = first.shape[1] if module.is_transposed else first.shape[2]
        out_features = last.shape[2] if module.is_transposed else last.shape[1]
        return in_features, out_features

    @staticmethod
    def compute_dtype(module):
        return module.down_proj.dtype

    def merge(self, module, layer, name):
        layer.merge_in_place(name, module, unmerge=False)

    def unmerge(self, module, layer, names):
        for name in reversed(names):
            layer.merge_in_place(name, module, unmerge=True)


# Asked in order; the first that serves a module is its kind.
BASE_LAYERS = (LinearBase, Linear4bitBase, Conv1DBase, ExpertsBase)


def base_layer_class(module):
    """The ``BaseLayer`` class serving ``module``; a TypeError naming anything else."""
    for base_class in BASE_LAYERS:
        if base_class.serves(module):
            return base_class
    raise TypeError(f"lowrank: cannot patch a {type(module).__module__}.{type(module).__name__}; "
                    "supported layers are torch.nn.Linear, bitsandbytes Linear4bit (nf4), "
                    "transformers' Conv1D and its mixture-of-experts experts modules")


def base_layer_of(module):
    """A ``BaseLayer`` serving ``module`` (see ``base_layer_class``)."""
    return base_layer_class(module)(module)


def nf4_quant_state(module):
    """The quant state of a Linear4bit, as bitsandbytes holds it: the Params4bit's or, where FSDP
    has replaced the Params4bit with a plain Parameter (the all-gathered shards), the copy
    bitsandbytes keeps on the module, as its own Linear4bit.forward recovers it."""
    state = getattr(module.weight, "quant_state", None)
    if state is None:
        state = getattr(module, "quant_state", None)
    if state is None:
        raise RuntimeError("lowrank: this Linear4bit's weight has no quant_state (was it moved "
                           "or converted without bitsandbytes?)")
    return state


def nf4_storage_dtype(module):
    """The dtype a Linear4bit's packed bytes are stored in (bnb_4bit_quant_storage). bitsandbytes'
    CPU repacking turns them into uint8 and keeps the dtype they had, when another, on the state."""
    state = nf4_quant_state(module)
    if is_repacked_for_cpu(state):
        return getattr(state, "original_storage_type", None) or torch.uint8
    return module.weight.dtype


def nf4_operands(module, nf4_storage=None):
    """(packed weight, quant state) of a Linear4bit (see ``nf4_quant_state``), in bitsandbytes'
    standard layout even where bitsandbytes has repacked the weight for its CPU kernel (see
    ``read_nf4``). ``nf4_storage``: the dtype the packed bytes were stored in when patched; any
    other dtype now means a cast."""
    weight, state = module.weight, nf4_quant_state(module)
    storage = nf4_storage_dtype(module)
    if nf4_storage is not None and storage != nf4_storage:
        raise RuntimeError(
            f"lowrank: this Linear4bit's packed NF4 weight was stored as {nf4_storage} and "
            f"is now {storage}: it was cast, which destroys the packed codes. FSDP2's "
            "MixedPrecisionPolicy(param_dtype=...) and model.to(dtype) cast 4-bit weights stored "
            "in a float bnb_4bit_quant_storage; leave param_dtype None (or equal to the "
            "quant_storage dtype), or load with bnb_4bit_quant_storage=torch.uint8, which "
            "neither casts")
    return read_nf4(weight, state)


def set_nf4_weight(linear4bit, packed, state):
    """Put new packed bytes and quant state into a Linear4bit: on its Params4bit and on the module,
    where bitsandbytes keeps a copy (read when FSDP drops the Params4bit)."""
    linear4bit.weight.data, linear4bit.weight.quant_state = packed, state
    if getattr(linear4bit, "quant_state", None) is not None:
        linear4bit.quant_state = state
