"""The limits every launched kernel is held to (tests/test_compile_gpu.py runs them in CI). Each
takes build records (``bench.static.build``) and returns the failures, one line each: empty when
the gate passes. Pure functions: the test process (Triton's interpreter) imports them too."""

from bench.static.limits import ARCHS

# Instructions per decoded NF4 weight element in a GEMM's hot loop (or per element of the
# dequantize kernel), per arch, read where the SASS is read (sm_89, sm_90), every config of every
# autotuned list included: today's worst plus ~10% (triton 3.9). sm_89: the nested dequantize
# kernel at 10.5 (the mixed-adapter segmented forward 11.1 at 64 x 64 x 32, 7.4 at 64 x 128 x
# 64); sm_90: the nested dequantize kernel at 11.0. History: sm_89 15.7 with the IA3 scales in
# the loop, 12.6 after, 18.9 before the decoded tile's layout, the mma.sync operands' kWidth and
# the lookup's address (_weight.gemm_operand, nf4_dequantize.decode_nf4_pairs); sm_90 12.0 and
# 11.4.
NF4_INSTRUCTIONS_PER_ELEMENT = {89: 12, 90: 12}

# The fused LoRA and IA3 GEMMs (kernels/lora_linear.py, ia3_linear.py), held closer: the target
# is <= 8 everywhere. sm_89: 7.8 at worst (the nested LoRA dX at 64 x 32 x 128; 8.2 before the
# nested absmax offset was loaded once per program, 8.7 in 4 stages): held to 8. sm_90: 8.2 at
# worst, the nested forwards' 256-row tiles (LoRA 8.1, IA3 8.2; their plain NF4 7.7-7.8, the
# 256-row dX 7.5 / 7.9, the 64- and 128-row tiles 6.2-7.1): held to 8.5. The 256-row tiles were
# 9.0-9.5 before the forward decoded whole packed words in wgmma's register layout (x then read
# 16 bytes wide, not 4), the dX's wgmmas ran unserialized and the absmax was indexed in int32
# (kernels/_weight.py: decode_register_order, load_packed_words, load_group_absmax); 12.2 and
# 11.5 before the codes moved to shared memory. The mixed-adapter segmented forward
# (kernels/lora_mixed.py: the LoRA forward's GEMM on rows gathered per adapter) at 64 x 128 x 64:
# sm_89 6.9 / 7.2 (NF4 / nested), sm_90 6.2 / 6.5 (4096 x 4096 x 14336, 16 adapters).
FUSED_GEMMS = {"_lora_forward_kernel", "_lora_grad_input_kernel", "_ia3_forward_kernel",
               "_ia3_grad_input_kernel", "_ia3_grad_scale_kernel",
               "_lora_mixed_segment_forward_kernel"}
FUSED_GEMM_INSTRUCTIONS_PER_ELEMENT = {89: 8, 90: 8.5}


def name(record):
    return f"{record['case']} {record['kernel']} sm_{record['arch']}"


def is_gemm(record):
    return "BLOCK_M" in record["constexprs"]


def resources(records):
    """Shared memory within the arch's per-block limit; registers within 255 per thread and the
    register file per block."""
    failures = []
    for r in records:
        limits = ARCHS[r["arch"]]
        if r["shared"] > limits.shared_per_block:
            failures.append(f"{name(r)}: {r['shared']} bytes of shared memory "
                            f"> {limits.shared_per_block}")
        if r["registers"] > limits.max_registers_per_thread:
            failures.append(f"{name(r)}: {r['registers']} registers per thread")
        if r["registers"] * 32 * r["num_warps"] > limits.registers:
            failures.append(f"{name(r)}: {r['registers']} registers x {32 * r['num_warps']} threads "
                            f"> {limits.registers}")
    return failures


# Shared memory a block gets without opting in. Triton's launcher opts a kernel in (raises its
# dynamic limit) only when the dynamic part, Triton's own, is over it: a kernel with static shared
# memory of its own (the NF4 codes' array declared in inline PTX, _weight.frozen_codes) must then
# keep static + dynamic within it, or its launch fails.
SHARED_WITHOUT_OPT_IN = 48 * 1024

# Static shared memory cuobjdump reports that is the block's reserved shared memory (CUDA's
# reservedSharedMemoryPerBlock, 1 KB from sm_80 on), outside the 48 KB and the opt-in limit (sm_90:
# 227 KB a block of 228 KB an SM). On sm_90 ptxas lays it out in the cubin (triton 3.9, the
# sm_90 builds of the static cache at cc6acd9): all 390 with dynamic shared memory report 1024
# static bytes beyond their own declarations, the 96 without report none, and sm_89 reports only
# the NF4 codes' array; the dense forward at (37, 72, 50) declares no shared variable in its PTX
# but Triton's extern ``global_smem``, a 1 KB ``.nv.shared.<kernel>`` section in its cubin, and its
# SASS addresses global_smem from 0x400 (``UMOV UR5, 0x400`` into SR_CgaCtaId's window): the
# window's first 1 KB is the reserve. Unconfirmed on a GPU (issue 21's pass).
RESERVED_STATIC_SHARED = {90: 1024}


