"""The backend contract of lowrank.patch_peft_model (issue 26): a patched PEFT layer runs lowrank's
op where the op accepts the call and PEFT's own forward otherwise, so no precondition of an op is
ever raised from it; the fallbacks are counted (lowrank.stats()) and warned about once per reason.
PEFT's compiled hot swap (a 0-d tensor scaling) stays on lowrank's op, with no recompile when the
scaling changes; patch_model refuses dtypes the kernels do not take when it patches."""

import copy
import warnings

import pytest
import torch
from peft import IA3Config, LoraConfig, get_peft_model
from peft.utils.hotswap import hotswap_adapter_from_state_dict, prepare_model_for_compiled_hotswap

import lowrank
from lowrank import ops


@pytest.fixture(autouse=True)
def fresh_stats():
    lowrank.reset_stats()
    yield
    lowrank.reset_stats()


@pytest.fixture
def op_calls(monkeypatch):
    """Names of the fused ops that ran, one per call (lowrank's layers look them up in ops)."""
    calls = []

    def counting(op):
        def run(*args, **kwargs):
            calls.append(op.__name__)
            return op(*args, **kwargs)
        return run

    for name in ("lora_linear", "ia3_linear", "lora_mixed"):
        monkeypatch.setattr(ops, name, counting(getattr(ops, name)))
    return calls


def tiny_mlp(seed=0):
    """The issue's model: Linear(10, 20), ReLU, Linear(20, 2)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 2))


def peft_model(method, dtype=torch.float32, **config):
    if method == "lora":
        config = LoraConfig(target_modules=["0", "2"], r=8, init_lora_weights=False, **config)
    else:
        config = IA3Config(target_modules=["0", "2"], feedforward_modules=["2"],
                           init_ia3_weights=False, **config)
    return get_peft_model(tiny_mlp().to(dtype), config)


def patched_and_peft(model):
    """(a copy patched by patch_peft_model, the original: PEFT's own forward)."""
    ours = copy.deepcopy(model)
    report = lowrank.patch_peft_model(ours)
    assert len(report.accelerated) == 2, report
    return ours, model


def outputs_and_grads(model, x):
    """The output of ``model`` on ``x`` and the gradients of its trainable parameters and of x for
    a fixed weighting of the output."""
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    y = model(x)
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    (y * weights).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads


def assert_same_results(ours, peft, x, atol, rtol=0.0):
    y, grad_x, grads = outputs_and_grads(ours, x)
    y_ref, grad_x_ref, grads_ref = outputs_and_grads(peft, x)
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad_x, grad_x_ref, atol=atol, rtol=rtol)
    assert grads.keys() == grads_ref.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=atol, rtol=rtol, msg=name)


def hotswap_ready():
    """The issue's repro: prepare_model_for_compiled_hotswap turns scaling into 0-d tensors (and
    pads A and B to rank 13), here on a patched model and on PEFT's."""
    ours, peft = patched_and_peft(peft_model("lora"))
    for model in (ours, peft):
        prepare_model_for_compiled_hotswap(model, target_rank=13)
    layers = [ours.base_model.model[0], ours.base_model.model[2]]
    assert all(isinstance(layer.scaling["default"], torch.Tensor) for layer in layers)
    assert layers[0].lora_A["default"].weight.shape[0] == 13
    return ours, peft, torch.randn(5, 10, generator=torch.Generator().manual_seed(1))


def test_hotswap_scaling_runs_lowrank_and_matches_peft(op_calls):
    """After the hot-swap preparation the patched layers stay on lowrank's op, with PEFT's
    outputs and gradients."""
    ours, peft, x = hotswap_ready()
    assert_same_results(ours, peft, x, atol=2e-6, rtol=2e-5)
    assert op_calls == ["lora_linear"] * 2
    # PEFT's mixed batches too (A and B padded beyond r: stacked by their shapes).
    names = ["default", "__base__", "default", "__base__", "default"]
    ours.eval(), peft.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, adapter_names=names), peft(x, adapter_names=names),
                                   atol=2e-6, rtol=2e-5)
    assert op_calls == ["lora_linear"] * 2 + ["lora_mixed"] * 2
    assert lowrank.stats() == {"peft_fallbacks": {}}


