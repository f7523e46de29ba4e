"""The modules ``lowrank.patch_model`` puts in place of a model's linear layers.

Each keeps the layer it replaces as ``base_layer`` (frozen) and holds its adapters in dicts keyed
by adapter name, named as PEFT names them (``lora_A.<adapter>.weight``, ``lora_B.<adapter>.weight``,
``ia3_l.<adapter>``), so a patched model's state dict reads like a PEFT model's. The forward pass
runs one fused op over the frozen weight as it is stored: dense, packed NF4 read in place, or
GPT-2's transposed ``Conv1D`` weight read through its strides.

Merging writes adapters into the base weight: in place for dense weights (unmerging subtracts or
divides them out again, to the rounding of the weight's dtype), and for NF4 as new packed bytes
and quant state, the original ones kept so that unmerging restores them bit for bit.
"""

import math

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


def layer_kind(module):
    """'linear', 'nf4' or 'conv1d' for a layer we can patch; a TypeError naming anything else."""
    if isinstance(module, Linear4bit):
        quant_type = getattr(module.weight, "quant_state", None)
        quant_type = module.weight.quant_type if quant_type is None else quant_type.quant_type
        if quant_type != "nf4":
            raise TypeError(f"lowrank: a bitsandbytes Linear4bit with quant_type {quant_type!r} "
                            "cannot be patched; only 'nf4' is supported")
        return "nf4"
    if isinstance(module, Conv1D):
        return "conv1d"
    # Other subclasses of nn.Linear (bitsandbytes' 8-bit layers, attention out_proj read directly
    # by F.multi_head_attention_forward, ...) store or use their weight differently.
    if type(module) is nn.Linear:
        return "linear"
    raise TypeError(f"lowrank: cannot patch a {type(module).__module__}.{type(module).__name__}; "
                    "supported layers are torch.nn.Linear, bitsandbytes Linear4bit (nf4) and "
                    "transformers' Conv1D")


def layer_features(module, kind):
    """(in_features, out_features) of a layer of ``kind``."""
    if kind == "conv1d":
        return module.weight.shape[0], module.nf
    return module.in_features, module.out_features


def frozen_operands(base, kind, x, nf4_storage=None):
    """(x in the compute dtype, the frozen weight as an ``ops.FrozenWeight``, bias or None, output
    dtype) of a base layer of ``kind``, read on every call (FSDP2 swaps the tensors between calls).

    Under ``torch.autocast`` a dense or Conv1D base computes in the autocast dtype, as its own
    F.linear / addmm would. A Linear4bit computes in its ``compute_dtype`` (autocast or not) and
    returns the input's dtype, as bitsandbytes does; its packed weight is read as it is stored,
    with its quant state (see ``nf4_operands``).
    """
    if kind in ("linear", "conv1d"):
        weight = base.weight.t() if kind == "conv1d" else base.weight  # Conv1D stores (in, out)
        bias = base.bias
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        return x, ops.FrozenWeight.of(weight), bias, x.dtype
    weight, state = nf4_operands(base, nf4_storage)
    compute_dtype = base.compute_dtype or x.dtype
    bias = None if base.bias is None else base.bias.to(compute_dtype)
    return x.to(compute_dtype), ops.FrozenWeight.of(weight, state), bias, x.dtype


def nf4_quant_state(base):
    """The quant state of a Linear4bit, as bitsandbytes holds it: the Params4bit's or, where FSDP
    has replaced the Params4bit with a plain Parameter (the all-gathered shards), the copy
    bitsandbytes keeps on the module, as its own Linear4bit.forward recovers it."""
    state = getattr(base.weight, "quant_state", None)
    if state is None:
        state = getattr(base, "quant_state", None)
    if state is None:
        raise RuntimeError("lowrank: this Linear4bit's weight has no quant_state (was it moved "
                           "or converted without bitsandbytes?)")
    return state


