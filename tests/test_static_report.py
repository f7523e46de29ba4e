"""The static report's readers and model on small made-up inputs (no compiler needed): the SASS
loop reader, occupancy, the model's limits, and the committed report's consistency."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.report import load_static
from bench.static import gates, model, sass, table
from bench.static.limits import ARCHS, occupancy

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


TABLE_LOOKUPS = """
.L_x_3:
        /*0000*/                   LDG.E.64.CONSTANT R10, desc[UR12][R10.64] ;
        /*0010*/                   LDG.E.CONSTANT R12, desc[UR12][R12.64] ;
        /*0020*/                   LDG.E.64 R14, desc[UR12][R14.64] ;
        /*0030*/                   LDS.64 R16, [R5] ;
        /*0040*/                   FMUL R13, R11, R38 ;
        /*0050*/                   FMUL R13, R11, R38 ;
        /*0060*/                   FMUL R13, R11, R38 ;
        /*0070*/                   ISETP.GE.AND P0, PT, R5, R6, PT ;
        /*0080*/              @!P0 BRA `(.L_x_3) ;
"""


def test_table_lookups_are_l1_wavefronts_not_l2_bytes():
    """An 8-byte lookup in the 2 KB pair table touches ~14 of its 16 lines per warp, a 4-byte one
    in the 16 codes one line; neither streams from L2. The plain LDG.64 does."""
    loop = sass.hot_loop(TABLE_LOOKUPS)
    assert sass.table_wavefronts(loop, num_warps=4) == pytest.approx(4 * (16 * (1 - (15 / 16) ** 32) + 1))
    assert sass.memory_bytes(loop, num_warps=4) == (8 * 32 * 4, 8 * 32 * 4)
    h100 = model.DEVICES["H100 SXM"]
    lookups = {"instructions": 1, "mma": None, "flops": 0, "global_bytes": 0, "shared_bytes": 128,
               "table_wavefronts": 1000.0}
    estimate = model.launch_time(record(loop=lookups, tensor_bytes=1), h100)
    assert estimate["bound"] == "L1"
    assert estimate["L1"] == pytest.approx(estimate["shared"] * (1000 + 1))


CP_ASYNC_PAIRS = """
.L_x_8:
        /*0000*/                   LDGSTS.E [R231], desc[UR14][R228.64], !P6 ;
        /*0010*/                   LDGSTS.E [R231+0x400], desc[UR14][R176.64], !P6 ;
        /*0020*/                   LDGSTS.E.64 [R183+0x18000], desc[UR14][R178.64], P4 ;
        /*0030*/                   LDG.E R12, desc[UR14][R12.64] ;
        /*0040*/                   HGMMA.64x256x16.F32.BF16 R24, R176, gdesc[UR20], R24 ;
        /*0050*/                   ISETP.GE.AND P0, PT, R5, R6, PT ;
        /*0060*/                   IADD3 R5, R5, 0x40, RZ ;
        /*0070*/              @!P0 BRA `(.L_x_8) ;