def test_compiled_hotswap_does_not_recompile_when_the_adapter_changes():
    """Compiled, the patched model traces lowrank's op once. PEFT's hot swap of another adapter
    (rank 6, another alpha: new weights and scaling, written in place) and a scaling changed in
    place are data: PEFT's outputs and no recompile."""
    ours, peft, x = hotswap_ready()
    donor_base = tiny_mlp()  # the same base weights
    torch.manual_seed(9)  # other adapter weights
    donor = get_peft_model(donor_base, LoraConfig(target_modules=["0", "2"], r=6, lora_alpha=10,
                                                  init_lora_weights=False))
    # The donor's adapter weights under their attribute paths, as PEFT's hot swap reads them.
    swapped = {k: v for k, v in donor.state_dict().items() if "lora_" in k}
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append({str(node.target) for module in gm.modules()
                       if isinstance(module, torch.fx.GraphModule) for node in module.graph.nodes})
        return gm.forward

    # PeftModel.forward may have been compiled by an earlier test in this process: its stale cache
    # entries would make this test's first compile count as a recompile.
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend=recording_backend)
    with torch._dynamo.config.patch(error_on_recompile=True):
        y = compiled(x)
        torch.testing.assert_close(y, peft(x), atol=2e-6, rtol=2e-5)
        for model in (ours, peft):
            hotswap_adapter_from_state_dict(model, swapped, "default", donor.peft_config["default"])
        y_swapped = compiled(x)
        torch.testing.assert_close(y_swapped, peft(x), atol=2e-6, rtol=2e-5)
        torch.testing.assert_close(y_swapped, donor(x), atol=2e-6, rtol=2e-5)
        for model in (ours, peft):
            for i in (0, 2):
                model.base_model.model[i].scaling["default"].fill_(-3.0)
        torch.testing.assert_close(compiled(x), peft(x), atol=2e-6, rtol=2e-5)
    assert len(graphs) == 1 and any("lowrank.lora_forward" in t for t in graphs[0]), graphs
    assert lowrank.stats() == {"peft_fallbacks": {}}


