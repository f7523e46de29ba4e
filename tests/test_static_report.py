"""The static report's readers and model on small made-up inputs (no compiler needed): the SASS
loop reader, occupancy, the model's limits, and the committed report's consistency."""

import json
from pathlib import Path

import pytest

from bench.static import model, sass, table
from bench.static.limits import occupancy

LISTING = """
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_1:
        /*0010*/                   LDG.E.U8 R2, desc[UR4][R4.64] ;
        /*0020*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R6.64] ;
        /*0030*/                   IMAD.WIDE R4, R5, 0x2, R4 ;
        /*0040*/                   LOP3.LUT R7, R2, 0xf, RZ, 0xc0, !PT ;
        /*0050*/                   FMUL R8, R8, R9 ;
        /*0060*/                   F2FP.BF16.F32.PACK_AB R8, R8, R8 ;
        /*0070*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0080*/                   ISETP.GE.AND P0, PT, R5, R6, PT ;
        /*0090*/              @!P0 BRA `(.L_x_1) ;
        /*00a0*/                   STL [R1], R2 ;
        /*00b0*/                   EXIT ;
.L_x_2:
        /*00c0*/                   BRA `(.L_x_2);
"""


def test_the_hot_loop_is_the_backward_branch_with_mmas():
    loop = sass.hot_loop(LISTING)
    assert len(loop) == 9 and sass.mma_kind(loop) == "wgmma"
    assert sass.mix(loop) == {"int": 3, "LDG.U8": 1, "LDGSTS.128": 1, "float": 1, "convert": 1,
                              "tensor": 1, "control": 1}
    # One wgmma per warp of each warpgroup: a 64x64x16 product per 4 warps.
    assert sass.mma_flops(loop, num_warps=8) == 2 * 2 * 64 * 64 * 16
    global_bytes, shared_bytes = sass.memory_bytes(loop, num_warps=4)
    assert global_bytes == (1 + 16) * 32 * 4
    assert shared_bytes == 16 * 32 * 4 + (64 + 64) * 16 * 2
    assert sum(op == "STL" for op, _, _ in sass.instructions(LISTING)) == 1


def test_occupancy_names_its_limiter():
    assert occupancy(89, registers=96, num_warps=4, shared=60000) == (1, "shared")
    assert occupancy(90, registers=90, num_warps=4, shared=25600) == (5, "registers")
    assert occupancy(90, registers=24, num_warps=4, shared=0) == (16, "warps")


def record(**changes):
    base = {"case": "c", "kernel": "_lora_forward_kernel", "grid": [64, 224], "num_warps": 4,
            "ctas_per_sm": 4,
            "ints": {"K": 4096}, "constexprs": {"BLOCK_K": 32}, "instructions": 600,
            "tensor_bytes": 10**8, "loop": {"instructions": 500, "mma": "wgmma", "flops": 2 * 64**2 * 32,
                                            "global_bytes": 4096, "shared_bytes": 8192}}
    return {**base, **changes}


def test_model_takes_the_slowest_limit():
    h100 = model.DEVICES["H100 SXM"]
    estimate = model.launch_time(record(), h100)
    assert estimate["bound"] == "issue"
    ctas_per_sm = -(-64 * 224 // h100.sms)
    issue = ctas_per_sm * (100 + 500 * 128) * 4 / model.ISSUE_PER_CLOCK / h100.clock_hz
    assert estimate["seconds"] == pytest.approx(issue)
    memory_bound = model.launch_time(record(tensor_bytes=10**11), h100)
    assert memory_bound["bound"] == "DRAM"
    # One CTA of 4 warps per SM: one warp per scheduler, a quarter of the issue rate.
    latency_bound = model.launch_time(record(ctas_per_sm=1), h100)
    assert latency_bound["issue"] == pytest.approx(4 * estimate["issue"])
    case = model.case_estimate([record()], h100, ("gemm", 2 * 4096**3))
    assert case["ratio"] == pytest.approx(2 * 4096**3 / h100.cublas_flops / estimate["seconds"])


def test_committed_static_report_renders():
    reports = sorted(Path(__file__).parents[1].glob("bench/results/static-*.json"))
    assert reports, "run python -m bench.static and commit its JSON"
    report = json.loads(reports[-1].read_text())
    text = table.render(report)
    assert "not measurements" in text and "_lora_forward_kernel" in text
    assert {"90", "89"} <= set(report["archs"])
