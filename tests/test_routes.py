"""lowrank.routes: the route table, calibration (with a fake timer: nothing is timed on CPU), the
default rule, forcing a route; and every route of the LoRA and IA3 linears against the fp64
reference in the interpreter (shapes, tolerances and helpers of test_lora_linear.py and
test_ia3_linear.py: M = 37, K = 97, N = 83; decode at K = 300)."""

import json

import pytest
import torch
from helpers import (IA3_FORMS, TOLERANCE, K, M, N, assert_op_close, check_ia3_linear_against_fp64,
                     check_lora_linear_against_fp64, ia3_linear_fp64, lora_linear_fp64, make_ia3_case,
                     make_lora_case, run_ia3_linear, run_lora_linear)

from lowrank import nf4, ops, routes
from lowrank.ops import ia3 as ia3_op
from lowrank.ops import lora as lora_op

STAMP = {"gpu": "Fake GPU", "driver": "12040", "torch": "2.13", "triton": "3.9", "lowrank": "0.1.0"}


class FakeTimer:
    """Times given per route, whatever runs; records the candidates of each calibration."""

    def __init__(self, **ms):
        self.ms, self.calls = ms, []

    def __call__(self, candidates):
        self.calls.append(sorted(candidates))
        return {route: self.ms[route] for route in candidates}


def spy_routes(monkeypatch):
    """The route functions of lowrank.ops.lora / ia3 that run, by name, in call order."""
    ran = []
    for module in (lora_op, ia3_op):
        for name in ("_forward_fused", "_forward_cublas", "_forward_decode", "_grad_input_fused",
                     "_grad_input_cublas", "_backward_fused", "_backward_cublas"):
            if hasattr(module, name):
                original = getattr(module, name)
                monkeypatch.setattr(module, name, lambda *args, _f=original, _n=name:
                                    ran.append(f"{_f.__module__.rsplit('.', 1)[1]}.{_n}") or _f(*args))
    return ran


