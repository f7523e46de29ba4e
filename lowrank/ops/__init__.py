"""lowrank's fused ops. One module per op, holding its autograd Function (where it has gradients),
its torch.library custom ops with their fake implementations (the launch primitives that
torch.compile traces through) and its public function, which checks the arguments and asks
``lowrank._dispatch`` whether to run the kernels or ``lowrank.reference``:

- ``lora``: ``lora_linear`` (``LoraLinearFunction``), LoRA / QLoRA linear.
- ``dora``: ``dora_linear`` (``DoraLinearFunction``), DoRA linear, and ``dora_norm``.
- ``ia3``: ``ia3_linear`` (``IA3LinearFunction``), IA3 linear.
- ``lora_mixed``: ``lora_mixed``, LoRA linear with one adapter per row (inference).
- ``merge``: ``merge_lora`` / ``merge_ia3`` and their in-place forms.
- ``nf4``: the NF4 quantize / dequantize custom ops behind ``lowrank.nf4``.
- ``gradients``: ``InputGradients``, with which each backward returns its gradients by name.

Every op takes the frozen weight as one ``FrozenWeight`` (``lowrank.frozen_weight``), or builds it
from a dense tensor, or packed NF4 with its quant state.
"""

from lowrank.frozen_weight import FrozenWeight
from lowrank.ops.dora import (DoraLinearFunction, dora_forward, dora_grad_input, dora_linear,
                              dora_norm, dora_norm_op)
from lowrank.ops.ia3 import IA3LinearFunction, ia3_backward, ia3_forward, ia3_linear
from lowrank.ops.lora import (LoraLinearFunction, dropout_seed, lora_dropout_mask, lora_forward,
                              lora_grad_a, lora_grad_input, lora_linear)
from lowrank.ops.lora_mixed import lora_mixed, lora_mixed_forward
from lowrank.ops.merge import (ia3_merge, lora_merge, merge_ia3, merge_ia3_, merge_lora,
                               merge_lora_, unmerge_ia3_, unmerge_lora_)
from lowrank.ops.nf4 import nf4_dequantize, nf4_quant_state, nf4_quantize, nf4_quantize_absmax

__all__ = ["FrozenWeight", "LoraLinearFunction", "IA3LinearFunction", "lora_linear", "lora_mixed", "lora_mixed_forward", "ia3_linear",
           "merge_lora", "merge_lora_", "unmerge_lora_", "merge_ia3", "merge_ia3_", "unmerge_ia3_",
           "dropout_seed", "lora_dropout_mask", "lora_forward", "lora_grad_input", "lora_grad_a",
           "ia3_forward", "ia3_backward", "lora_merge", "ia3_merge", "nf4_dequantize",
           "nf4_quantize", "nf4_quantize_absmax", "nf4_quant_state", "DoraLinearFunction",
           "dora_linear", "dora_norm", "dora_norm_op", "dora_forward", "dora_grad_input"]
