"""Reading SASS (``nvdisasm -c`` listings): the loops, and what kind of instruction each one runs.

A loop is a backward branch: its body runs from the branch's target label to the branch. Counts are
static instructions per warp per iteration, grouped as the report shows them (tensor core, global
loads by width, cp.async, shared loads and stores, integer, float, conversions, control).

An instruction guarded by ``@!PT`` ("not true") never executes: ptxas emits them as padding (e.g.
``@!PT LDS RZ, [RZ]`` in sm_90's GEMM loops). We keep them in the instruction counts, so in the
model's issue limit, as NOPs: we take a guarded-off instruction to be fetched and issued like any
other (not measured; if the hardware drops this padding before issue, counting it overstates the
issue limit by these few slots per loop, an upper bound). The mix files them under "control"
beside the NOPs, and they move no bytes and do no flops (``executed``).
"""

import re
from collections import Counter

INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:(@!?U?P[T0-9]+)\s+)?([A-Z0-9_]+)((?:\.[A-Za-z0-9_]+)*)")
NEVER = ("@!PT", "@!UPT")  # guards that are always false
LABEL = re.compile(r"^\s*(\.L_x_\d+):")
BRANCH_TARGET = re.compile(r"BRA\s+`?\(?(\.L_x_\d+)")

WGMMA = {"HGMMA", "QGMMA", "IGMMA", "BGMMA"}  # Hopper's warpgroup MMA (wgmma)
MMA_SYNC = {"HMMA", "IMMA", "DMMA"}  # mma.sync, every architecture since sm_80
INTEGER = {"IMAD", "IADD3", "LOP3", "SHF", "LEA", "ISETP", "SEL", "PRMT", "IABS", "BMSK", "SGXT",
           "IMNMX", "VIMNMX", "POPC", "FLO", "MOV", "IMUL", "IADD", "SHL", "SHR", "LOP", "P2R", "R2P",
           "PLOP3", "BREV", "IDP", "VIADD", "ICMP", "ISCADD", "CS2R", "S2R", "PSETP", "VOTE", "SHFL",
           "MATCH"}
FLOAT = {"FMUL", "FADD", "FFMA", "FSETP", "FSEL", "FMNMX", "FCHK", "HADD2", "HMUL2", "HFMA2", "FSET",
         "DADD", "DMUL", "DFMA", "HMNMX2", "HSETP2", "MUFU"}
CONVERT = {"F2F", "F2FP", "I2F", "F2I", "I2I", "I2FP", "F2IP", "FRND"}
WIDTHS = ("U8", "S8", "U16", "S16", "64", "128")


def category(opcode, modifiers):
    """The report's group of one instruction, e.g. "tensor", "LDG.U8", "LDGSTS.128", "int"."""
    if opcode in WGMMA or opcode in MMA_SYNC:
        return "tensor"
    if opcode in ("LDG", "LDS", "STS", "STG", "LDGSTS", "LDL", "STL"):
        width = next((m for m in modifiers.split(".") if m in WIDTHS), "32")
        return f"{opcode}.{width}"
    if opcode in ("LDSM", "UTMALDG", "ATOM", "RED", "LDC"):
        return opcode
    if opcode.startswith("U"):
        return "uniform"  # the warp-uniform datapath: address and loop bookkeeping
    if opcode in INTEGER:
        return "int"
    if opcode in FLOAT:
        return "float"
    if opcode in CONVERT:
        return "convert"
    return "control"  # branches, barriers, wgmma fences, NOPs


def parse(listing):
    """[(opcode, modifiers)] in order, and {label: index of the instruction it precedes}."""
    instructions, labels = [], {}
    for line in listing.splitlines():
        label = LABEL.match(line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        found = INSTRUCTION.search(line)
        if found:
            instructions.append((found.group(2), found.group(3), line))
    return instructions, labels


def never_executed(line):
    """Whether the instruction on ``line`` is guarded by an always-false predicate (padding)."""
    return INSTRUCTION.search(line).group(1) in NEVER


def executed(body):
    """The instructions of ``body`` that can execute: all but the never-executed ones."""
    return [instruction for instruction in body if not never_executed(instruction[2])]


def loops(listing):
    """Each loop's instructions, as [(opcode, modifiers, line)], in order of their branches."""
    instructions, labels = parse(listing)
    found = []
    for end, (opcode, _, line) in enumerate(instructions):
        target = BRANCH_TARGET.search(line) if opcode == "BRA" else None
        if target and labels.get(target.group(1), end + 1) < end:
            found.append(instructions[labels[target.group(1)]:end + 1])
    return found


def mix(body):
    """{category: instructions} of a loop body (or a whole kernel), largest first; a
    never-executed instruction is "control", as the NOP it amounts to."""
    return dict(Counter("control" if never_executed(line) else category(op, mods)
                        for op, mods, line in body).most_common())


def mma_kind(body):
    """"wgmma", "mma.sync" or None: the tensor-core instructions ``body`` issues."""
    opcodes = {op for op, _, _ in executed(body)}
    if opcodes & WGMMA:
        return "wgmma"
    return "mma.sync" if opcodes & MMA_SYNC else None


def hot_loop(listing):
    """The loop a kernel spends its time in: if any loop issues MMAs, the one whose MMAs do the
    most flops per iteration (a GEMM's reduction over its tile), the longest of those tied; else
    the longest; None for straight-line kernels.

    Not simply the longest MMA loop: a GEMM may run a second, thinner MMA loop after its
    reduction (the grouped GEMM's LoRA expand, BLOCK_M x BLOCK_N x BLOCK_R per iteration, once at
    rank 16), which the scaling of its operand can make longer in instructions than the K loop.
    Ties are left to length, which can still be wrong: the dense split-K decode at 8 warps reads
    its loop over rank blocks (its shrink's K loop inside, each warp repeating the 16 x 16
    product) at its base GEMM loop's flops and picks it, the longer. Taking innermost loops
    instead would misread the DoRA norm, whose K loop holds a one-trip rank loop."""
    found = [body for body in loops(listing) if len(body) >= 8]  # shorter: trap and spin loops
    if not found:
        return None
    with_mma = [body for body in found if mma_kind(body)]
    if not with_mma:
        return max(found, key=len)
    # Any warp count orders the loops alike: every loop's flops scale with it in the same way.
    return max(with_mma, key=lambda body: (mma_flops(body, num_warps=4), len(body)))


def instructions(listing):
    return parse(listing)[0]


MMA_SHAPE = re.compile(r"^\.(?:(\d+)x(\d+)x(\d+)|(16)(8)(16)|(16)(8)(8))\.")


def mma_flops(body, num_warps):
    """Floating-point operations the MMAs of ``body`` do per CTA: a wgmma (HGMMA.64xNx16) is
    issued by each of a warpgroup's 4 warps for one M x N x K product, an mma.sync (HMMA.16816,
    HMMA.1688) by one warp for its own."""
    flops = 0
    for opcode, modifiers, _ in executed(body):
        shape = MMA_SHAPE.match(modifiers) if opcode in WGMMA | MMA_SYNC else None
        if shape:
            m, n, k = (int(g) for g in shape.groups() if g)
            flops += 2 * m * n * k * (num_warps / 4 if opcode in WGMMA else num_warps)
    return flops


WIDTH_BYTES = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "32": 4, "64": 8, "128": 16}