"""


def test_cp_async_copies_of_any_width_stream_from_l2():
    """A 4-byte cp.async (LDGSTS.E, e.g. a tile whose columns come in pairs) stages a
    tile as the wide ones do: L2 bytes, and shared bytes on its way in; a 32-bit load into
    registers (a gather from a small table) stays an L1 hit."""
    loop = sass.hot_loop(CP_ASYNC_PAIRS)
    copies = (4 + 4 + 8) * 32 * 8
    assert sass.memory_bytes(loop, num_warps=8) == (copies, copies + 256 * 16 * 2 * 2)


NEVER_EXECUTED = """
.L_x_4:
        /*0000*/                   LDS.64 R16, [R5] ;
        /*0010*/              @!PT LDS RZ, [RZ] ;
        /*0020*/              @!PT LDS RZ, [RZ] ;
        /*0030*/              @!PT LDG.E.64.CONSTANT RZ, desc[UR12][R10.64] ;
        /*0040*/               @P1 LDS R18, [R6] ;
        /*0050*/                   HMMA.16816.F32.BF16 R24, R16, R18, R24 ;
        /*0060*/                   ISETP.GE.AND P0, PT, R5, R6, PT ;
        /*0070*/              @!P0 BRA `(.L_x_4) ;
"""


def test_never_executed_instructions_move_nothing_but_take_their_issue_slot():
    """``@!PT`` guards padding that never runs: no shared bytes, no lookups, "control" in the mix
    (a NOP), still one of the loop's instructions. A real predicate (``@P1``) may be true."""
    loop = sass.hot_loop(NEVER_EXECUTED)
    assert len(loop) == 8
    assert sass.memory_bytes(loop, num_warps=4) == (0, (8 + 4) * 32 * 4)
    assert sass.table_wavefronts(loop, num_warps=4) == 0
    assert sass.mix(loop) == {"control": 4, "LDS.64": 1, "LDS.32": 1, "tensor": 1, "int": 1}


TWO_MMA_LOOPS = """
.L_x_5:
        /*0000*/                   LDSM.16.M88.4 R16, [R5] ;
        /*0010*/                   HMMA.16816.F32.BF16 R24, R16, R20, R24 ;
        /*0020*/                   HMMA.16816.F32.BF16 R28, R16, R22, R28 ;
        /*0030*/                   IADD3 R5, R5, 0x20, RZ ;
        /*0040*/                   IADD3 R7, R7, 0x20, RZ ;
        /*0050*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R6.64] ;
        /*0060*/                   ISETP.GE.AND P0, PT, R7, R8, PT ;
        /*0070*/              @!P0 BRA `(.L_x_5) ;
