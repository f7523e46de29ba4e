"""What each GPU architecture allows per SM and per block, and the occupancy that follows."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    """Per-SM limits of a compute capability (CUDA C++ Programming Guide, its compute capability
    table): shared memory per SM and the most one block may opt in to, warps and blocks per SM."""

    shared_per_sm: int
    shared_per_block: int
    max_warps: int
    max_ctas: int
    registers: int = 65536
    max_registers_per_thread: int = 255
    reserved_shared_per_cta: int = 1024  # the driver's, on sm_80 and later


ARCHS = {80: Arch(164 * 1024, 163 * 1024, 64, 32), 86: Arch(100 * 1024, 99 * 1024, 48, 16),
         89: Arch(100 * 1024, 99 * 1024, 48, 24), 90: Arch(228 * 1024, 227 * 1024, 64, 32)}


def occupancy(arch, registers, num_warps, shared):
    """(CTAs resident per SM, what limits them: "registers", "shared", "warps" or "blocks")."""
    limits = ARCHS[arch]
    per_warp = -(-registers * 32 // 256) * 256  # registers are allocated per warp, 256 at a time
    bounds = {"registers": limits.registers // max(1, per_warp * num_warps),
              "shared": limits.shared_per_sm // (shared + limits.reserved_shared_per_cta),
              "warps": limits.max_warps // num_warps, "blocks": limits.max_ctas}
    limiter = min(bounds, key=bounds.get)
    return bounds[limiter], limiter
