"""Where an op runs: the one place that decides between the Triton kernels and the reference.

- CUDA tensors: the Triton kernels, compiled for the GPU.
- CPU tensors with ``TRITON_INTERPRET=1`` set before lowrank is imported: the same kernels, run by
  Triton's interpreter (how the test suite checks them on machines without a GPU).
- CPU tensors otherwise: ``lowrank.reference``, plain PyTorch with the same results.
"""

import torch

from lowrank.kernels import INTERPRETER


def use_kernels(**tensors):
    """True to run the Triton kernels on these tensors, False to run the reference.

    Tensors are passed by name (None ones are skipped) so that a device mismatch names them.
    """
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"lowrank: tensors must be on one device, got {where}")
    device = next(iter(devices.values()))
    check_device(device)
    return device.type == "cuda" or INTERPRETER


def check_device(device):
    """A NotImplementedError for a device lowrank's ops do not run on (neither CUDA nor CPU)."""
    if device.type not in ("cuda", "cpu"):
        raise NotImplementedError(
            f"lowrank: no kernels for device type {device.type!r}; use CUDA tensors, or CPU "
            "tensors (reference implementation)")


def backend_name(device):
    """'triton', 'triton-interpreter' or 'reference': what ops on ``device`` run."""
    device = torch.device(device)
    if device.type == "cuda":
        return "triton"
    return "triton-interpreter" if INTERPRETER else "reference"
