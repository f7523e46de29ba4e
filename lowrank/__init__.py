"""lowrank: fused Triton kernels for parameter-efficient fine-tuning (LoRA, QLoRA, IA3).

Ops run as Triton kernels on CUDA tensors, in Triton's interpreter on CPU tensors when
``TRITON_INTERPRET=1`` is set before import, and as plain PyTorch (``lowrank.reference``) on CPU
otherwise. ``lowrank.patch_model`` puts them into a Hugging Face model's linear layers.
"""

from lowrank import nf4, ops, reference
from lowrank.adapters import save_adapter
from lowrank.fallbacks import reset_stats, stats
from lowrank.modules import IA3Linear, LoraExperts, LoraLinear
from lowrank.patch import (delete_adapter, disable_adapters, load_adapter, merge, merge_and_unload,
                           patch_model, print_trainable_parameters, set_adapter,
                           trainable_parameters, unmerge, unpatch)
from lowrank.hotswap import hotswap_adapter
from lowrank.mixed import mixed_batch
from lowrank.peft_backend import patch_peft_model, unpatch_peft_model
from lowrank.weighted import add_weighted_adapter

__version__ = "0.1.0"

__all__ = ["nf4", "ops", "reference", "patch_model", "unpatch", "merge", "unmerge",
           "merge_and_unload", "set_adapter", "disable_adapters",
           "delete_adapter", "trainable_parameters", "print_trainable_parameters", "save_adapter",
           "load_adapter", "add_weighted_adapter", "hotswap_adapter", "mixed_batch",
           "patch_peft_model", "unpatch_peft_model", "stats", "reset_stats", "LoraLinear",
           "IA3Linear", "LoraExperts",
           "__version__"]