def test_tensor_scaling_in_lora_linear_matches_a_float_scaling():
    """ops.lora_linear takes a 0-d float tensor as scaling: the same result and gradients as the
    float, and a gradient for the scaling itself; other tensors are refused by name."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 7, 11, generator=gen)
    w, a, b = (torch.randn(*s, generator=gen) for s in ((13, 11), (5, 11), (13, 5)))
    inputs = [t.requires_grad_(True) for t in (x.clone(), a.clone(), b.clone())]
    ref_inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    scaling = torch.tensor(0.7, requires_grad=True)
    y = ops.lora_linear(inputs[0], w, inputs[1], inputs[2], scaling)
    y_ref = ops.lora_linear(ref_inputs[0], w, ref_inputs[1], ref_inputs[2], 0.7)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    grad_y = torch.randn(y.shape, generator=gen)
    y.backward(grad_y)
    y_ref.backward(grad_y)
    for t, t_ref in zip(inputs, ref_inputs):
        torch.testing.assert_close(t.grad, t_ref.grad, atol=1e-5, rtol=1e-5)
    branch = (x @ a.t() @ b.t()).detach()  # d y / d scaling
    torch.testing.assert_close(scaling.grad, (grad_y * branch).sum(), atol=1e-3, rtol=1e-5)
    for bad, error in ((torch.tensor([0.7]), "0-d float tensor"),
                       (torch.tensor(2), "0-d float tensor"), ("0.7", "must be a number")):
        with pytest.raises((TypeError, ValueError), match=error):
            ops.lora_linear(x, w, a, b, bad)
    with pytest.raises(TypeError, match="must be a number, got Tensor"):
        ops.merge_lora(w, a, b, torch.tensor(0.7))  # the merges take numbers only


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_float64_model_runs_peft_forward_counted_and_warned_once(method, op_calls):
    """The issue's second repro: a float64 PEFT model. Its layers run PEFT's forward (bit for bit
    PEFT's outputs and gradients), each call is counted under the op's reason, and the reason is
    warned about once."""
    ours, peft = patched_and_peft(peft_model(method, torch.float64))
    x = torch.randn(4, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with pytest.warns(UserWarning, match="runs PEFT's own forward.*float64 is not supported"):
        assert_same_results(ours, peft, x, atol=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(x)
    assert op_calls == []
    (reason, calls), = lowrank.stats()["peft_fallbacks"].items()
    assert f"lowrank.{method}_linear: x dtype torch.float64 is not supported" in reason
    assert calls == 4  # two layers, two forwards


def test_compiled_float64_model_falls_back_and_counts_every_call():
    """Under torch.compile the fallback still gives PEFT's result and counts each call (the count
    and the warning run eagerly, between graphs)."""
    ours, peft = patched_and_peft(peft_model("lora", torch.float64))
    compiled = torch.compile(ours, backend="eager")
    x = torch.randn(3, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    with pytest.warns(UserWarning, match="float64 is not supported"):
        for _ in range(3):
            torch.testing.assert_close(compiled(x), peft(x), atol=0.0, rtol=0.0)
    assert list(lowrank.stats()["peft_fallbacks"].values()) == [6]  # two layers, three calls


def meta(model):
    return model.to("meta")


def set_scaling(value):
    def change(model):
        for i in (0, 2):
            model.base_model.model[i].scaling["default"] = value
        return model
    return change


def training_dropout(p):
    def change(model):
        for i in (0, 2):
            model.base_model.model[i].lora_dropout["default"] = torch.nn.Dropout(p)
        return model.train()
    return change


def adapter_dtype(dtype, name):
    def change(model):
        for param_name, param in model.named_parameters():
            if name in param_name:
                param.data = param.data.to(dtype)
        return model
    return change


# Every precondition of lora_linear / ia3_linear (lowrank/_lora_args.py, _dispatch.use_kernels)
# that a PEFT model whose own forward runs can reach: (method, change to the PEFT model, dtype of
# x, what the op says). The others are PEFT's errors too, or PEFT's layers cannot produce them: x
# not a tensor or with the wrong features; a dense weight or bias in another dtype than x (PEFT's
# F.linear refuses it; under autocast both are cast); A, B or l of the wrong shape (PEFT builds
# them); B in another dtype than A (PEFT's lora_B refuses A's output); a trainable NF4 weight
# (bitsandbytes' packed bytes are integers, which cannot require grad).
PRECONDITIONS = [
    ("lora", None, torch.float64, "lora_linear: x dtype torch.float64 is not supported"),
    ("lora", adapter_dtype(torch.float64, "lora_"), torch.float32,
     "lora_linear: lora_A dtype torch.float64 is not supported"),
    ("lora", set_scaling(torch.tensor([0.5])), torch.float32,
     "lora_linear: a tensor scaling must be a 0-d float tensor"),
    ("lora", set_scaling(torch.tensor(2)), torch.float32,
     "lora_linear: a tensor scaling must be a 0-d float tensor"),
    ("lora", training_dropout(1.0), torch.float32, "lora_linear: dropout must be in [0, 1)"),
    ("lora", meta, torch.float32, "no kernels for device type 'meta'"),
    ("ia3", None, torch.float64, "ia3_linear: x dtype torch.float64 is not supported"),
    ("ia3", adapter_dtype(torch.float64, "ia3_l"), torch.float32,
     "ia3_linear: ia3 dtype torch.float64 is not supported"),
    ("ia3", meta, torch.float32, "no kernels for device type 'meta'"),
]


@pytest.mark.parametrize("method, change, dtype, reason", PRECONDITIONS,
                         ids=[f"{case[0]}-{case[3]}" for case in PRECONDITIONS])
def test_no_op_precondition_is_raised_from_a_patched_peft_layer(method, change, dtype, reason,
                                                                 op_calls):
    """Each precondition the ops check, met by a PEFT model: the patched layer does not raise it,
    runs PEFT's forward (PEFT's result exactly) and counts the op's reason."""
    ours, peft = patched_and_peft(peft_model(method, dtype))
    if change is not None:
        ours, peft = change(ours), change(peft)
    device = next(peft.parameters()).device
    x = torch.randn(4, 10, dtype=dtype, generator=torch.Generator().manual_seed(4)).to(device)
    with pytest.warns(UserWarning, match="runs PEFT's own forward"):
        torch.manual_seed(5)
        y = ours(x)
    torch.manual_seed(5)
    y_ref = peft(x)
    if device.type != "meta":
        torch.testing.assert_close(y, y_ref, atol=0.0, rtol=0.0)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    assert op_calls == []
    reasons = lowrank.stats()["peft_fallbacks"]
    assert any(reason in counted for counted in reasons), reasons


