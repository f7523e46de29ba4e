"""lowrank.ops.lora_qkv (the fused LoRA q, k and v projections) and
lowrank.block_forwards.attention_qkv, against the unfused path: three ``lora_linear``s of one x.

Odd shapes: M = 37 (as 37 x 1), K = 45; q has 53 outputs, k and v 29 (grouped-query attention);
ranks 8, 5 and 7, so the shared shrink splits unevenly. Tolerances as in test_lora_mlp.py.
"""

import collections

import pytest
import torch
from helpers import (assert_fused_close, make_lora_projection, projection_leaves, projection_linear,
                     randomize_adapters, tiny_model)

import lowrank
from lowrank import ops
from lowrank.block_forwards import attention_qkv
from lowrank.kernels import lora_linear as lora_kernels

TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}
M, K = 37, 45
OUTPUTS = {"q": 53, "k": 29, "v": 29}
RANKS = {"q": 8, "k": 5, "v": 7}
NAMES = ("q", "k", "v")


def make_projections(dtype, kind, device, with_bias=False, dropouts=(0.0, 0.0, 0.0)):
    gen = torch.Generator().manual_seed(0)
    return {name: make_lora_projection(OUTPUTS[name], K, RANKS[name], dtype, kind, device, gen,
                                       0.75, with_bias, dropout)
            for name, dropout in zip(NAMES, dropouts)}


def unfused(x, projections):
    return tuple(projection_linear(x, projections[name]) for name in NAMES)


def fused(x, projections):
    return ops.lora_qkv(x, *(projections[name] for name in NAMES))


def run(qkv, x, projections, grads_y, rng_seed=5):
    for leaf in projection_leaves(x, projections).values():
        leaf.grad = None
    torch.manual_seed(rng_seed)
    outputs = qkv(x, projections)
    torch.autograd.backward(outputs, grads_y)
    grads = {name: leaf.grad for name, leaf in projection_leaves(x, projections).items()}
    return [y.detach() for y in outputs], grads


def check_fused_against_unfused(dtype, kind, device, with_bias=False, dropouts=(0.0, 0.0, 0.0)):
    projections = make_projections(dtype, kind, device, with_bias, dropouts)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(M, 1, K, generator=gen).to(device, dtype).requires_grad_()
    grads_y = [torch.randn(M, 1, OUTPUTS[name], generator=gen).to(device, dtype) for name in NAMES]
    (ys, grads), (ys_ref, grads_ref) = (run(qkv, x, projections, grads_y)
                                        for qkv in (fused, unfused))
    for name, y, y_ref in zip(NAMES, ys, ys_ref):
        assert_fused_close(y, y_ref, TOLERANCE[dtype], name)
    assert set(grads) == set(grads_ref)
    for name, grad in grads_ref.items():
        assert grads[name] is not None, name
        assert_fused_close(grads[name], grad, TOLERANCE[dtype], f"d {name}")
    return grads


@pytest.mark.parametrize("dtype, kind", [
    (torch.float32, "dense"), (torch.float32, "nf4"), (torch.float16, "nf4"),
    (torch.bfloat16, "dense"), (torch.bfloat16, "nf4-nested")], ids=str)
def test_matches_the_unfused_projections(dtype, kind, device):
    check_fused_against_unfused(dtype, kind, device)


def test_biases_and_per_projection_dropout_match_the_unfused_projections(device):
    """k has dropout (its own shrink and mask, drawn second as its lora_linear draws it), q and v
    none (one shared shrink)."""
    check_fused_against_unfused(torch.float32, "nf4", device, with_bias=True,
                                dropouts=(0.0, 0.25, 0.0))


def test_saves_x_once_and_the_three_s(device):
    projections = make_projections(torch.float32, "dense", device)
    x = torch.randn(M, K, device=device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        outputs = fused(x, projections)
    rows = [t for t in saved if t.dim() == 2 and t.shape[0] == M]  # activations: M rows
    assert sum(t is x or t.untyped_storage()._cdata == x.untyped_storage()._cdata
               for t in rows) == 1  # x once, not once per projection
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in rows}
    assert sorted(storages.values()) == sorted([4 * M * K, 4 * M * (RANKS["q"] + RANKS["k"]
                                                                    + RANKS["v"])])
    sum(y.sum() for y in outputs).backward()