@pytest.fixture
def no_route_env(monkeypatch, tmp_path):
    """No route forced, calibration on (the defaults), and a cache directory of the test's own."""
    monkeypatch.delenv(routes.ROUTE_ENV, raising=False)
    monkeypatch.delenv(routes.CALIBRATE_ENV, raising=False)
    monkeypatch.setenv(routes.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_calibration_times_a_new_key_once_and_caches_the_winner_on_disk(tmp_path):
    path = tmp_path / "routes-fake.json"
    timer = FakeTimer(fused=2.0, cublas=1.5, decode=3.0)
    table = routes.RouteTable(path, STAMP, timer)
    candidates = {route: lambda: None for route in ("fused", "cublas", "decode")}
    assert table.route("lora_forward|sm_90|m16|k97|n83|bfloat16|nf4", candidates) == "cublas"
    assert table.route("lora_forward|sm_90|m16|k97|n83|bfloat16|nf4", candidates) == "cublas"
    assert timer.calls == [["cublas", "decode", "fused"]]  # once per key
    two = {"fused": candidates["fused"], "cublas": candidates["cublas"]}
    assert table.route("lora_grad_input|sm_90|m16|k97|n83|bfloat16|nf4", two) == "cublas"
    stored = json.loads(path.read_text())
    assert stored["fingerprint"] == STAMP and stored["format"] == routes.CACHE_FORMAT
    assert stored["routes"]["lora_forward|sm_90|m16|k97|n83|bfloat16|nf4"] == {
        "route": "cublas", "ms": {"fused": 2.0, "cublas": 1.5, "decode": 3.0}}
    assert set(stored["routes"]) == {"lora_forward|sm_90|m16|k97|n83|bfloat16|nf4",
                                     "lora_grad_input|sm_90|m16|k97|n83|bfloat16|nf4"}

    # A new process (a new table on the same file) reads the winners back and times nothing,
    # whatever its timer would say.
    reloaded = routes.RouteTable(path, STAMP, FakeTimer(fused=0.1, cublas=9.0, decode=9.0))
    assert reloaded.route("lora_forward|sm_90|m16|k97|n83|bfloat16|nf4", candidates) == "cublas"
    assert reloaded.timer.calls == []
    # Another driver (or GPU, or library version): the file is not valid for it; timed again.
    other = routes.RouteTable(path, {**STAMP, "driver": "13000"}, FakeTimer(fused=0.1, cublas=9.0))
    assert other.route("lora_grad_input|sm_90|m16|k97|n83|bfloat16|nf4", two) == "fused"
    assert len(other.timer.calls) == 1
    # Ties go to the first of ROUTES: a fixed order, not the dict's.
    tied = routes.RouteTable(tmp_path / "tied.json", STAMP, FakeTimer(fused=1.0, cublas=1.0))
    assert tied.route("k", {"cublas": None, "fused": None}) == "fused"


def test_a_route_that_could_not_run_is_not_chosen(tmp_path):
    """The timer's None: that route ran out of GPU memory while it was timed."""
    table = routes.RouteTable(tmp_path / "routes.json", STAMP, FakeTimer(fused=2.0, cublas=None))
    assert table.route("k", {"fused": None, "cublas": None}) == "fused"
    assert json.loads((tmp_path / "routes.json").read_text())["routes"]["k"]["ms"] == {
        "fused": 2.0, "cublas": None}
    table.timer.ms["fused"] = None
    with pytest.raises(RuntimeError, match="no route of k2 could run here"):
        table.route("k2", {"fused": None, "cublas": None})


def test_the_cuda_event_timer_warms_up_times_medians_and_leaves_out_what_ran_out_of_memory(
        monkeypatch):
    """``cuda_event_timer`` with CUDA's events and synchronize replaced by a clock that each route
    advances by its cost (so it runs on CPU)."""
    clock, calls = [0.0], []

    class ClockEvent:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            self.time = clock[0]

        def elapsed_time(self, end):
            return end.time - self.time

    monkeypatch.setattr(torch.cuda, "Event", ClockEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    def route(name, costs):
        def run():
            calls.append(name)
            if costs is None:
                raise torch.OutOfMemoryError("out of memory")
            clock[0] += costs[calls.count(name) % len(costs)]
        return run

    times = routes.cuda_event_timer({"fused": route("fused", [2.0, 2.0, 9.0]),
                                     "cublas": route("cublas", [1.0]),
                                     "decode": route("decode", None)}, warmup=2, repeats=5)
    assert times == {"fused": 2.0, "cublas": 1.0, "decode": None}  # medians: an outlier ignored
    assert calls[:5] == ["fused", "fused", "cublas", "cublas", "decode"]  # warm-up, then rounds
    assert calls[5:] == ["fused", "cublas"] * 5


def test_a_cut_or_foreign_cache_file_is_calibrated_again(tmp_path):
    path = tmp_path / "routes.json"
    path.write_text('{"format": 1, "fingerp')
    table = routes.RouteTable(path, STAMP, FakeTimer(fused=1.0, cublas=2.0))
    assert table.route("k", {"fused": None, "cublas": None}) == "fused"
    assert json.loads(path.read_text())["routes"]["k"]["route"] == "fused"  # rewritten whole
    # A cached route the call does not offer (decode, for a call without it) is timed again.
    path.write_text(json.dumps({"format": 1, "fingerprint": STAMP,
                                "routes": {"k": {"route": "decode", "ms": {}}}}))
    table = routes.RouteTable(path, STAMP, FakeTimer(fused=2.0, cublas=1.0))
    assert table.route("k", {"fused": None, "cublas": None}) == "cublas"


def test_key_names_op_architecture_m_bucket_shape_dtype_and_weight_kind():
    cpu = torch.device("cpu")
    assert (routes.key("lora_forward", cpu, 37, 97, 83, torch.bfloat16, "nf4-nested")
            == "lora_forward|interpreter|m64|k97|n83|bfloat16|nf4-nested")
    assert [routes.m_bucket(m) for m in (1, 2, 3, 16, 17, 4096, 4097)] == [1, 2, 4, 16, 32, 4096,
                                                                             8192]
    dense = torch.randn(N, K)
    packed, state = nf4.quantize(dense, blocksize=64, double_quant=False)
    nested, nested_state = nf4.quantize(dense, blocksize=64, double_quant=True)
    assert [routes.weight_kind(ops.FrozenWeight.of(w, s)) for w, s in (
        (dense, None), (packed, state), (nested, nested_state))] == ["dense", "nf4", "nf4-nested"]


@pytest.mark.parametrize("arch, m, kind, step, candidates, expected", [
    ("sm_90", 16, "nf4-nested", "forward", ("fused", "cublas", "decode"), "decode"),
    # no decode route: dense is cuBLAS's
    ("sm_90", 1, "dense", "forward", ("fused", "cublas"), "cublas"),
    ("sm_90", 1, "dense", "backward", ("fused", "cublas"), "cublas"),
    # Each step at its own bound: the NF4 and nested forwards fused at every M (their time per row
    # under the cublas route's); the dX crossovers at 244898 / 240443 rows.
    ("sm_90", 65536, "nf4", "forward", ("fused", "cublas"), "fused"),
    ("sm_90", 131072, "nf4", "backward", ("fused", "cublas"), "fused"),
    ("sm_90", 131073, "nf4", "backward", ("fused", "cublas"), "cublas"),
    ("sm_90", 262144, "nf4-nested", "forward", ("fused", "cublas"), "fused"),
    ("sm_90", 131072, "nf4-nested", "backward", ("fused", "cublas"), "fused"),
    ("sm_90", 131073, "nf4-nested", "backward", ("fused", "cublas"), "cublas"),
    ("sm_100", 262144, "nf4", "backward", ("fused", "cublas"), "cublas"),
    ("gfx942", 4096, "dense", "backward", ("fused", "cublas"), "cublas"),
    ("sm_89", 16384, "dense", "forward", ("fused", "cublas"), "fused"),
    ("sm_89", 16384, "nf4", "backward", ("fused", "cublas"), "fused"),
    ("sm_86", 16384, "nf4-nested", "forward", ("fused", "cublas"), "fused"),
    ("interpreter", 4096, "nf4", "backward", ("fused", "cublas"), "fused"),
    ("interpreter", 3, "dense", "forward", ("fused", "cublas", "decode"), "decode"),
])
def test_default_rule(arch, m, kind, step, candidates, expected):
    assert routes.default_route(arch, m, kind, step, candidates) == expected


def test_the_default_rule_names_an_unknown_step():
    with pytest.raises(ValueError, match="step='dx'"):
        routes.default_route("sm_90", 4096, "nf4", "dx", ("fused", "cublas"))


def lora_call(m=M, k=K, dtype=torch.float32, kind="nf4-64"):
    x, weight, state, _, lora_a, lora_b, bias = make_lora_case(dtype, kind, 4, "cpu", m=m,
                                                                     k=k)
    x.requires_grad_()
    y = ops.lora_linear(x, weight, lora_a, lora_b, 1.5, bias=bias, quant_state=state)
    y.sum().backward()


def test_the_interpreter_never_calibrates_and_takes_the_default_rule(no_route_env, monkeypatch):
    monkeypatch.setattr(routes, "table", lambda device: pytest.fail("calibrated in the interpreter"))
    ran = spy_routes(monkeypatch)
    lora_call(m=3)
    lora_call(m=M)
    assert ran == ["lora._forward_decode", "lora._grad_input_fused",
                   "lora._forward_fused", "lora._grad_input_fused"]
    assert not no_route_env.exists()


def test_the_ops_take_their_own_steps_bound(no_route_env, monkeypatch):
    """Without calibration on an sm_90, a bucket of M within the forward's bound and above dX's
    runs the fused forward and the cublas dX (the ops tell the rule their step)."""
    monkeypatch.setenv(routes.CALIBRATE_ENV, "0")
    monkeypatch.setattr(routes, "architecture", lambda device: "sm_90")
    bucket = routes.m_bucket(M)
    monkeypatch.setitem(routes.FUSED_MAX_M, "sm_90", {"forward": {"nf4": bucket},
                                                      "backward": {"nf4": bucket // 2}})
    ran = spy_routes(monkeypatch)
    lora_call(m=M)
    assert ran == ["lora._forward_fused", "lora._grad_input_cublas"]


def fake_gpu(monkeypatch, cache, timer):
    """Calls on CPU tensors treated as timeable (as on a GPU), with ``timer`` in the table of
    ``cache``; returns the table."""
    table = routes.RouteTable(cache / "routes-fake.json", STAMP, timer)
    monkeypatch.setattr(routes, "can_time", lambda device: True)
    monkeypatch.setattr(routes, "table", lambda device: table)
    return table


def test_calibration_chooses_inside_the_ops_and_the_winner_runs(no_route_env, monkeypatch):
    table = fake_gpu(monkeypatch, no_route_env, FakeTimer(fused=2.0, cublas=1.0, decode=0.5))
    ran = spy_routes(monkeypatch)
    lora_call(m=3)
    assert ran == ["lora._forward_decode", "lora._grad_input_cublas"]
    assert sorted(table.routes) == ["lora_forward|interpreter|m4|k97|n83|float32|nf4",
                                    "lora_grad_input|interpreter|m4|k97|n83|float32|nf4"]
    lora_call(m=4)  # the same bucket: nothing timed again
    assert len(table.timer.calls) == 2
    assert json.loads((no_route_env / "routes-fake.json").read_text())["routes"] == table.routes


@pytest.mark.gpu
def test_calibration_on_a_gpu_times_the_routes_and_caches_the_winner(no_route_env):
    x, weight, state, _, lora_a, lora_b, bias = make_lora_case(torch.bfloat16, "nf4-64", 16,
                                                                     "cuda", m=300)
    x.requires_grad_()
    ops.lora_linear(x, weight, lora_a, lora_b, 1.5, bias=bias, quant_state=state).sum().backward()
    (path,) = no_route_env.glob("routes-*.json")
    stored = json.loads(path.read_text())
    assert stored["fingerprint"]["gpu"] == torch.cuda.get_device_name()
    arch = routes.architecture(x.device)
    for op in ("lora_forward", "lora_grad_input"):
        entry = stored["routes"][f"{op}|{arch}|m512|k{K}|n{N}|bfloat16|nf4"]
        assert set(entry["ms"]) == {"fused", "cublas"} and all(t > 0 for t in entry["ms"].values())
        assert entry["route"] == min(entry["ms"], key=entry["ms"].get)


def test_calibration_off_takes_the_default_rule(no_route_env, monkeypatch):
    table = fake_gpu(monkeypatch, no_route_env, FakeTimer(fused=2.0, cublas=1.0, decode=0.5))
    monkeypatch.setenv(routes.CALIBRATE_ENV, "0")
    ran = spy_routes(monkeypatch)
    lora_call(m=M)
    assert ran == ["lora._forward_fused", "lora._grad_input_fused"] and table.timer.calls == []
    monkeypatch.setenv(routes.CALIBRATE_ENV, "no")
    with pytest.raises(ValueError, match="LOWRANK_CALIBRATE='no'; use 1 .* or 0"):
        lora_call(m=M)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_calibration_runs_under_torch_compile(no_route_env, monkeypatch, dynamic):
    """The custom ops are opaque to torch.compile: the choice is made when they run."""
    table = fake_gpu(monkeypatch, no_route_env, FakeTimer(fused=1.0, cublas=2.0))
    ran = spy_routes(monkeypatch)
    x, weight, state, _, lora_a, lora_b, bias = make_lora_case(torch.float32, "nf4-64", 4,
                                                                     "cpu")
    lora_a.requires_grad_()

    def step(x, a):
        return ops.lora_linear(x, weight, a, lora_b, 2.0, bias=bias, quant_state=state).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    compiled(x, lora_a).backward()
    assert ran == ["lora._forward_fused"]  # x needs no gradient: no dX
    assert table.timer.calls == [["cublas", "fused"]]


def test_a_forced_route_wins_and_bad_values_are_named(no_route_env, monkeypatch):
    table = fake_gpu(monkeypatch, no_route_env, FakeTimer(fused=1.0, cublas=2.0, decode=3.0))
    ran = spy_routes(monkeypatch)
    monkeypatch.setenv(routes.ROUTE_ENV, "cublas")
    lora_call(m=3)
    assert ran == ["lora._forward_cublas", "lora._grad_input_cublas"] and table.timer.calls == []
    ran.clear()
    monkeypatch.setenv(routes.ROUTE_ENV, "decode")  # dX and M > DECODE_MAX_M have no decode
    lora_call(m=3)
    lora_call(m=M)
    assert ran == ["lora._forward_decode", "lora._grad_input_fused", "lora._forward_fused",
                   "lora._grad_input_fused"]
    ran.clear()
    with routes.forced("cublas"):  # in code, over the variable
        lora_call(m=3)
    assert ran == ["lora._forward_cublas", "lora._grad_input_cublas"]
    monkeypatch.setenv(routes.ROUTE_ENV, "fast")
    with pytest.raises(ValueError, match="LOWRANK_ROUTE='fast' is not a route; use one of fused, "
                                         "cublas, decode"):
        lora_call(m=3)
    with pytest.raises(ValueError, match="forced='tiled' is not a route"):
        with routes.forced("tiled"):
            pass
    assert table.timer.calls == []


def test_the_workspace_is_reused_in_the_compute_dtype():
    w = torch.randn(N, K) * 0.05
    packed, state = nf4.quantize(w, blocksize=64)
    weight = ops.FrozenWeight.of(packed, state)
    first = routes.dense_weight(weight, torch.bfloat16)
    assert first.dtype == torch.bfloat16 and first.shape == (N, K)
    assert torch.equal(first, nf4.dequantize(packed, state, dtype=torch.bfloat16))
    second = routes.dense_weight(weight, torch.bfloat16)
    assert second.data_ptr() == first.data_ptr()  # the same buffer, written again
    small = ops.FrozenWeight.of(*nf4.quantize(w[:5], blocksize=64))
    assert routes.dense_weight(small, torch.bfloat16).data_ptr() == first.data_ptr()
    dense = torch.randn(N, K, dtype=torch.bfloat16)
    assert routes.dense_weight(ops.FrozenWeight.of(dense), torch.bfloat16) is dense  # no copy


class GemmDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """Dtypes of GEMM operands, and fp32 results as large as x, while the mode is on."""

    def __init__(self, large):
        super().__init__()
        self.gemm, self.large_fp32, self.large = set(), [], large

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.gemm.update(a.dtype for a in args if isinstance(a, torch.Tensor))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() >= self.large:
                self.large_fp32.append(func)
        return out


def test_the_cublas_route_multiplies_in_x_dtype_with_no_fp32_copy_of_x():
    x, weight, state, _, lora_a, lora_b, bias = make_lora_case(torch.bfloat16, "nf4-64", 4,
                                                                     "cpu")
    x = x.reshape(M, K)
    ia3 = torch.rand(K) + 0.5
    frozen = ops.FrozenWeight.of(weight, state)
    a, b, seed = lora_a.bfloat16(), lora_b.bfloat16(), torch.zeros(1, dtype=torch.int64)
    grad_y = torch.randn(M, N, dtype=torch.bfloat16)
    watched = GemmDtypes(large=M * min(K, N))
    with watched:
        lora_op._forward_cublas(x, frozen, a, b, 1.5, bias, 0.0, seed)
        lora_op._grad_input_cublas(grad_y, frozen, grad_y @ b, a, seed, 0.3)
        for feedforward in (False, True):
            scale = ia3 if feedforward else torch.rand(N) + 0.5
            ia3_op._forward_cublas(x, frozen, scale, bias, feedforward)
            ia3_op._backward_cublas(grad_y, x, frozen, scale, bias, feedforward, True,
                                    True)
    assert watched.gemm == {torch.bfloat16} and watched.large_fp32 == []


class GemmCalls(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.calls.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("k, dropout, kind, gemms", [
    # The rule: 2 M N + 3 (M + K) r < M K + (M + K) r (N = 83, M = 37, r = 5).
    (250, 0.0, "nf4-64", ["mm"]),  # K > 2 N + ...: [dY | dS] [W ; A], one GEMM
    (97, 0.0, "nf4-64", ["mm", "addmm_"]),  # dS A, then dY W accumulated into it
    (250, 0.0, "dense", ["mm", "addmm_"]),  # a dense W is never copied
    (97, 0.3, "nf4-64", ["mm", "addmm_"]),  # dropout: dS A masked, then dY W accumulated
])
def test_cublas_grad_input_takes_the_form_that_moves_fewer_bytes(k, dropout, kind, gemms):
    dtype = torch.float32
    x, weight, state, dense, lora_a, lora_b, bias = make_lora_case(dtype, kind, 5, "cpu", k=k)
    frozen = ops.FrozenWeight.of(weight, state)
    grad_y = torch.randn(M, N, generator=torch.Generator().manual_seed(3))
    grad_s = grad_y @ lora_b * 1.5
    seed = torch.tensor([7])
    assert lora_op.joined_grad_input(M, k, N, 5, False) == (gemms == ["mm"] or kind == "dense")
    watched = GemmCalls()
    with watched:
        grad_x = lora_op._grad_input_cublas(grad_y, frozen, grad_s, lora_a, seed, dropout)
    assert watched.calls == gemms
    keep = ops.lora_dropout_mask(seed, (M, k), dropout).double() / (1 - dropout)
    expected = grad_y.double() @ dense.double() + (grad_s.double() @ lora_a.double()) * keep
    assert_op_close(grad_x, expected, dtype, "dX")
    # At Llama-3-8B's shapes (4096 tokens, rank 16): the down projection's dX (K = 14336 > 2 N)
    # joins; the up/gate (N = 14336) and q/o (N = K) projections' take the addmm_.
    assert lora_op.joined_grad_input(4096, 14336, 4096, 16, False)
    assert not lora_op.joined_grad_input(4096, 4096, 14336, 16, False)
    assert not lora_op.joined_grad_input(4096, 4096, 4096, 16, False)


# Every route against the fp64 reference, in the interpreter. The fused and decode routes are
# the ones test_lora_linear*.py / test_ia3_linear.py check under the default rule; here each is
# forced, and the cublas route gets the same matrix of dtypes and weight kinds.
KINDS = ["dense", "nf4-64", "nf4-nested-128"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def always_joined(monkeypatch):
    """The cublas forward and dX take their single-GEMM forms for an NF4 weight whatever the
    shape (the byte rules aside: their own tests check them), counting the calls that asked."""
    asked = []
    for rule in ("joined_forward", "joined_grad_input"):
        monkeypatch.setattr(lora_op, rule, lambda *args: asked.append(args) or True)
    return asked


@pytest.mark.parametrize("kind, m, k, rank, adapter_dtype", [
    ("nf4-64", 37, 97, 16, None),  # the rule: M K + 2 (M + N) r < M N + (M + N) r: K > N, addmm_
    ("nf4-64", 9, 97, 16, None),  # few rows: the addmm_
    ("nf4-nested-128", 37, 60, 5, None),  # joined
    # The fp32 branch (3r columns; its addmm_ reads and writes Y again: 2 M N): 3 x 5 joins,
    ("nf4-nested-128", 37, 60, 5, torch.float32),
    ("nf4-64", 37, 97, 16, torch.float32),  # 3r = 48 columns: the addmm_
    ("dense", 37, 60, 5, None),  # a dense W is never copied
])
def test_cublas_forward_takes_the_single_gemm_form_when_the_byte_rule_says(
        kind, m, k, rank, adapter_dtype):
    dtype = torch.bfloat16
    x, weight, state, dense, lora_a, lora_b, bias = make_lora_case(
        dtype, kind, rank, "cpu", m=m, k=k, adapter_dtype=adapter_dtype or dtype)
    frozen = ops.FrozenWeight.of(weight, state)
    columns = rank if adapter_dtype is None else 3 * rank
    split = adapter_dtype is not None
    joined = kind != "dense" and lora_op.joined_forward(m, k, N, columns, split)
    assert joined == (m * k + 2 * (m + N) * columns < (1 + split) * m * N + (m + N) * columns
                      and kind != "dense")
    watched = GemmCalls()
    with watched:
        lora_op._forward_cublas(x.reshape(m, k), frozen, lora_a, lora_b, 1.5, bias, 0.0,
                                torch.tensor([3]))
    assert watched.calls == (["addmm"] if joined else ["addmm", "addmm_"])
    # The rule at Llama-3-8B's shapes (4096 tokens, rank 16): the MLP's up/gate projections join
    # (K < N), the q/o (K = N) and down (K = 14336 > N) projections take the addmm_.
    assert lora_op.joined_forward(4096, 4096, 14336, 16, False)
    assert not lora_op.joined_forward(4096, 4096, 4096, 16, False)
    assert not lora_op.joined_forward(4096, 14336, 4096, 16, False)


@pytest.mark.parametrize("dtype, kind, bias", [
    (torch.float32, "nf4-64", True), (torch.float32, "nf4-nested-128", False),
    (torch.float16, "nf4-64", False), (torch.float16, "nf4-nested-128", True),
    (torch.bfloat16, "nf4-64", True), (torch.bfloat16, "nf4-nested-128", False)])
def test_lora_cublas_single_gemm_forward_matches_fp64_reference(dtype, kind, bias, monkeypatch):
    """[x | S] [W | sB]^T at odd K (97: the dequantize kernel's rows found element by element)
    and rank (5), over a workspace poisoned with NaN (an element left unwritten shows)."""
    asked = always_joined(monkeypatch)
    routes.workspace("cpu", dtype, 4 * N * (K + 16)).fill_(float("nan"))
    with routes.forced("cublas"):
        check_lora_linear_against_fp64(dtype, kind, 5, bias, "cpu", adapter_dtype=dtype)
    assert asked


@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_the_shrink_writes_the_joined_operand_in_its_pass(adapter_dtype):
    """x (undropped) and S (dropped; an fp32 S as split_product's [hi | hi | lo]) written into a
    NaN-poisoned M x (K + r') operand at K = 72, rank 20 (two rank chunks: x is written once)."""
    m, k, rank, p = 37, 72, 20, 0.3
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(m, k, generator=gen).bfloat16()
    a = (torch.randn(rank, k, generator=gen) / 8).to(adapter_dtype)
    seed = torch.tensor([11])
    s = torch.empty(m, rank, dtype=adapter_dtype)
    columns = rank if adapter_dtype == torch.bfloat16 else 3 * rank
    joined = torch.full((m, k + columns), float("nan"), dtype=torch.bfloat16)
    from lowrank.kernels import lora_linear as lora_kernels

    lora_kernels.lora_shrink(x, a, s, seed, p, joined)
    alone = torch.empty_like(s)
    lora_kernels.lora_shrink(x, a, alone, seed, p)
    assert torch.equal(joined[:, :k], x) and torch.equal(s, alone)
    keep = ops.lora_dropout_mask(seed, (m, k), p).double() / (1 - p)
    assert_op_close(s, (x.double() * keep) @ a.double().t(), adapter_dtype, "S",
                    1e-4 if adapter_dtype == torch.float32 else None)
    if adapter_dtype == torch.float32:  # [hi | hi | lo], hi + lo near-fp32
        hi, lo = joined[:, k:k + rank].double(), joined[:, k + 2 * rank:].double()
        assert torch.equal(joined[:, k + rank:k + 2 * rank], joined[:, k:k + rank])
        assert (hi - s.double()).abs().max() <= 2**-7 * s.abs().max()
        assert ((hi + lo) - s.double()).abs().max() <= 2**-15 * s.abs().max()
    else:
        assert torch.equal(joined[:, k:], s)
    with pytest.raises(ValueError, match="joined must be 37 x"):
        lora_kernels.lora_shrink(x, a, s, seed, p, joined[:, 1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_dequantize_kernel_writes_rows_with_a_stride(dtype):
    """W into the first K columns of N x (K + c) rows, the other columns untouched: K = 97 (odd:
    rows found per element), 72 (per run of 8) and 128 (per run of 64), nested and not, and 4096
    (two programs of 2048 elements per row: the grid of rows, no division)."""
    gen = torch.Generator().manual_seed(2)
    for n, k, nested in ((N, 97, False), (N, 72, True), (N, 128, False), (3, 4096, True)):
        w = torch.randn(n, k, generator=gen) * 0.05
        packed, state = nf4.quantize(w, blocksize=64, double_quant=nested)
        frozen = ops.FrozenWeight.of(packed, state)
        routes.workspace("cpu", dtype, n * (k + 7)).fill_(float("nan"))
        out = routes.weight_beside(frozen, dtype, 7)
        assert out.shape == (n, k + 7) and out.stride() == (k + 7, 1)
        assert torch.equal(out[:, :k], nf4.dequantize(packed, state, dtype=dtype))
        assert out[:, k:].isnan().all()
    from lowrank.kernels import nf4_dequantize

    with pytest.raises(ValueError, match="neither contiguous nor rows"):
        nf4_dequantize.nf4_dequantize(packed, state.absmax, state.code,
                                      torch.empty(k, N, dtype=dtype).t(), 64)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_cublas_route_matches_fp64_reference(dtype, kind, monkeypatch):
    ran = spy_routes(monkeypatch)
    with routes.forced("cublas"):
        check_lora_linear_against_fp64(dtype, kind, 16, True, "cpu")
    assert ran == ["lora._forward_cublas", "lora._grad_input_cublas"]


@pytest.mark.parametrize("route, m, k, expected", [
    ("cublas", 3, 300, ["lora._forward_cublas", "lora._grad_input_cublas"]),
    ("fused", 3, 300, ["lora._forward_fused", "lora._grad_input_fused"]),
    ("decode", 5, 300, ["lora._forward_decode", "lora._grad_input_fused"]),
])
def test_lora_routes_at_small_m_without_bias(route, m, k, expected, monkeypatch):
    ran = spy_routes(monkeypatch)
    with routes.forced(route):
        check_lora_linear_against_fp64(torch.bfloat16, "nf4-nested-128", 5, False, "cpu", m=m,
                                           k=k)
    assert ran == expected


@pytest.mark.parametrize("route", ["cublas", "cublas-joined", "decode"])
def test_lora_dropout_mask_is_the_same_on_each_route(route, monkeypatch):
    """The forward's mask (the shrink's or the decode kernel's) is the one dX applies: against the
    reference given the kernels' mask, and not against the reference given its opposite
    (cublas-joined: the single-GEMM forward, whose x copy stays undropped)."""
    if route == "cublas-joined":
        always_joined(monkeypatch)
        route = "cublas"
    dtype, p, m = torch.float32, 0.3, 6
    x, weight, state, dense, lora_a, lora_b, bias = make_lora_case(dtype, "nf4-64", 8, "cpu",
                                                                         m=m)
    grad_y = torch.randn(m, 1, N, generator=torch.Generator().manual_seed(5)).to(dtype)
    torch.manual_seed(1234)
    mask = ops.lora_dropout_mask(ops.dropout_seed("cpu"), (m, K), p).reshape(m, 1, K)
    torch.manual_seed(1234)  # lora_linear draws the same seed
    with routes.forced(route):
        ours = run_lora_linear(x, weight, state, lora_a, lora_b, 2.0, bias, grad_y, dropout=p)
    expected = lora_linear_fp64(x, dense, lora_a, lora_b, 2.0, bias, grad_y, dropout=p,
                                         mask=mask)
    for name, got, want in zip(("y", "dx", "dA", "dB"), ours, expected):
        assert_op_close(got, want, dtype, name)
    other = lora_linear_fp64(x, dense, lora_a, lora_b, 2.0, bias, grad_y, dropout=p,
                                      mask=~mask)
    assert (ours[1].double() - other[1]).abs().max() > 1e-2 * other[1].abs().max()


@pytest.mark.parametrize("form", IA3_FORMS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ia3_cublas_route_matches_fp64_reference(dtype, kind, form, monkeypatch):
    ran = spy_routes(monkeypatch)
    with routes.forced("cublas"):
        check_ia3_linear_against_fp64(dtype, kind, form, True, "cpu")
    assert ran == ["ia3._forward_cublas", "ia3._backward_cublas"]


@pytest.mark.parametrize("dtype, kind", [(torch.float32, "dense"), (torch.float16, "nf4-64"),
                                         (torch.bfloat16, "nf4-nested-128")], ids=str)
@pytest.mark.parametrize("form", IA3_FORMS)
def test_ia3_decode_route_matches_fp64_reference(dtype, kind, form, monkeypatch):
    """At M <= DECODE_MAX_M the IA3 forward has a decode route (the LoRA decode kernel with a zero
    adapter); its backward runs fused."""
    feedforward, tokens = IA3_FORMS[form], 5
    x, weight, state, dense, ia3, bias = make_ia3_case(dtype, kind, feedforward, "cpu",
                                                            tokens=tokens)
    grad_y = torch.randn(tokens, 1, N, generator=torch.Generator().manual_seed(9)).to(dtype)
    ran = spy_routes(monkeypatch)
    with routes.forced("decode"):
        ours = run_ia3_linear(x, weight, state, ia3, bias, feedforward, grad_y)
    assert ran == ["ia3._forward_decode", "ia3._backward_fused"]
    expected = ia3_linear_fp64(x, dense, ia3, bias, feedforward, grad_y)
    for name, got, want, got_dtype in zip(("y", "dx", "dl"), ours, expected,
                                          (dtype, dtype, torch.float32)):
        assert_op_close(got, want, got_dtype, name, TOLERANCE[dtype])


@pytest.mark.parametrize("route", ["cublas", "fused"])
@pytest.mark.parametrize("form", IA3_FORMS)
def test_ia3_routes_without_bias_and_with_one_gradient(route, form):
    """dl alone (x needs no gradient) and dX alone, without a bias, on each route."""
    feedforward = IA3_FORMS[form]
    dtype = torch.bfloat16
    x, weight, state, dense, ia3, _ = make_ia3_case(dtype, "nf4-nested-128", feedforward,
                                                          "cpu")
    grad_y = torch.randn(M, 1, N, generator=torch.Generator().manual_seed(9)).to(dtype)
    _, dx_ref, dl_ref = ia3_linear_fp64(x, dense, ia3, None, feedforward, grad_y)
    with routes.forced(route):
        leaf = ia3.detach().requires_grad_()
        ops.ia3_linear(x, weight, leaf, feedforward=feedforward, quant_state=state).backward(grad_y)
        assert_op_close(leaf.grad, dl_ref, torch.float32, "dl", TOLERANCE[dtype])
        leaf, x_leaf = ia3.detach(), x.requires_grad_()
        ops.ia3_linear(x_leaf, weight, leaf, feedforward=feedforward,
                       quant_state=state).backward(grad_y)
        assert_op_close(x_leaf.grad, dx_ref, dtype, "dx")


def test_the_default_table_is_what_the_committed_static_report_implies():
    """``routes.FUSED_MAX_M`` equals the crossovers of the newest bench/results/static-*.json
    (``bench.static.route_table``: model estimates). When this fails after the report was built
    again, refresh the table: ``python -m bench.static.route_table`` prints it and the crossovers;
    copy both into lowrank/routes.py (the table and its comment)."""
    from pathlib import Path

    from bench.report import load_static
    from bench.static import route_table

    report = load_static(Path(__file__).parents[1] / "bench" / "results")
    table, _ = route_table.fused_max_m(report)
    assert routes.FUSED_MAX_M == table, (
        f"the static report {report['commit'][:10]} implies FUSED_MAX_M = {table}: run "
        "python -m bench.static.route_table and copy it into lowrank/routes.py")