def test_mixed_batch_precondition_falls_back_to_peft(op_calls):
    """PEFT's adapter_names= (one adapter per row) on a float64 model: PEFT's forward, counted."""
    ours, peft = patched_and_peft(peft_model("lora", torch.float64))
    for model in (ours, peft):
        torch.manual_seed(8)  # the same random adapter in both
        model.add_adapter("other", LoraConfig(target_modules=["0", "2"], r=4,
                                              init_lora_weights=False))
        model.eval()
    x = torch.randn(3, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    names = ["default", "other", "__base__"]
    with torch.no_grad(), pytest.warns(UserWarning, match="lora_mixed: x dtype torch.float64"):
        torch.testing.assert_close(ours(x, adapter_names=names), peft(x, adapter_names=names),
                                   atol=0.0, rtol=0.0)
    assert op_calls == []


def test_peft_states_that_run_the_base_alone_are_not_counted(op_calls):
    """Adapters disabled or merged: PEFT runs the base layer, which lowrank would not speed up, so
    nothing is counted or warned; several active adapters are a fallback, counted."""
    ours, peft = patched_and_peft(peft_model("lora"))
    x = torch.randn(2, 10, generator=torch.Generator().manual_seed(7))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ours.disable_adapter():
            ours(x)
        for model in (ours, peft):  # both, so that they keep the same (re-rounded) weights
            model.merge_adapter()
        ours(x)
        for model in (ours, peft):
            model.unmerge_adapter()
    assert lowrank.stats() == {"peft_fallbacks": {}} and op_calls == []
    for model in (ours, peft):
        torch.manual_seed(8)  # the same random adapter in both
        model.add_adapter("other", LoraConfig(target_modules=["0", "2"], r=4,
                                              init_lora_weights=False))
        model.base_model.set_adapter(["default", "other"])
    with pytest.warns(UserWarning, match="several adapters active at once"):
        torch.testing.assert_close(ours(x), peft(x), atol=0.0, rtol=0.0)
    assert lowrank.stats() == {"peft_fallbacks": {"several adapters active at once": 2}}


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_patch_model_refuses_float64_when_patching(method):
    """patch_model (no PEFT underneath) refuses a float64 layer at patch time, naming it, and
    leaves the model unpatched."""
    model = tiny_mlp().double()
    kwargs = {"feedforward_modules": ["2"]} if method == "ia3" else {"rank": 4}
    with pytest.raises(TypeError, match="layer '0' computes in torch.float64"):
        lowrank.patch_model(model, method=method, target_modules=["0", "2"], **kwargs)
    assert not hasattr(model, "lowrank_state")
    assert type(model[0]) is torch.nn.Linear


@pytest.mark.parametrize("case", ["float64", "hotswap"])
def test_dora_layers_fall_back_where_dora_linear_refuses(case, monkeypatch):
    """PEFT's DoRA layers run ops.dora_linear, whose checks are not lora_linear's: a float64 model
    and PEFT's compiled-hot-swap scaling (a 0-d tensor, which dora_linear does not take) run PEFT's
    forward, with PEFT's results, and are counted; a plain fp32 call runs dora_linear."""
    calls = []
    dora_linear = ops.dora_linear
    monkeypatch.setattr(ops, "dora_linear", lambda *a, **k: calls.append(1) or dora_linear(*a, **k))
    dtype = torch.float64 if case == "float64" else torch.float32
    ours, peft = patched_and_peft(peft_model("lora", dtype, use_dora=True))
    x = torch.randn(4, 10, dtype=dtype, generator=torch.Generator().manual_seed(3))
    if case == "hotswap":
        assert_same_results(ours, peft, x, atol=1e-6, rtol=1e-5)
        assert calls and not lowrank.stats()["peft_fallbacks"]
        calls.clear()
        for model in (ours, peft):
            prepare_model_for_compiled_hotswap(model, target_rank=13)
    with pytest.warns(UserWarning, match="runs PEFT's own forward.*dora_linear"):
        assert_same_results(ours, peft, x, atol=1e-6 if case == "hotswap" else 0.0,
                            rtol=1e-5 if case == "hotswap" else 0.0)
    assert calls == []
    (reason, count), = lowrank.stats()["peft_fallbacks"].items()
    assert reason.startswith("lowrank.dora_linear: ") and count == 2  # two layers, one forward