def nf4_storage_dtype(base):
    """The dtype a Linear4bit's packed bytes are stored in (bnb_4bit_quant_storage). bitsandbytes'
    CPU repacking turns them into uint8 and keeps the dtype they had, when another, on the state."""
    state = nf4_quant_state(base)
    if is_repacked_for_cpu(state):
        return getattr(state, "original_storage_type", None) or torch.uint8
    return base.weight.dtype


def nf4_operands(base, nf4_storage=None):
    """(packed weight, quant state) of a Linear4bit (see ``nf4_quant_state``), in bitsandbytes'
    standard layout even where bitsandbytes has repacked the weight for its CPU kernel (see
    ``read_nf4``). ``nf4_storage``: the dtype the packed bytes were stored in when patched; any
    other dtype now means a cast."""
    weight, state = base.weight, nf4_quant_state(base)
    storage = nf4_storage_dtype(base)
    if nf4_storage is not None and storage != nf4_storage:
        raise RuntimeError(
            f"lowrank: this Linear4bit's packed NF4 weight was stored as {nf4_storage} and "
            f"is now {storage}: it was cast, which destroys the packed codes. FSDP2's "
            "MixedPrecisionPolicy(param_dtype=...) and model.to(dtype) cast 4-bit weights stored "
            "in a float bnb_4bit_quant_storage; leave param_dtype None (or equal to the "
            "quant_storage dtype), or load with bnb_4bit_quant_storage=torch.uint8, which "
            "neither casts")
    return read_nf4(weight, state)