def own_static_shared(record):
    """The static shared memory a build declares itself, the reserve left out."""
    return max(0, record["static_shared"] - RESERVED_STATIC_SHARED.get(record["arch"], 0))


def launch_without_opt_in(records):
    """Static + dynamic shared memory within what a launch gets without opting in, wherever
    Triton's launcher does not opt in (its dynamic part at most 48 KB)."""
    failures = []
    for r in records:
        dynamic = r["shared"] - r["static_shared"]
        static = own_static_shared(r)
        if static and dynamic <= SHARED_WITHOUT_OPT_IN < static + dynamic:
            failures.append(f"{name(r)}: {static} bytes of static shared memory + "
                            f"{dynamic} dynamic > {SHARED_WITHOUT_OPT_IN} (no opt-in)")
    return failures


def spills(records):
    """No local memory: registers spilled by ptxas (or arrays it could not keep in registers)."""
    return [f"{name(r)}: {r['stack']} bytes of stack, {r['local']} of local memory"
            for r in records if r["stack"] or r["local"]]


def two_ctas_per_sm(records):
    """GEMMs leave room for a second CTA per SM (so one CTA's loads overlap another's MMAs)."""
    return [f"{name(r)}: {r['ctas_per_sm']} CTA/SM, limited by {r['occupancy_limiter']} "
            f"({r['shared']} bytes shared, {r['registers']} registers)"
            for r in records if is_gemm(r) and r["ctas_per_sm"] < 2]


# wgmma multiplies 64 rows per warpgroup: GEMMs with BLOCK_M >= 64 rows can use it, except these,
# whose products (dA = dS^T x; the grouped dA / dB per expert) have the rank's 16 rows (BLOCK_M is
# their reduction there).
SMALL_M_PRODUCTS = {"_lora_grad_a_kernel", "_grouped_weight_grad_kernel"}


def wgmma(records):
    """Large-M GEMMs (tiles of 64 rows or more) use sm_90's wgmma, not mma.sync."""
    return [f"{name(r)}: {r['loop']['mma']} in the hot loop" for r in records
            if r["arch"] == 90 and r["constexprs"].get("BLOCK_M", 0) >= 64
            and r["kernel"] not in SMALL_M_PRODUCTS and r["loop"] and r["loop"]["mma"] != "wgmma"]


# Kernels that also add a rank-r product to every decoded element (DoRA's norm adds s B A, on
# tensor cores as tf32x3: the split of each A tile into halves, the product's layout change and
# the add): their ceiling is raised by RANK_PRODUCT_ALLOWANCE[arch], today's worst plus ~10%.
# Measured (triton 3.9, BLOCK_R 16): 21.0 / 21.9 (NF4 / nested) on sm_90 (BLOCK_N 64, BLOCK_K
# 64), 29.6 / 30.3 on sm_89 (BLOCK_K 32), of which the decode is ~4 (the same loop over a dense
# weight): the rest is the rank product, not the decode. Before the codes in shared memory 22.0 /
# 22.5 and 31.2 / 32.2; before the cheaper lookup address 21.6 / 22.5 and 32.2 / 34.2; before,
# as IEEE fp32 on the FMA units, 40.4 / 43.8 and 40.2 / 43.4.
RANK_PRODUCT_PER_ELEMENT = {"_dora_norm_kernel"}
RANK_PRODUCT_ALLOWANCE = {89: 21, 90: 13}


def nf4_ceiling(record, ceiling):
    arch = record["arch"]
    if record["kernel"] in FUSED_GEMMS:
        return min(ceiling[arch], FUSED_GEMM_INSTRUCTIONS_PER_ELEMENT[arch])
    rank_product = record["kernel"] in RANK_PRODUCT_PER_ELEMENT
    return ceiling[arch] + (RANK_PRODUCT_ALLOWANCE[arch] if rank_product else 0)


def nf4_instructions(records, ceiling=NF4_INSTRUCTIONS_PER_ELEMENT):
    """Instructions per decoded NF4 element at most ``ceiling[arch]`` (plus
    RANK_PRODUCT_ALLOWANCE[arch] for the kernels of RANK_PRODUCT_PER_ELEMENT; at most
    FUSED_GEMM_INSTRUCTIONS_PER_ELEMENT[arch] for the FUSED_GEMMS)."""
    return [f"{name(r)}: {r['instructions_per_element']:.1f} instructions per NF4 element "
            f"> {nf4_ceiling(r, ceiling)}" for r in records if r["arch"] in ceiling
            and (r.get("instructions_per_element") or 0) > nf4_ceiling(r, ceiling)]
