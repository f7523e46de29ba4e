"""DoRA layers: ``patch_model(model, use_dora=True)`` puts a ``DoraLinear`` in place of each
targeted linear layer, a LoRA layer whose adapters each also carry a magnitude vector m, run as
``lowrank.ops.dora_linear``. Named as PEFT names it (``lora_magnitude_vector.<adapter>.weight``),
initialized as PEFT initializes it (the row norms of W + s B A, B being zero: those of W)."""

import torch
from torch import nn

from lowrank import nf4, ops
from lowrank.modules import LoraLinear, nf4_operands


class Magnitude(nn.Module):
    """One adapter's magnitude m (out_features values, fp32) as the module PEFT keeps it in, so
    that the state-dict key is PEFT's: ``lora_magnitude_vector.<adapter>.weight``."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight)


class DoraLinear(LoraLinear):
    """A linear layer with DoRA adapters: ``y = base(x) + (g - 1) x_d W^T + g s x_d A^T B^T`` with
    g = m / ||W + s B A|| (PEFT's forward; without dropout ``g (x W^T + s x A^T B^T) + b``).

    Merging writes g (W + s B A) into the base weight (dense: in place, and unmerging divides by
    the same g and subtracts s B A again; NF4: requantized, the original bytes kept and restored
    bit for bit), the norm taken over the unmerged weight, as PEFT takes it."""

    adapter_names_attr = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base_layer):
        super().__init__(base_layer)
        self.lora_magnitude_vector = nn.ModuleDict()
        self._merged_scales = {}  # adapter name -> g at merge time, to unmerge a dense weight

    def add_adapter(self, name, rank, alpha, dropout, use_rslora):
        super().add_adapter(name, rank, alpha, dropout, use_rslora)
        self.lora_magnitude_vector[name] = Magnitude(self.weight_norm(name))

    def delete_adapter(self, name):
        super().delete_adapter(name)
        self._merged_scales.pop(name, None)

    def frozen_weight(self):
        """The base weight as the ops take it, outside a forward call (no compute dtype)."""
        if self.kind == "nf4":
            return ops.FrozenWeight.of(*nf4_operands(self.base_layer, self.nf4_storage))
        return ops.FrozenWeight.of(self.dense_weight_view())

    def weight_norm(self, name):
        """||W + s B A|| per output row, fp32, over the base weight as it is now."""
        return ops.dora_norm(self.frozen_weight(), *self.factors(name))

    def merge_scale(self, name):
        """g = m / ||W + s B A|| (fp32), the norm over the unmerged base weight."""
        if self.merged_adapters:
            raise ValueError(f"lowrank.merge: DoRA adapter {name!r} takes its norm over the "
                             f"unmerged weight, which already holds {self.merged_adapters}; "
                             "unmerge first")
        magnitude = self.lora_magnitude_vector[name].weight.detach().float()
        return magnitude / self.weight_norm(name)

    def merged_weight(self, name, weight, bias, dtype):
        """(g (W + s B A) of the NF4 ``weight``, bias): requantized as the weight was quantized
        (dtype None) or dense in ``dtype``."""
        merged = ops.merge_lora(weight, *self.factors(name), dtype=torch.float32)
        merged = merged * self.merge_scale(name)[:, None]
        if dtype is not None:
            return merged.to(dtype), bias
        packed_weight, state = nf4_operands(self.base_layer, self.nf4_storage)
        packed, new_state = nf4.quantize(merged, blocksize=state.blocksize,
                                         double_quant=state.nested,
                                         quant_storage=packed_weight.dtype)
        new_state.dtype = state.dtype  # the merged weight stands for the original's compute dtype
        return (packed.reshape(packed_weight.shape), new_state), bias

    def merge_dense_(self, name, unmerge):
        weight, (lora_A, lora_B, scaling) = self.dense_weight_view(), self.factors(name)
        if unmerge:
            ops.unmerge_ia3_(weight, self._merged_scales.pop(name))
            ops.unmerge_lora_(weight, lora_A, lora_B, scaling)
        else:
            scale = self.merge_scale(name)
            ops.merge_lora_(weight, lora_A, lora_B, scaling)
            ops.merge_ia3_(weight, scale)
            self._merged_scales[name] = scale

    def forward(self, x):
        name = self.runs_adapter()
        if name is None:
            return self.base_layer(x)
        x, weight, bias, out_dtype = self.frozen_operands(x)
        dropout = self.lora_dropout[name] if self.training else 0.0
        y = ops.dora_linear(x, weight, self.lora_A[name].weight, self.lora_B[name].weight,
                            self.lora_magnitude_vector[name].weight, self.scaling[name], bias=bias,
                            dropout=dropout)
        return y.to(out_dtype)
