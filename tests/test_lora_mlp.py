"""lowrank.ops.lora_mlp (the fused LoRA gated MLP), its gated-activation kernel and
lowrank.block_forwards.gated_mlp_forward, against the unfused path: three ``lora_linear``s and
``act(g) * u`` in torch, which is what a patched model runs without the fusion.

Shapes are odd (M = 37 as 37 x 1, K = 45, intermediate I = 59; ranks 8, 5 and 7, so the shared
shrink of gate and up splits unevenly). Tolerances, relative to the largest unfused value: fp32
1e-5; fp16 and bf16 a few roundings of the dtype, since the fused MLP rounds act(g) * u once where
the unfused one rounds act(g) and then the product.
"""

import contextlib
import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import (assert_fused_close, make_lora_projection, poisoned, projection_leaves,
                     projection_linear, randomize_adapters, relative_error, tiny_model, token_ids)

import lowrank
from lowrank import ops, reference
from lowrank.block_forwards import gated_mlp_forward
from lowrank.kernels import gated_activation as gated_kernels

TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
M, K, I = 37, 45, 59
RANKS = {"gate": 8, "up": 5, "down": 7}
NAMES = ("gate", "up", "down")
TORCH_ACTIVATIONS = {"silu": F.silu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh")}


def make_projections(dtype, kind, device, with_bias=False, dropouts=(0.0, 0.0, 0.0), seed=0):
    """{name: LoraProjection} of gate (K -> I), up (K -> I) and down (I -> K)."""
    gen = torch.Generator().manual_seed(seed)
    return {name: make_lora_projection(n, k, RANKS[name], dtype, kind, device, gen, 1.5,
                                       with_bias, dropout)
            for name, (n, k), dropout in zip(NAMES, ((I, K), (I, K), (K, I)), dropouts)}


def unfused_mlp(x, projections, activation="silu"):
    """What a patched model runs without the fusion."""
    gate, up, down = (projections[name] for name in NAMES)
    return projection_linear(TORCH_ACTIVATIONS[activation](projection_linear(x, gate))
                             * projection_linear(x, up), down)


def fused_mlp(x, projections, activation="silu"):
    return ops.lora_mlp(x, *(projections[name] for name in NAMES), activation=activation)


def run(mlp, x, projections, grad_y, activation="silu", rng_seed=None):
    """(y, {leaf: gradient}) of ``mlp``; torch's RNG seeded first when ``rng_seed`` is given."""
    for leaf in projection_leaves(x, projections).values():
        leaf.grad = None
    if rng_seed is not None:
        torch.manual_seed(rng_seed)
    y = mlp(x, projections, activation)
    y.backward(grad_y)
    return y.detach(), {name: leaf.grad for name, leaf in projection_leaves(x, projections).items()}


def check_fused_against_unfused(dtype, kind, device, activation="silu", with_bias=False,
                                dropouts=(0.0, 0.0, 0.0), tolerance=None):
    projections = make_projections(dtype, kind, device, with_bias, dropouts)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(M, 1, K, generator=gen).to(device, dtype).requires_grad_()
    grad_y = torch.randn(M, 1, K, generator=gen).to(device, dtype)
    fused = run(fused_mlp, x, projections, grad_y, activation, rng_seed=5)
    unfused = run(unfused_mlp, x, projections, grad_y, activation, rng_seed=5)
    tolerance = tolerance or TOLERANCE[dtype]
    assert_fused_close(fused[0], unfused[0], tolerance, "y")
    assert set(fused[1]) == set(unfused[1])
    for name, grad in unfused[1].items():
        assert fused[1][name] is not None, name
        assert_fused_close(fused[1][name], grad, tolerance, f"d {name}")
    return fused, unfused


# Nested NF4 is decoded by the LoRA kernels, tested with every dtype there: one dtype here.
@pytest.mark.parametrize("dtype, kind", [
    *((dtype, kind) for dtype in (torch.float32, torch.float16, torch.bfloat16)
      for kind in ("dense", "nf4")), (torch.bfloat16, "nf4-nested")], ids=str)
def test_matches_the_unfused_mlp(dtype, kind, device):
    check_fused_against_unfused(dtype, kind, device)


@pytest.mark.parametrize("activation", ["gelu_tanh"])
def test_gelu_tanh_and_biases_match_the_unfused_mlp(activation, device):
    check_fused_against_unfused(torch.float32, "nf4", device, activation, with_bias=True)


def test_dropout_draws_the_masks_the_unfused_layers_draw(device):
    """Each projection draws its own seed, in the order gate, up, down, as its lora_linear does:
    with torch's RNG seeded alike, fused and unfused drop the same elements. Gate has dropout and up
    none, so gate shrinks alone and up in the shared group."""
    fused, unfused = check_fused_against_unfused(torch.float32, "dense", device,
                                                 dropouts=(0.2, 0.0, 0.3))
    projections = make_projections(torch.float32, "dense", device, dropouts=(0.2, 0.0, 0.3))
    x = torch.randn(M, 1, K, generator=torch.Generator().manual_seed(1)).to(device)
    x.requires_grad_()
    other = run(fused_mlp, x, projections, torch.ones(M, 1, K, device=device), rng_seed=6)
    # Another seed drops other elements: the comparison above could tell masks apart.
    assert relative_error(other[1]["gate.lora_A"], fused[1]["gate.lora_A"]) > 1e-2


def test_the_gated_kernels_write_every_element_and_match_fp64(device):
    """Forward and backward launchers on NaN-poisoned outputs, against autograd of the reference
    in fp64, for both activations and the three dtypes, on an odd size (not a multiple of BLOCK)."""
    gen = torch.Generator().manual_seed(3)
    shape = (31, 67)  # 2077 elements: three blocks, the last one ragged
    g64, u64, dh64 = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3 for _ in range(3))
    for activation in gated_kernels.ACTIVATIONS:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            g, u, dh = (t.to(device, dtype) for t in (g64, u64, dh64))
            leaves64 = [t.double().requires_grad_() for t in (g, u)]
            h_ref = reference.gated_activation(*leaves64, activation)
            h_ref.backward(dh.double())
            h = poisoned(shape, dtype, device)
            gated_kernels.gated_forward(g, u, h, activation)
            outputs = [poisoned(shape, dtype, device) for _ in range(3)]
            gated_kernels.gated_backward(dh, g, u, *outputs, activation)
            for what, got, want in (("h", h, h_ref), ("h recomputed", outputs[0], h_ref),
                                    ("dg", outputs[1], leaves64[0].grad),
                                    ("du", outputs[2], leaves64[1].grad)):
                assert not got.isnan().any(), f"{activation} {dtype} {what}: NaN"
                error = relative_error(got, want)
                # One rounding to the dtype of fp32 work on exactly representable inputs.
                limit = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
                assert error <= limit, f"{activation} {dtype} {what}: {error:.2e}"
            assert torch.equal(h, outputs[0])  # backward recomputes the forward's h bit for bit