def is_table_lookup(opcode, modifiers):
    """A lookup in an NF4 code table: in lowrank's kernels the only non-coherent global loads
    (``ld.global.nc``, SASS ``LDG...CONSTANT``) are the inline-PTX lookups of
    kernels/nf4_dequantize.py, whose table stays in L1."""
    return opcode == "LDG" and ".CONSTANT" in modifiers


# The NF4 code tables by lookup width, as kernels/nf4_dequantize.py reads them: an 8-byte lookup
# is a row of the 256-entry pair table (2 KB: 16 lines of 128 bytes), a 4-byte one a code of its
# first 16 rows (128 bytes: one line).
TABLE_LINES = {"64": 16, "32": 1}


def table_wavefronts(body, num_warps):
    """L1 wavefronts per CTA of ``body``'s table lookups: a warp's load takes one per distinct
    128-byte line its 32 lanes touch, for random codes on average L x (1 - (1 - 1/L)^32) of a
    table of L lines (13.97 of the pair table's 16, 1 for the 16-entry codes)."""
    wavefronts = 0.0
    for opcode, modifiers, _ in executed(body):
        if is_table_lookup(opcode, modifiers):
            lines = TABLE_LINES[category(opcode, modifiers).split(".")[-1]]
            wavefronts += lines * (1 - (1 - 1 / lines) ** 32) * num_warps
    return wavefronts


# A wgmma whose A operand is a register: its destination, then a register (not a ``gdesc``).
WGMMA_REGISTER_A = re.compile(r"GMMA\S*\s+R\d+,\s*R\d+,")


def memory_bytes(body, num_warps):
    """(global bytes streamed, shared-memory bytes moved) per CTA by ``body``'s instructions, as
    if every lane of every warp were active (an upper bound where masks predicate lanes off).

    Global: vector loads (64/128-bit: the operand tiles), sub-word loads (packed NF4 bytes) and
    cp.async copies of any width (LDGSTS: tiles staged in shared memory, 4 bytes wide where their
    columns come in pairs). 32-bit loads into registers
    are counted as L1 hits, not L2 traffic: in these kernels they are gathers from small tables
    (NF4 code values, absmax, IA3 scales), which many lanes share; so are the NF4 code-table
    lookups of any width (``is_table_lookup``: their cost is ``table_wavefronts``).
    Shared: LDS/STS/LDSM, the shared-memory side of cp.async, and wgmma reading 16-bit operands
    from shared memory: both (``HGMMA... R24, gdesc[UR8], R24``), or only B where A is a register
    operand (``HGMMA... R24, R164, gdesc[UR12], R24``: Hopper's wgmma takes A from registers).
    Never-executed instructions (``@!PT LDS RZ, [RZ]``) move nothing."""
    global_bytes = shared_bytes = 0
    for opcode, modifiers, line in executed(body):
        group = category(opcode, modifiers)
        width = WIDTH_BYTES.get(group.split(".")[-1], 0) * 32 * num_warps
        if (opcode == "LDGSTS" or opcode == "LDG" and not group.endswith(".32")
                and not is_table_lookup(opcode, modifiers)):
            global_bytes += width
        if opcode in ("LDS", "STS", "LDGSTS"):
            shared_bytes += width
        elif opcode == "LDSM":  # ldmatrix: 1, 2 or 4 8x8 tiles of 16-bit values per warp
            shared_bytes += 128 * (4 if ".4" in modifiers else 2 if ".2" in modifiers else 1) * num_warps
        elif opcode in WGMMA:
            m, n, k = (int(g) for g in MMA_SHAPE.match(modifiers).groups() if g)
            a_rows = 0 if WGMMA_REGISTER_A.search(line) else m
            shared_bytes += (a_rows + n) * k * 2 * num_warps / 4
    return global_bytes, shared_bytes
