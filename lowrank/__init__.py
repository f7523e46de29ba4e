"""lowrank: fused Triton kernels for parameter-efficient fine-tuning (LoRA, QLoRA, IA3).

Ops run as Triton kernels on CUDA tensors, in Triton's interpreter on CPU tensors when
``TRITON_INTERPRET=1`` is set before import, and as plain PyTorch (``lowrank.reference``) on CPU
otherwise.
"""

from lowrank import nf4, ops, reference

__version__ = "0.1.0"

__all__ = ["nf4", "ops", "reference", "__version__"]