def test_saves_x_gate_and_up_not_the_activation_nor_the_product(device):
    """What the Function keeps for backward, by storage (columns of its M rows): x, g, u and the
    three S (gate's and up's one shared storage), and no tensor of act(g) or h = act(g) * u."""
    projections = make_projections(torch.float32, "nf4", device)
    x = torch.randn(M, K, device=device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fused_mlp(x, projections)
    # The activations: (M x ...) tensors (no weight, adapter or seed has M = 37 rows).
    activations = {t.untyped_storage()._cdata: t for t in saved if t.dim() == 2 and t.shape[0] == M}
    shapes = sorted(tuple(t.untyped_storage().nbytes() // 4 // M for t in activations.values()))
    assert shapes == sorted([K, I, I, RANKS["gate"] + RANKS["up"], RANKS["down"]]), shapes
    y.sum().backward()


def saved_bytes(module, call):
    """Bytes of the unique storages autograd saves while ``call()`` runs, ``module``'s parameters,
    buffers and quant states excluded: the memory ledger's count (bench.memory)."""
    from bench import memory

    excluded = memory._state_storages(module)
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in excluded:
            saved[storage._cdata] = storage
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        call()
    return sum(storage.nbytes() for storage in saved.values())


def test_saves_less_than_the_unfused_mlp_by_the_memory_ledger():
    """A tiny patched Llama, fp32, all-linear LoRA r=4. One MLP block: unfused it saves x, g,
    act(g), u, h and three S (and each projection's 8-byte seed tensor); fused x, g, u and the
    three S (and one seed tensor the projections share without dropout). The whole training step,
    in the ledger (bench.memory.measure_step), saves exactly that difference less per layer, and
    two seed tensors (q, k and v fused keep one where the three layers keep three), with an equal
    loss."""
    from bench import memory

    model = tiny_model("llama", blocks=1).train()
    lowrank.patch_model(model, rank=4)  # the gated MLPs fused (fuse_blocks=True)
    randomize_adapters(model)
    config = model.config
    hidden, intermediate, r = config.hidden_size, config.intermediate_size, 4
    x = torch.randn(2, 9, hidden, requires_grad=True)
    rows = 2 * 9
    mlp = model.model.layers[0].mlp
    with memory.unfused(model):
        unfused = saved_bytes(mlp, lambda: mlp(x))
    fused = saved_bytes(mlp, lambda: mlp(x))
    assert unfused == 4 * rows * (hidden + 4 * intermediate + 3 * r) + 3 * 8
    assert fused == 4 * rows * (hidden + 2 * intermediate + 3 * r) + 8
    assert fused / unfused < 0.6  # 0.593 here (H = 32, I = 48, r = 4)

    tokens = token_ids(batch=2, length=9)
    with memory.unfused(model):
        unfused_loss, unfused_step = memory.measure_step(model, tokens)
    fused_loss, fused_step = memory.measure_step(model, tokens)
    torch.testing.assert_close(fused_loss, unfused_loss, rtol=1e-5, atol=0)
    assert unfused_step["saved"]["total"] - fused_step["saved"]["total"] == \
        config.num_hidden_layers * (unfused - fused + 2 * 8)


def test_gated_mlp_forward_serves_a_patched_llama_mlp_and_declines_what_it_cannot(device):
    model = tiny_model("llama", blocks=1).train()
    lowrank.patch_model(model, rank=4, dropout=0.1, fuse_blocks=False)  # mlp(x): the layers alone
    randomize_adapters(model)
    mlp = model.model.layers[0].mlp
    x = torch.randn(3, 7, model.config.hidden_size, device=device)  # 21 rows: not decode
    torch.manual_seed(0)
    fused = gated_mlp_forward(mlp, x)
    torch.manual_seed(0)
    assert_fused_close(fused, mlp(x), 1e-5, "training, dropout 0.1")
    model.eval()
    assert_fused_close(gated_mlp_forward(mlp, x), mlp(x), 1e-5, "eval")

    with lowrank.disable_adapters(model):
        assert gated_mlp_forward(mlp, x) is NotImplemented
    assert gated_mlp_forward(mlp, x[:2]) is NotImplemented  # 14 rows: the decode path's
    assert gated_mlp_forward(mlp, x) is not NotImplemented
    for declined in ("hook", "dtype", "activation"):
        if declined == "hook":
            handle = mlp.up_proj.register_forward_pre_hook(lambda module, args: None)
            assert gated_mlp_forward(mlp, x) is NotImplemented
            handle.remove()
        elif declined == "dtype":
            assert gated_mlp_forward(mlp, x.half()) is NotImplemented  # fp32 weights
        else:
            act, mlp.act_fn = mlp.act_fn, torch.nn.ReLU()
            assert gated_mlp_forward(mlp, x) is NotImplemented
            mlp.act_fn = act
    lowrank.merge(model)
    assert gated_mlp_forward(mlp, x) is NotImplemented
    lowrank.unmerge(model)

    ia3 = tiny_model("llama", blocks=1)
    lowrank.patch_model(ia3, method="ia3")
    assert gated_mlp_forward(ia3.model.layers[0].mlp, x) is NotImplemented


@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non-reentrant"])
def test_a_patched_llama_trains_alike_with_fused_mlps(checkpointing):
    """One training step of a tiny patched Llama (fp32, LoRA r=4 on every linear, dropout 0.1),
    its MLPs and attention q/k/v fused by patch_model's block stage and unfused: equal loss and
    gradients (1e-5 relative), with and without gradient checkpointing (whose recompute draws the
    dropout seeds again)."""
    from bench import memory

    model = tiny_model("llama", blocks=2).train()
    lowrank.patch_model(model, rank=4, dropout=0.1)
    randomize_adapters(model)
    if checkpointing:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
    tokens = token_ids(batch=3, length=9)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        model.zero_grad()
        assert model.lowrank_state.fused_blocks == {
            **{f"model.layers.{i}.mlp": "lora_gated_mlp" for i in range(2)},
            **{f"model.layers.{i}.self_attn": "lora_qkv_attention" for i in range(2)}}
        with contextlib.nullcontext() if fused else memory.unfused(model):
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()  # not autograd.grad: reentrant checkpointing needs backward
        results.append((loss.detach(), {name: p.grad.clone() for name, p in trainable.items()}))
    (loss, grads), (fused_loss, fused_grads) = results
    assert_fused_close(fused_loss, loss, 1e-5, "loss")
    for name, grad in grads.items():
        assert_fused_close(fused_grads[name], grad, 1e-5, name)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compiles_with_torch_compile_without_graph_breaks(dynamic, device):
    projections = make_projections(torch.float32, "nf4", device)
    x = torch.randn(M, K, device=device)
    trainable = [projections[name].lora_A for name in NAMES]

    def step(x):
        return fused_mlp(x, projections).square().sum()

    eager = step(x)
    eager_grads = torch.autograd.grad(eager, trainable)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    loss = compiled(x)
    grads = torch.autograd.grad(loss, trainable)
    torch.testing.assert_close(loss, eager)
    for grad, eager_grad in zip(grads, eager_grads):
        torch.testing.assert_close(grad, eager_grad)


def test_new_custom_ops_pass_torch_library_checks(device):
    gen = torch.Generator().manual_seed(2)
    g, u, dh = (torch.randn(7, 13, generator=gen).to(device) for _ in range(3))
    for activation in gated_kernels.ACTIVATIONS:
        torch.library.opcheck(ops.gated_activation, (g, u, activation))
        torch.library.opcheck(ops.gated_activation_backward, (dh, g, u, activation))
    p = make_projections(torch.float32, "nf4", device)["gate"]
    x = torch.randn(M, K, generator=gen).to(device)
    a, b = p.lora_A.detach(), p.lora_B.detach()
    seed = torch.zeros(1, dtype=torch.int64, device=device)
    torch.library.opcheck(ops.lora_shrink, (x, a, seed, 0.0))
    s = ops.lora_shrink(x, a, seed, 0.0)
    frozen = ops.FrozenWeight.of(p.weight, p.quant_state)
    torch.library.opcheck(ops.lora_expand, (x, *frozen.flat(), s, b, 1.5, None))


def test_no_rows_give_an_empty_output_and_zero_adapter_gradients(device):
    projections = make_projections(torch.float32, "nf4", device)
    x = torch.randn(0, 3, K, device=device, requires_grad=True)
    y = fused_mlp(x, projections)
    assert y.shape == (0, 3, K)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert all(torch.equal(p.lora_A.grad, torch.zeros_like(p.lora_A)) for p in projections.values())


def test_bad_arguments_are_named(device):
    projections = make_projections(torch.float32, "dense", device)
    gate, up, down = (projections[name] for name in NAMES)
    x = torch.randn(3, K, device=device)
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.lora_mlp(x, gate, up, down, activation="relu")
    with pytest.raises(ValueError, match="lora_mlp: down: .*x has 59 features but the weight "
                                         "expects 45"):
        ops.lora_mlp(x, gate, up, gate)
    with pytest.raises(ValueError, match="lora_mlp: gate: .*dropout must be in"):
        ops.lora_mlp(x, ops.LoraProjection(gate.weight, gate.lora_A, gate.lora_B, 1.0,
                                           dropout=1.0), up, down)
    with pytest.raises(TypeError, match="lora_mlp: up must be a LoraProjection"):
        ops.lora_mlp(x, gate, (up.weight, up.lora_A), down)
    trainable = ops.LoraProjection(gate.weight.clone().requires_grad_(), gate.lora_A, gate.lora_B,
                                   1.0)
    with pytest.raises(ValueError, match="gate's dense weight requires grad"):
        ops.lora_mlp(x, trainable, up, down)