.L_x_6:
        /*0080*/                   LDG.E.128 R12, desc[UR4][R10.64] ;
        /*0090*/                   FMUL R12, R12, R9 ;
        /*00a0*/                   FMUL R13, R13, R9 ;
        /*00b0*/                   FMUL R14, R14, R9 ;
        /*00c0*/                   FMUL R15, R15, R9 ;
        /*00d0*/                   F2FP.BF16.F32.PACK_AB R12, R13, R12 ;
        /*00e0*/                   F2FP.BF16.F32.PACK_AB R13, R15, R14 ;
        /*00f0*/                   HMMA.16816.F32.BF16 R24, R16, R12, R24 ;
        /*0100*/                   ISETP.GE.AND P1, PT, R11, R8, PT ;
        /*0110*/              @!P1 BRA `(.L_x_6) ;
"""


def test_the_hot_loop_is_the_mma_loop_with_the_most_flops_per_iteration():
    """A GEMM's K loop, not a longer, thinner MMA loop after it (the grouped GEMM's LoRA expand
    over the rank, its operand scaled first)."""
    loop = sass.hot_loop(TWO_MMA_LOOPS)
    assert len(loop) == 8 and sass.mma_flops(loop, num_warps=4) == 2 * 2 * 16 * 8 * 16 * 4
    assert max(len(body) for body in sass.loops(TWO_MMA_LOOPS)) == 10
    # Tied flops: the longer loop, as before.
    tied = TWO_MMA_LOOPS.replace("HMMA.16816.F32.BF16 R28, R16, R22, R28", "IMAD R28, R16, R22, R28")
    assert len(sass.hot_loop(tied)) == 10


def test_occupancy_names_its_limiter():
    assert occupancy(89, registers=96, num_warps=4, shared=60000) == (1, "shared")
    assert occupancy(90, registers=90, num_warps=4, shared=25600) == (5, "registers")
    assert occupancy(90, registers=24, num_warps=4, shared=0) == (16, "warps")


def record(**changes):
    base = {"case": "c", "kernel": "_lora_forward_kernel", "grid": [64, 224], "num_warps": 4,
            "ctas_per_sm": 4,
            "ints": {"K": 4096}, "constexprs": {"BLOCK_K": 32}, "instructions": 600,
            "tensor_bytes": 10**8, "loop": {"instructions": 500, "mma": "wgmma", "flops": 2 * 64**2 * 32,
                                            "global_bytes": 4096, "shared_bytes": 8192,
                                            "table_wavefronts": 0.0}}
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


def test_the_grouped_weight_grad_loops_over_its_experts_rows():
    """Its rows come from the offsets tensor: the launch's ``rows_per_expert`` (model_ints)."""
    grad = record(kernel="_grouped_weight_grad_kernel", ints={"P": 16, "Q": 64,
                                                              "rows_per_expert": 300},
                  constexprs={"BLOCK_M": 64})
    assert model.trips(grad) == 5
    more_rows = {**grad, "ints": {**grad["ints"], "rows_per_expert": 3000}}
    h100 = model.DEVICES["H100 SXM"]
    assert model.launch_time(more_rows, h100)["tensor"] > model.launch_time(grad, h100)["tensor"]


def test_the_decode_epilogue_loops_over_rank_blocks_not_k_slices():
    """Its hot loop is the LoRA expand's MMA loop over rank blocks (``sass.hot_loop``), which
    holds S's sum over K-slices: counting that loop once per K-slice read its expand 4 times."""
    epilogue = record(kernel="_lora_decode_epilogue_kernel", grid=[224],
                      ints={"M": 16, "N": 14336, "R": 16, "splits": 4},
                      constexprs={"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_R": 16})
    assert model.trips(epilogue) == 1
    assert model.trips({**epilogue, "ints": {**epilogue["ints"], "R": 40}}) == 3


def test_a_grouped_gemm_counts_only_the_row_tiles_its_experts_fill():
    """Its grid is cdiv(rows, BLOCK_M) + E row tiles (an upper bound); 4 experts of 300 rows fill
    3 tiles of 128 each, and the spare ones exit before loading a tile."""
    ints = {"K": 2048, "N": 1536, "rows_per_expert": 300, "experts": 4}
    gemm = record(kernel="_grouped_gemm_kernel", grid=[-(-1200 // 128) + 4, 12], ints=ints,
                  constexprs={"BLOCK_M": 128, "BLOCK_K": 64})
    assert model.working_ctas(gemm) == 4 * 3 * 12
    unknown_rows = {**gemm, "ints": {"K": 2048, "N": 1536}}
    assert model.working_ctas(unknown_rows) == 14 * 12
    dense = record()
    assert model.working_ctas(dense) == 64 * 224


def test_an_autotuned_launch_counts_at_its_best_config():
    h100 = model.DEVICES["H100 SXM"]
    fast, slow = record(config=0, configs=2), record(config=1, configs=2, instructions=6000,
                                                    loop=None)
    other = record(kernel="_lora_shrink_kernel")  # an untuned launch of the same case
    case = model.case_estimate([other, fast, slow], h100, ("gemm", 1))
    times = {name: model.launch_time(r, h100)["seconds"] * 1e6
             for name, r in (("other", other), ("fast", fast), ("slow", slow))}
    assert times["slow"] != times["fast"]
    assert case["model_us"] == pytest.approx(times["other"] + min(times["fast"], times["slow"]))
    assert case["worst_us"] == pytest.approx(times["other"] + max(times["fast"], times["slow"]))
    assert [launch["kernel"] for launch in case["launches"]] == ["_lora_shrink_kernel",
                                                                  "_lora_forward_kernel"]


def test_torch_products_are_modelled_at_cublas_rate_or_copy_bandwidth():
    """The cublas route's GEMMs (``launches.torch_gemm``): no build, the slower of flops at
    cublas_flops and bytes at copy bandwidth; recorded only while a capture asks for them."""
    from bench.static import launches

    h100 = model.DEVICES["H100 SXM"]
    modelled, found = [], []
    with launches.capture("c", found, launches.gpu(90), modelled=modelled):
        launches.torch_gemm(4096, 14336, 4096, (4096 + 14336) * 4096, 4096 * 14336, "x W^T")
        launches.torch_gemm(4096, 14336, 16, 4096 * 14336, 4096 * 14336, "addmm_(S, B)")
    launches.torch_gemm(1, 1, 1, 1, 1, "outside a capture: dropped")
    assert found == [] and [r["kernel"] for r in modelled] == ["torch: x W^T", "torch: addmm_(S, B)"]
    gemm, addmm = (model.launch_time(r, h100) for r in modelled)
    assert gemm["bound"] == "tensor" and gemm["seconds"] == pytest.approx(
        2 * 4096 * 14336 * 4096 / h100.cublas_flops)
    assert addmm["bound"] == "DRAM" and addmm["seconds"] == pytest.approx(
        4 * 4096 * 14336 / h100.dram_bytes_per_s)


def test_the_chosen_route_is_the_cheaper_of_each_pair():
    estimate = {"fused": {"model_us": 5.0, "launches": []}, "slow": {"model_us": 9.0, "launches": []}}
    chosen = model.chosen_routes({"f a": estimate["fused"], "f a route=cublas": estimate["slow"],
                                  "g b": estimate["slow"], "g b route=cublas": estimate["fused"],
                                  "h c": estimate["slow"]})
    assert chosen == {"f a route=chosen": {**estimate["fused"], "route": "fused"},
                      "g b route=chosen": {**estimate["fused"], "route": "cublas"}}


def test_the_chosen_training_step_is_its_chosen_steps_summed():
    """The ops choose the forward's route and dX's apart (``routes.default_route`` per step, a
    calibrated table per key): a training step's chosen row is the fused forward (713 < 717)
    plus the cublas backward (767 < 800), not the cheaper whole step (cublas, 717 + 767)."""
    def estimate(forward, backward, kernel):
        return {"model_us": forward + backward, "ideal": "gemm", "ideal_us": 1289.2,
                "ratio": 1289.2 / (forward + backward), "worst_us": forward + backward,
                "worst_ratio": 1289.2 / (forward + backward), "bound": f"{kernel}: issue",
                "launches": [{"kernel": kernel, "model_us": forward + backward}]}
    shape = "nf4 4096x4096x14336"
    fused = {"forward": estimate(713.2, 0, "fused_forward"),
             "backward": estimate(0, 800.1, "fused_dx")}
    cublas = {"forward": estimate(716.7, 0, "cublas_forward"),
              "backward": estimate(0, 766.7, "cublas_dx")}
    estimates = {f"lora_linear_{step} {shape}{route}": found[step]
                 for route, found in (("", fused), (" route=cublas", cublas))
                 for step in ("forward", "backward")}
    estimates[f"lora_linear_train {shape}"] = estimate(713.2, 800.1, "fused_dx")
    estimates[f"lora_linear_train {shape} route=cublas"] = estimate(716.7, 766.7, "cublas_dx")
    train = model.chosen_routes(estimates)[f"lora_linear_train {shape} route=chosen"]
    assert train["route"] == "fused + cublas"
    assert train["model_us"] == pytest.approx(713.2 + 766.7)
    assert train["ratio"] == pytest.approx(1289.2 / (713.2 + 766.7))
    assert [launch["kernel"] for launch in train["launches"]] == ["fused_forward", "cublas_dx"]
    assert train["bound"] == "cublas_dx: issue"


def test_route_crossovers_from_per_row_costs():
    """M* = dequantize / (fused per row - cublas per row), bounded to a power of two."""
    from bench.static import route_table

    def estimate(us, dequantize=0.0):
        return {"model_us": us, "launches": [{"kernel": "_nf4_dequantize_kernel",
                                              "model_us": dequantize}] if dequantize else []}
    # fused 2 us per row, cublas 1 per row plus 100: they cross at 100 rows.
    assert route_table.crossover(estimate(2000), estimate(1100, 100), 1000) == pytest.approx(100)
    assert route_table.bound(100) == 64 and route_table.bound(0.0) == 0
    assert route_table.crossover(estimate(1000), estimate(1100, 100), 1000) is None
    assert route_table.bound(route_table.crossover(estimate(2000), estimate(1000), 1000)) == 0


def test_each_step_has_its_own_route_bound():
    """``routes.default_route`` is told the step: a forward crossing at ~4400 rows and a
    backward at ~2460 (H100 NF4 after the transposed sm_90 tiles, model) give 4096 for the
    forward (its fused route is the cheaper at 4096 rows) and 2048 for dX, not one bound of 2048
    for both; fused at every M where a step never crosses."""
    from bench.static import route_table

    m, k, n = route_table.TRAIN_SHAPE

    def estimate(us, dequantize=0.0):
        return {"model_us": us, "launches": [{"kernel": "_nf4_dequantize_kernel",
                                              "model_us": dequantize}] if dequantize else []}
    rows = {"forward": (713.2, estimate(716.7, 50.3)), "backward": (800.1, estimate(766.7, 50.2))}
    cases = {}
    for kind in route_table.KINDS:
        for step, (fused, cublas) in rows.items():
            case = f"lora_linear_{step} {kind} {m}x{k}x{n}"
            cases[case], cases[f"{case} route=cublas"] = estimate(fused), cublas
    always_fused = {case: estimate(1.0) if "route=cublas" not in case else estimate(5.0, 1.0)
                    for case in cases}
    report = {"commit": "0" * 10, "model": {"cases": {"H100 SXM": cases, "RTX 4090": always_fused}}}
    table, crossovers = route_table.fused_max_m(report)
    assert crossovers["sm_90"]["nf4"]["forward"] == pytest.approx(50.3 * m / (713.2 - 666.4))
    assert crossovers["sm_90"]["nf4"]["backward"] == pytest.approx(50.2 * m / (800.1 - 716.5))
    assert table == {"sm_90": {"forward": dict.fromkeys(route_table.KINDS, 4096),
                               "backward": dict.fromkeys(route_table.KINDS, 2048)},
                     "sm_89": {step: dict.fromkeys(route_table.KINDS, None)
                               for step in ("forward", "backward")}}


def latest_report():
    report = load_static(Path(__file__).parents[1] / "bench" / "results")
    assert report, "run python -m bench.static and commit its JSON"
    return report


def test_committed_static_report_covers_every_listed_config_within_the_gates():
    """The compile test builds one config per list (CI time); ``python -m bench.static`` builds
    every config of every list, and its committed report must hold them all, each within the
    gates. A changed list fails here until the report is built again."""
    listing = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("compile_kernels.py")), *map(str, ARCHS),
         "--list-configs"], capture_output=True, text=True, timeout=600)
    assert listing.returncode == 0, listing.stderr[-4000:]
    expected = json.loads(listing.stdout.strip().splitlines()[-1])
    report = latest_report()
    for arch in ARCHS:
        records = report["archs"].get(str(arch), [])
        built = {json.dumps([r["case"], r["kernel"], r.get("config", 0), r.get("configs", 1),
                             {k: v for k, v in r["constexprs"].items() if k.startswith("BLOCK_")},
                             r["num_warps"], r["num_stages"]], sort_keys=True) for r in records}
        for case, kernel, config, configs, options in expected[str(arch)]:
            tiles = {k: v for k, v in options.items() if k.startswith("BLOCK_")}
            key = json.dumps([case, kernel, config, configs, tiles, options.get("num_warps", 4),
                              options.get("num_stages", 3)], sort_keys=True)
            assert key in built, f"sm_{arch}: {key} is not in the static report: run " \
                "python -m bench.static and commit its JSON"
        failures = (gates.resources(records) + gates.spills(records) + gates.nf4_instructions(records)
                    + (gates.two_ctas_per_sm(records) if arch == 89 else [])
                    + (gates.wgmma(records) if arch == 90 else []))
        assert not failures, "\n".join(failures)


def test_committed_static_report_renders():
    report = latest_report()
    text = table.render(report)
    assert "not measurements" in text and "_lora_forward_kernel" in text
    assert {"90", "89"} <= set(report["archs"])


# What the MoE cases launch for sm_90, captured in a process of its own (this one runs Triton's
# interpreter, whose kernels the capture cannot intercept): per case, its modelled torch ops and
# its grouped GEMMs' K and W_e's n stride.
MOE_CAPTURE = """
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, sys.argv[1])
from bench.static import launches
cases = {case: call for case, (call, _) in launches.bench_cases().items() if "E=" in case}
modelled = []
launched = launches.run_calls(cases, launches.gpu(90), every_config=False, modelled=modelled)
found = {case: {"torch": [], "gemms": []} for case in cases}
for record in modelled:
    found[record["case"]]["torch"].append(record["kernel"])
for launch in launched:
    if launch.name == "_grouped_gemm_kernel":
        args = dict(zip(launch.kernel.arg_names, launch.args))
        found[launch.case]["gemms"].append([args["K"], args["stride_wn"],
                                            launch.kwargs.get("BIAS", False)])
print(json.dumps(found))
"""


def test_moe_rows_cover_qwen3_and_gpt_oss_with_their_layouts():
    """Issue 27's MoE rows for both models, Qwen3-30B-A3B (E = 128, top-8) and gpt-oss-20b
    (E = 32, top-4): per projection lowrank's forward, backward and both, the grouped GEMM
    without LoRA and PEFT's ParamWrapper, the three forward + backward rows against one ideal
    (so their times compare). gpt-oss's GEMMs read its experts transposed (E x in x out: W_e's
    n stride 1) and every forward of it adds the expert biases once: lowrank's in its forward
    GEMM's epilogue (BIAS), as the grouped GEMM without LoRA (the same GEMM), PEFT's as torch
    ops; Qwen's have neither.
    tests/test_compile_gpu.py builds these launches (the benchmark cases) and gates them."""
    from bench.static import launches

    run = subprocess.run([sys.executable, "-c", MOE_CAPTURE, str(Path(__file__).parents[1])],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    ideals = {case: ideal for case, (_, ideal) in launches.bench_cases().items()}
    models = {"qwen3": (launches.MOE_ROWS, launches.MOE_EXPERTS, launches.MOE_PROJECTIONS),
              "gpt-oss": (launches.GPT_OSS_ROWS, launches.GPT_OSS_EXPERTS,
                          launches.GPT_OSS_PROJECTIONS)}
    assert (launches.GPT_OSS_ROWS, launches.GPT_OSS_EXPERTS) == (4096 * 4, 32)
    for name, (rows, experts, projections) in models.items():
        gpt_oss = name == "gpt-oss"
        for projection, (k, n) in projections.items():
            shape = f"{rows}x{k}x{n} E={experts} {projection}"
            forward, backward, train = (f"lora_grouped_{step} dense {shape}"
                                        for step in ("forward", "backward", "train"))
            trains = [train, f"grouped_gemm_train dense {shape} rank=0",
                      f"peft_param_wrapper_train dense {shape}"]
            assert {forward, backward, *trains} <= set(found), shape
            assert len({ideals[case] for case in trains}) == 1
            for case in (forward, backward, *trains):
                biases = [op for op in found[case]["torch"] if "bias" in op]
                torch_bias = gpt_oss and case == trains[2]
                assert biases == (["torch: bias[expert_ids]", "torch: + bias"] if torch_bias
                                  else []), case
            assert len(found[forward]["gemms"]) == 1
            forward_k, stride_wn, epilogue_bias = found[forward]["gemms"][0]
            assert forward_k == k and (stride_wn == 1) == gpt_oss == epilogue_bias, shape
            for case in (train, trains[1]):  # the forward GEMM, then dX's (its K is N)
                assert [gemm[0] for gemm in found[case]["gemms"]] == [k, n], case
                assert [gemm[2] for gemm in found[case]["gemms"]] == [gpt_oss, False], case


# Each of the model's bitsandbytes + PEFT ops (launches.bnb_peft_ops) as the op PEFT's layer
# dispatches for it: what test_bnb_peft_ops_are_what_peft_and_bitsandbytes_run records.
BNB_PEFT_DISPATCHED = {
    "result.clone()": "aten.clone", "lora_A: S = x A^T": "aten.mm", "lora_B: S B^T": "aten.mm",
    "* scaling": "aten.mul", "result + output": "aten.add", "dY * scaling": "aten.mul",
    "dS = dP B": "aten.mm", "dB = dP^T S": "aten.mm", "dS A": "aten.mm", "dA = dS^T x": "aten.mm",
    "dequantize_blockwise absmax": "bitsandbytes.dequantize_blockwise",
    "absmax + offset": "aten.add_", "dequantize_4bit W": "bitsandbytes.dequantize_4bit",
    "dY W": "aten.mm", "dX + dS A (autograd's sum)": "aten.add"}
METADATA_OPS = {"aten.view", "aten.t", "aten.detach"}  # no kernel: views and autograd's detach


def peft_linear4bit_dispatches(nested):
    """The ops (overload packets, views left out) that PEFT's LoRA Linear4bit over a tiny
    bitsandbytes NF4 layer dispatches on the CPU: bf16 x and adapters, lora_dropout 0, no bias;
    (forward, backward)."""
    import bitsandbytes as bnb
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func.overloadpacket) not in METADATA_OPS:
                self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(72, 40, bias=False, compute_dtype=torch.bfloat16,
                             compress_statistics=nested, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(40, 72, dtype=torch.bfloat16), requires_grad=False,
                                    compress_statistics=nested, quant_type="nf4",
                                    module=base)._quantize("cpu")
    layer = Linear4bit(base, "default", config=LoraConfig(r=4, lora_alpha=8), r=4, lora_alpha=8,
                       lora_dropout=0.0).to(torch.bfloat16)
    x = torch.randn(5, 72, dtype=torch.bfloat16, requires_grad=True)
    with Recorder() as forward:
        y = layer(x)
    grad_y = torch.randn_like(y)
    with Recorder() as backward:
        y.backward(grad_y)
    assert base.weight.quant_state.nested == nested
    return forward.ops, backward.ops


@pytest.mark.parametrize("nested", [False, True], ids=["nf4", "nf4-nested"])
def test_bnb_peft_ops_are_what_peft_and_bitsandbytes_run(nested):
    """The model's ops for bitsandbytes + PEFT against what PEFT's Linear4bit dispatches (on the
    CPU, where bitsandbytes' gemm_4bit is one op): each of ours is one of theirs, in their order,
    none missing. What gemm_4bit runs on CUDA, which the CPU cannot show, is read from
    bitsandbytes' dispatch: its fused kernel up to 4 rows (and to 16 for a weight whose 64-column
    blocks fill the SMs), dequantize + F.linear above 1536 rows, its heuristic between (refused)."""
    from bench.static import launches

    kind = "nf4-nested" if nested else "nf4"
    forward, backward = peft_linear4bit_dispatches(nested)
    absmax_decode = ["dequantize_blockwise absmax", "absmax + offset"] if nested else []
    for m, gemm in ((4096, [*absmax_decode, "dequantize_4bit W", "F.linear x W^T"]),
                    (1, ["gemm_4bit x W^T (fused)"]), (16, ["gemm_4bit x W^T (fused)"])):
        for with_backward, dispatched in ((False, forward), (True, forward + backward)):
            ops = [op for op, _, _ in launches.bnb_peft_ops(m, 4096, 14336, kind, 132, with_backward)]
            assert ops[:len(gemm)] == gemm
            modelled = ["bitsandbytes.gemm_4bit"] + [BNB_PEFT_DISPATCHED[op] for op in ops[len(gemm):]]
            assert modelled == dispatched
    with pytest.raises(ValueError, match="heuristic"):
        launches.bnb_peft_ops(64, 4096, 14336, kind, 132, False)
    assert not launches.bnb_fused_gemm(2048, 4096, 14336, 132)
    assert launches.bnb_fused_gemm(16, 4096, 14336, 128) and launches.bnb_fused_gemm(3, 128, 40, 132)
    assert not launches.bnb_fused_gemm(3, 72, 40, 132)  # K not a multiple of the blocksize


def test_a_fresh_report_has_the_bnb_peft_rows_beside_ours(monkeypatch):
    """``python -m bench.static``'s report (builds replaced by nothing: the rows are modelled
    ops) holds each bitsandbytes + PEFT row beside its lowrank twin's chosen route, theirs /
    ours, and the table shows them; the benchmark cases list every such row."""
    import os

    from bench.static import build, launches

    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))  # popped below
    from bench.static import __main__ as static_main

    m, k, n = launches.TRAIN_SHAPE
    theirs = launches.bnb_peft_cases(m, k, n)
    assert len(theirs) == 8 and set(theirs) <= set(launches.bench_cases())

    def ours(microseconds):
        device = model.DEVICES["H100 SXM"]
        return lambda: launches.torch_op(microseconds * 1e-6 * device.cublas_flops, 0, "ours")
    cases = dict(theirs)
    for case, (_, ideal) in theirs.items():
        twin = case.replace("bnb_peft_", "lora_linear_")
        cases[twin] = (ours(100.0), ideal)
        if "decode" not in case:  # the cublas twin, cheaper on every device: the chosen route
            cases[twin + " route=cublas"] = (ours(80.0), ideal)
    monkeypatch.setattr(launches, "bench_cases", lambda: cases)
    monkeypatch.setattr(build, "build_all", lambda launched, arch: [])
    report = json.loads(json.dumps(static_main.run([90, 89])))
    text = table.render(report)
    versus_table = text.split("vs bitsandbytes + PEFT", 1)[1].split("Model constants")[0]
    for device, estimates in report["model"]["cases"].items():
        versus = report["model"]["versus"][device]
        assert set(versus) == set(theirs)
        h100_us = 1 if device == "H100 SXM" else model.DEVICES["H100 SXM"].cublas_flops / \
            model.DEVICES[device].cublas_flops
        for case, row in versus.items():
            twin = case.replace("bnb_peft_", "lora_linear_")
            decode = "decode" in case
            assert row["ours"] == (twin if decode else twin + " route=chosen")
            assert row["route"] == (None if decode else "cublas")
            assert row["ours_us"] == pytest.approx((100.0 if decode else 80.0) * h100_us)
            assert row["theirs_us"] == estimates[case]["model_us"] > 0
            assert row["ratio"] == pytest.approx(row["theirs_us"] / row["ours_us"])
            assert sum(line.startswith(f"| {case} |") for line in versus_table.splitlines()) == 1


REGISTER_A = """
.L_x_7:
        /*0000*/                   LDSM.16.M88.4 R164, [R207+UR5+0x1a000] ;
        /*0010*/                   HGMMA.64x256x16.F32.BF16 R24, R164, gdesc[UR12], R24 ;
        /*0020*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0030*/                   ISETP.GE.AND P0, PT, R5, R6, PT ;
        /*0040*/                   IADD3 R5, R5, 0x40, RZ ;
        /*0050*/                   IADD3 R7, R7, 0x40, RZ ;
        /*0060*/                   IADD3 R8, R8, 0x40, RZ ;
        /*0070*/              @!P0 BRA `(.L_x_7) ;