def test_x_is_read_once_by_the_shrink_and_once_by_the_a_gradient(monkeypatch):
    """What the fusion gains over three lora_linears of one x: x is one storage either way (the
    ledger finds no saved bytes to gain), but the shrink and the dA product read it once for the
    three projections. Counted as kernel launches, forward and backward, dense and NF4."""
    launches = collections.Counter()
    for name in ("lora_shrink", "lora_forward", "lora_grad_input", "lora_grad_a"):
        def counting(*args, _launch=getattr(lora_kernels, name), _name=name, **kwargs):
            launches[_name] += 1
            return _launch(*args, **kwargs)
        monkeypatch.setattr(lora_kernels, name, counting)
    for kind in ("dense", "nf4"):
        projections = make_projections(torch.float32, kind, "cpu")
        x = torch.randn(M, K, requires_grad=True)
        grads_y = [torch.randn(M, OUTPUTS[name]) for name in NAMES]
        counted = {}
        for qkv in (fused, unfused):
            launches.clear()
            run(qkv, x, projections, grads_y)
            counted[qkv] = dict(launches)
        assert counted[unfused] == {"lora_shrink": 3, "lora_forward": 3, "lora_grad_input": 3,
                                    "lora_grad_a": 3}, kind
        assert counted[fused] == {**counted[unfused], "lora_shrink": 1, "lora_grad_a": 1}, kind


def test_attention_qkv_serves_a_patched_llama_attention_and_declines_what_it_cannot(device):
    model = tiny_model("llama", blocks=1).train()
    lowrank.patch_model(model, rank=4, dropout=0.1)
    randomize_adapters(model)
    attention = model.model.layers[0].self_attn
    x = torch.randn(3, 7, model.config.hidden_size, device=device)  # 21 rows: not decode
    torch.manual_seed(0)
    outputs = attention_qkv(attention, x)
    torch.manual_seed(0)
    expected = (attention.q_proj(x), attention.k_proj(x), attention.v_proj(x))
    for name, y, y_ref in zip(NAMES, outputs, expected):
        assert_fused_close(y, y_ref, 1e-5, name)
    with lowrank.disable_adapters(model):
        assert attention_qkv(attention, x) is NotImplemented
    lowrank.patch_model(model, rank=2, adapter_name="other", target_modules=["q_proj", "k_proj"])
    lowrank.set_adapter(model, "other")  # v_proj has no adapter "other": it runs its base alone
    assert attention_qkv(attention, x) is NotImplemented


def test_compiles_with_torch_compile_without_graph_breaks(device):
    projections = make_projections(torch.float32, "nf4", device)
    x = torch.randn(M, K, device=device)
    trainable = [projections[name].lora_A for name in NAMES]

    def step(x):
        q, k, v = fused(x, projections)
        return q.square().sum() + k.sum() + v.square().mean()

    eager = step(x)
    eager_grads = torch.autograd.grad(eager, trainable)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=True)
    loss = compiled(x)
    torch.testing.assert_close(loss, eager)
    for grad, eager_grad in zip(torch.autograd.grad(loss, trainable), eager_grads):
        torch.testing.assert_close(grad, eager_grad)


def test_bad_arguments_are_named(device):
    projections = make_projections(torch.float32, "dense", device)
    q, k, v = (projections[name] for name in NAMES)
    with pytest.raises(ValueError, match="lora_qkv: q: .*x has 44 features but the weight "
                                         "expects 45"):
        ops.lora_qkv(torch.randn(3, K - 1, device=device), q, k, v)
    with pytest.raises(TypeError, match="lora_qkv: q: .*dense weight dtype torch.float32 differs"):
        ops.lora_qkv(torch.randn(3, K, device=device, dtype=torch.float16), q, k, v)
