"""lowrank's fused ops. One module per op, holding its autograd Function (where it has gradients),
its torch.library custom ops with their fake implementations (the launch primitives that
torch.compile traces through) and its public function, which checks the arguments and asks
``lowrank._dispatch`` whether to run the kernels or ``lowrank.reference``:

- ``lora``: ``lora_linear`` (``LoraLinearFunction``), LoRA / QLoRA linear.
- ``dora``: ``dora_linear`` (``DoraLinearFunction``), DoRA linear, and ``dora_norm``.
- ``ia3``: ``ia3_linear`` (``IA3LinearFunction``), IA3 linear.
- ``lora_grouped``: ``lora_grouped`` (``LoraGroupedFunction``), LoRA over a mixture-of-experts
  block's experts, rows grouped by expert, one launch for all experts.
- ``lora_mixed``: ``lora_mixed``, LoRA linear with one adapter per row (inference).
- ``lora_mlp``: ``lora_mlp`` (``LoraMLPFunction``), the fused LoRA gated MLP, with the gated
  activation's custom ops.
- ``lora_qkv``: ``lora_qkv`` (``LoraQKVFunction``), the fused LoRA q, k and v projections.
- ``lora_steps``: the LoRA linear's shrink and expand as custom ops, for block ops whose
  projections share an input.
- ``merge``: ``merge_lora`` / ``merge_ia3`` and their in-place forms.
- ``nf4``: the NF4 quantize / dequantize custom ops behind ``lowrank.nf4``.
- ``gradients``: ``InputGradients``, with which each backward returns its gradients by name.

Every op takes the frozen weight as one ``FrozenWeight`` (``lowrank.frozen_weight``), or builds it
from a dense tensor, or packed NF4 with its quant state.
"""

from lowrank.frozen_weight import FrozenWeight
from lowrank.ops.dora import (DoraLinearFunction, dora_forward, dora_grad_input, dora_grad_scale,
                              dora_linear, dora_linear_checks, dora_norm, dora_norm_op)
from lowrank.ops.ia3 import (IA3LinearFunction, ia3_backward, ia3_forward, ia3_linear,
                             ia3_linear_checks)
from lowrank.ops.lora import (LoraLinearFunction, dropout_seed, lora_dropout_mask, lora_forward,
                              lora_grad_a, lora_grad_input, lora_linear,
                              lora_linear_checks, lora_output_grad)
from lowrank.ops.lora_grouped import (LoraGroupedFunction, expert_offsets, lora_grouped,
                                      lora_grouped_checks)
from lowrank.ops.lora_mixed import lora_mixed, lora_mixed_checks, lora_mixed_forward
from lowrank.ops.lora_mlp import (LoraMLPFunction, LoraProjection, gated_activation,
                                  gated_activation_backward, lora_mlp)
from lowrank.ops.lora_qkv import LoraQKVFunction, lora_qkv
from lowrank.ops.lora_steps import lora_expand, lora_shrink
from lowrank.ops.merge import (ia3_merge, lora_merge, merge_ia3, merge_ia3_, merge_lora,
                               merge_lora_, unmerge_ia3_, unmerge_lora_)
from lowrank.ops.nf4 import nf4_dequantize, nf4_quant_state, nf4_quantize, nf4_quantize_absmax

__all__ = ["FrozenWeight", "LoraLinearFunction", "IA3LinearFunction", "lora_linear", "ia3_linear",
           "lora_linear_checks", "ia3_linear_checks",
           "lora_mixed", "lora_mixed_checks", "lora_mixed_forward",
           "LoraGroupedFunction", "lora_grouped", "lora_grouped_checks", "expert_offsets",
           "merge_lora", "merge_lora_", "unmerge_lora_", "merge_ia3", "merge_ia3_", "unmerge_ia3_",
           "dropout_seed", "lora_dropout_mask", "lora_forward", "lora_grad_input", "lora_grad_a",
           "lora_output_grad",
           "ia3_forward", "ia3_backward", "LoraMLPFunction", "LoraProjection", "lora_mlp",
           "LoraQKVFunction", "lora_qkv",
           "gated_activation", "gated_activation_backward", "lora_shrink", "lora_expand",
           "lora_merge", "ia3_merge", "nf4_dequantize",
           "nf4_quantize", "nf4_quantize_absmax", "nf4_quant_state", "DoraLinearFunction",
           "dora_linear", "dora_linear_checks", "dora_norm", "dora_norm_op", "dora_forward", "dora_grad_input",
           "dora_grad_scale"]