"""


def test_a_wgmma_with_a_register_a_operand_reads_only_b_from_shared_memory():
    """``HGMMA... R24, R164, gdesc[...]`` takes A from registers (the transposed LoRA forward's
    decoded weight): B's 256 x 16 bytes per warpgroup from shared memory; the ``gdesc`` form both
    operands. The flops are the same."""
    loop = sass.hot_loop(REGISTER_A)
    assert sass.mma_flops(loop, num_warps=8) == 2 * 2 * 2 * 64 * 256 * 16
    ldsm = 128 * 4 * 8
    assert sass.memory_bytes(loop, num_warps=8) == (0, ldsm + (256 + (64 + 256)) * 16 * 2 * 2)


ROW_TILE_CAPTURE = """
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, sys.argv[1])
import torch
from bench.static import build, launches
calls = launches.lora_grouped_calls(1024, 64, 96, 8, torch.bfloat16, fused_output_grad=True)
launched = launches.run_calls({"backward": calls["backward"]}, launches.gpu(90), every_config=False)
storages = [sum({t.data_ptr(): t.untyped_storage().nbytes() for t in launch.args
                 if isinstance(t, torch.Tensor)}.values()) for launch in launched]
print(json.dumps([[launch.name, launch.kwargs.get("BLOCK_M"), full, touched] for launch, full, touched
                  in zip(launched, storages, build.tensor_bytes(launched))]))
"""


def test_the_grouped_grad_b_partials_count_only_the_row_tiles_with_rows():
    """The dX GEMM's dB partials (N x r fp32 a row tile) are allocated for the tile schedule's
    upper bound, cdiv(rows, BLOCK_M) + E tiles: 1024 rows over 8 experts in 128-row tiles (sm_90)
    allocate 16 and fill 8. The model charges the GEMM that writes them and the sum that reads
    them for those 8 only; every other tensor, and the dA launch, whole."""
    run = subprocess.run([sys.executable, "-c", ROW_TILE_CAPTURE, str(Path(__file__).parents[1])],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert [name for name, *_ in found] == ["_grouped_gemm_kernel", "_grouped_grad_b_sum_kernel",
                                            "_grouped_weight_grad_kernel"]
    assert found[0][1] == 128
    allocated = (1024 // 128 + 8) * 96 * 16 * 4
    spare = allocated // 2
    assert [full - touched for _, _, full, touched in found] == [spare, spare, 0]