class AdapterLayer(nn.Module):
    """What LoRA and IA3 layers share: the base layer, which adapter runs, and the frozen weight as
    the fused ops take it."""

    adapter_names_attr = ()  # names of the ModuleDicts / ParameterDicts that hold adapter weights

    def __init__(self, base_layer):
        super().__init__()
        self.kind = layer_kind(base_layer)
        self.base_layer = base_layer
        self.in_features, self.out_features = layer_features(base_layer, self.kind)
        # The dtype the packed NF4 bytes are stored in (bnb_4bit_quant_storage): one that differs
        # later means something cast them (see nf4_operands).
        self.nf4_storage = nf4_storage_dtype(base_layer) if self.kind == "nf4" else None
        self.active_adapter = None
        self.merged_adapters = []
        self.adapters_disabled = False
        # bitsandbytes repacks a Linear4bit's weight in place the first time it runs in eval mode
        # without grad on a CPU with AVX512-BF16 (and crashes, half way, on shapes its layout
        # cannot hold). A weight repacked before patching is read through ``read_nf4``; while
        # patched, keep the layout bitsandbytes loaded (``unpatch`` restores the flag).
        self._bnb_cpu_repack = getattr(base_layer, "support_avx512bf16_for_cpu", None)
        if self._bnb_cpu_repack is not None:
            base_layer.support_avx512bf16_for_cpu = False

    # HF code sometimes reads a projection's weight or bias directly (dtype checks, tying).
    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    @property
    def adapter_names(self):
        return list(getattr(self, self.adapter_names_attr[0]).keys())

    def release_base_layer(self):
        """The base layer, with the flag we changed on it restored (for ``unpatch``)."""
        if self._bnb_cpu_repack is not None:
            self.base_layer.support_avx512bf16_for_cpu = self._bnb_cpu_repack
        return self.base_layer

    def delete_adapter(self, name):
        for attr in self.adapter_names_attr:
            del getattr(self, attr)[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def check_unsharded(self, what):
        """Merges read and write whole weights: refuse FSDP2's shards with an error naming them."""
        if any(is_sharded(p) for p in self.parameters()):
            raise ValueError(f"lowrank.{what}: this model's weights are sharded by FSDP2 "
                             "(DTensors); merge before fully_shard, or after gathering them")

    def merge(self, name):
        """Write adapter ``name`` into the base weight (NF4: requantized, the original kept)."""
        self.check_unsharded("merge")
        if name in self.merged_adapters:
            raise ValueError(f"lowrank.merge: adapter {name!r} is already merged")
        base = self.base_layer
        if self.kind == "nf4":
            if not self.merged_adapters:
                self._nf4_original = (base.weight.data, base.weight.quant_state,
                                      None if base.bias is None else base.bias.data)
            (packed, state), bias = self.merged_weight(name, base.weight, base.bias, None)
            set_nf4_weight(base, packed, state)
            if bias is not None:
                base.bias.data = bias
        else:
            self.merge_dense_(name, unmerge=False)
        self.merged_adapters.append(name)

    def unmerge(self):
        """Take every merged adapter out of the base weight again."""
        if self.merged_adapters:
            self.check_unsharded("unmerge")
        base = self.base_layer
        if self.kind == "nf4" and self.merged_adapters:
            packed, state, bias = self._nf4_original
            set_nf4_weight(base, packed, state)
            if bias is not None:
                base.bias.data = bias
            del self._nf4_original
        else:
            for name in reversed(self.merged_adapters):
                self.merge_dense_(name, unmerge=True)
        self.merged_adapters.clear()

    def dense_weight_view(self):
        """The dense base weight's data as (out, in), a view (Conv1D stores it (in, out))."""
        data = self.base_layer.weight.data
        return data.t() if self.kind == "conv1d" else data

    def merged_module(self, name, dtype):
        """A plain layer computing what this one computes with adapter ``name`` (None: merged
        already, or none) for ``merge_and_unload``: the base layer merged in place (dense), or a
        new ``nn.Linear`` in ``dtype`` holding the lossless merge of an NF4 weight (``dtype``
        "nf4": the Linear4bit, requantized)."""
        self.check_unsharded("merge_and_unload")
        if self.kind != "nf4" or dtype == "nf4":
            if name is not None:
                self.merge(name)
            return self.release_base_layer()
        base = self.base_layer
        bias = base.bias
        if name is None:
            weight = nf4.dequantize(*nf4_operands(base), dtype=dtype)
        else:
            weight, bias = self.merged_weight(name, base.weight, bias, dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None,
                           device=weight.device, dtype=dtype)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        return linear.train(self.training)

    def runs_adapter(self):
        """The adapter the forward pass adds, or None: adapters disabled, none active here, or any
        adapter merged into this layer. The base weights, which then hold the merged adapters, run
        alone, as PEFT's layers do: an active adapter that is not merged does not run on top."""
        name = self.active_adapter
        if (self.adapters_disabled or name is None or name not in self.adapter_names
                or self.merged_adapters):
            return None
        return name

    def frozen_operands(self, x):
        """``frozen_operands`` of this layer's base (its NF4 storage dtype checked)."""
        return frozen_operands(self.base_layer, self.kind, x, self.nf4_storage)


def set_nf4_weight(linear4bit, packed, state):
    """Put new packed bytes and quant state into a Linear4bit: on its Params4bit and on the module,
    where bitsandbytes keeps a copy (read when FSDP drops the Params4bit)."""
    linear4bit.weight.data, linear4bit.weight.quant_state = packed, state
    if getattr(linear4bit, "quant_state", None) is not None:
        linear4bit.quant_state = state


class LoraLinear(AdapterLayer):
    """A linear layer with LoRA adapters: ``y = base(x) + scaling * dropout(x) A^T B^T``, run as
    one fused ``lowrank.ops.lora_linear`` for the active adapter.

    Adapters are fp32 (as PEFT keeps them) whatever the base's dtype; the fused op casts them to
    the compute dtype for the products. One adapter runs at a time (``lowrank.set_adapter``).
    """

    adapter_names_attr = ("lora_A", "lora_B")

    def __init__(self, base_layer):
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r, self.lora_alpha, self.scaling, self.lora_dropout = {}, {}, {}, {}

    def add_adapter(self, name, rank, alpha, dropout, use_rslora):
        """A new adapter: A Kaiming-uniform (a = sqrt 5), B zero, so it adds nothing yet."""
        if name in self.lora_A:
            raise ValueError(f"lowrank: adapter {name!r} already exists on this layer")
        device = self.base_layer.weight.device
        self.lora_A[name] = nn.Linear(self.in_features, rank, bias=False, device=device,
                                      dtype=torch.float32)
        self.lora_B[name] = nn.Linear(rank, self.out_features, bias=False, device=device,
                                      dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        self.r[name], self.lora_alpha[name], self.lora_dropout[name] = rank, alpha, dropout
        self.scaling[name] = alpha / math.sqrt(rank) if use_rslora else alpha / rank

    def delete_adapter(self, name):
        super().delete_adapter(name)
        for table in (self.r, self.lora_alpha, self.scaling, self.lora_dropout):
            del table[name]

    def factors(self, name):
        return self.lora_A[name].weight.detach(), self.lora_B[name].weight.detach(), self.scaling[name]

    def merged_weight(self, name, weight, bias, dtype):
        """(W + s B A of the NF4 ``weight``, bias): requantized (dtype None) or dense in ``dtype``."""
        return ops.merge_lora(weight, *self.factors(name), dtype=dtype), bias

    def merge_dense_(self, name, unmerge):
        (ops.unmerge_lora_ if unmerge else ops.merge_lora_)(self.dense_weight_view(),
                                                            *self.factors(name))

    def forward(self, x):
        name = self.runs_adapter()
        if name is None:
            return self.base_layer(x)
        x, weight, bias, out_dtype = self.frozen_operands(x)
        dropout = self.lora_dropout[name] if self.training else 0.0
        y = ops.lora_linear(x, weight, self.lora_A[name].weight, self.lora_B[name].weight,
                            self.scaling[name], bias=bias, dropout=dropout)
        return y.to(out_dtype)

    def extra_repr(self):
        return f"kind={self.kind}, adapters={self.adapter_names}, active={self.active_adapter!r}"


class IA3Linear(AdapterLayer):
    """A linear layer with IA3 vectors: ``y = base(x) * l`` (l over the outputs) or, for a
    feed-forward layer, ``y = base(x * l)`` (l over the inputs), run as one fused
    ``lowrank.ops.ia3_linear``. l is fp32, shaped as PEFT shapes it: (out, 1) or (1, in)."""

    adapter_names_attr = ("ia3_l",)

    def __init__(self, base_layer):
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward = None  # fixed by the first adapter: PEFT decides it per layer

    def add_adapter(self, name, feedforward):
        """A new vector of ones: it changes nothing yet."""
        if name in self.ia3_l:
            raise ValueError(f"lowrank: adapter {name!r} already exists on this layer")
        if self.is_feedforward is not None and feedforward != self.is_feedforward:
            raise ValueError(f"lowrank: this layer's IA3 adapters are "
                             f"{'' if self.is_feedforward else 'not '}feed-forward")
        self.is_feedforward = feedforward
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        self.ia3_l[name] = nn.Parameter(torch.ones(shape, device=self.base_layer.weight.device))

    def merged_weight(self, name, weight, bias, dtype):
        """(W scaled by l of the NF4 ``weight``, its bias scaled too in the output form)."""
        return ops.merge_ia3(weight, self.ia3_l[name].detach(), self.is_feedforward, bias=bias,
                             dtype=dtype)

    def merge_dense_(self, name, unmerge):
        bias = self.base_layer.bias
        (ops.unmerge_ia3_ if unmerge else ops.merge_ia3_)(
            self.dense_weight_view(), self.ia3_l[name].detach(), self.is_feedforward,
            bias=None if bias is None else bias.data)

    def forward(self, x):
        name = self.runs_adapter()
        if name is None:
            return self.base_layer(x)
        x, weight, bias, out_dtype = self.frozen_operands(x)
        y = ops.ia3_linear(x, weight, self.ia3_l[name], bias=bias, feedforward=self.is_feedforward)
        return y.to(out_dtype)

    def extra_repr(self):
        return (f"kind={self.kind}, feedforward={self.is_feedforward}, adapters={self.adapter_names}, "
                f"active={self.active_adapter!r}")
