"""LoRA on mixture-of-experts experts: ``lowrank.ops.lora_grouped`` and its kernels against the
fp64 reference, and patched tiny MoE models (Qwen3-MoE, OLMoE, gpt-oss) against PEFT's ``target_parameters``
(``ParamWrapper``).

Op shapes are odd (K = 29, N = 37, rank 3, 5 experts) with imbalanced routing: experts with no
rows, one with one row, one with most of them (more than one 64-row tile)."""

import pytest
import torch
from helpers import TOLERANCE, assert_op_close, poisoned

from lowrank import ops, reference
from lowrank.ops import lora_grouped
from lowrank.kernels import lora_grouped as grouped_kernels

E, K, N, RANK = 5, 29, 37, 3
COUNTS = (0, 70, 1, 0, 9)  # rows per expert: none, two tiles, one row, none, a ragged tile
SCALING = 0.7


def offsets_of(counts, device="cpu"):
    counts = torch.tensor(counts)
    return torch.cat((counts.new_zeros(1), counts.cumsum(0))).to(device, torch.int32)


def make_case(dtype, transposed, counts=COUNTS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = sum(counts)
    x = torch.randn(rows, K, generator=gen).to(dtype)
    shape = (E, K, N) if transposed else (E, N, K)
    weight = (torch.randn(shape, generator=gen) * 0.2).to(dtype)
    lora_a = torch.randn(E * RANK, K, generator=gen) * 0.3
    lora_b = torch.randn(N, RANK * E, generator=gen) * 0.3
    return x, weight, lora_a, lora_b, offsets_of(counts), torch.randn(rows, N, generator=gen).to(dtype)


def fp64_oracle(x, weight, lora_a, lora_b, offsets, grad_y, transposed):
    leaves = [t.detach().double().requires_grad_() for t in (x, lora_a, lora_b)]
    y = reference.lora_grouped(leaves[0], weight.double(), leaves[1], leaves[2], SCALING, offsets,
                               transposed)
    y.backward(grad_y.double())
    return y.detach(), *(t.grad for t in leaves)


def check_op_against_fp64(dtype, transposed, counts):
    """``ops.lora_grouped`` forward and backward on a ``make_case`` case: Y, dX, dA and dB
    against ``fp64_oracle``; returns (lora_a, lora_b) with their gradients."""
    x, weight, lora_a, lora_b, offsets, grad_y = make_case(dtype, transposed, counts)
    for t in (x, lora_a, lora_b):
        t.requires_grad_()
    y = ops.lora_grouped(x, weight, lora_a, lora_b, SCALING, offsets, transposed)
    y.backward(grad_y)
    expected = fp64_oracle(x, weight, lora_a, lora_b, offsets, grad_y, transposed)
    assert_op_close(y, expected[0], dtype, "y")
    assert_op_close(x.grad, expected[1], dtype, "dx")
    # dA, dB: fp32 adapters, from products of x's dtype accumulated in fp32.
    assert_op_close(lora_a.grad, expected[2], torch.float32, "dA", TOLERANCE[dtype])
    assert_op_close(lora_b.grad, expected[3], torch.float32, "dB", TOLERANCE[dtype])
    return lora_a, lora_b


@pytest.mark.parametrize("transposed", [False, True], ids=["E-N-K", "E-K-N"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_lora_grouped_against_fp64(dtype, transposed):
    lora_a, lora_b = check_op_against_fp64(dtype, transposed, COUNTS)
    # An expert without rows gets exactly zero gradient.
    rank_rows = lora_a.grad.view(E, RANK, K)
    assert rank_rows[0].eq(0).all() and rank_rows[3].eq(0).all()
    assert lora_b.grad.view(N, RANK, E)[:, :, 3].eq(0).all()


def test_lora_grouped_kernels_write_every_element():
    """Launchers into NaN-filled outputs: every row of every expert with rows is written, and the
    fp32 weight gradients of every expert (zeros for those without rows). dS and dB with N = 300
    columns: two chunks of dY's columns, whose dS partials are summed."""
    dtype = torch.float32
    x, weight, lora_a, lora_b, offsets, grad_y = make_case(dtype, False, counts=(64, 0, 0, 1, 0))
    rows = x.shape[0]
    a, b = lora_a.stride(), lora_b.stride()
    s = poisoned((rows, RANK), dtype, "cpu")
    grouped_kernels.grouped_shrink(x, lora_a, (RANK * a[0], a[0], a[1]), s, offsets)
    y = poisoned((rows, N), dtype, "cpu")
    grouped_kernels.grouped_gemm(x, weight, weight.stride(), s, lora_b, (b[1], b[0], E * b[1]), y,
                                 offsets, SCALING)
    expected = fp64_oracle(x, weight, lora_a, lora_b, offsets, grad_y, False)
    assert_op_close(y, expected[0], dtype, "y")
    assert grouped_kernels.output_grad_config(None, dtype)["BLOCK_N"] < 300
    gen = torch.Generator().manual_seed(1)
    wide_b = torch.randn(300, RANK * E, generator=gen)
    wide_dy = torch.randn(rows, 300, generator=gen)
    grad_b = poisoned(wide_b.shape, torch.float32, "cpu")
    grad_s = poisoned((rows, RANK), dtype, "cpu")
    experts_b = wide_b.view(300, RANK, E).permute(2, 0, 1)  # B_e: E x N x r, PEFT's strides
    grouped_kernels.grouped_output_grad(wide_dy, s, experts_b, experts_b.stride(), grad_b,
                                        (1, RANK * E, E), grad_s, offsets, SCALING)
    for e, (first, end) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        if first == end:
            assert grad_b.view(300, RANK, E)[:, :, e].eq(0).all(), f"dB_{e} of an expert without rows"
            continue
        dy_e, s_e, b_e = wide_dy[first:end].double(), s[first:end].double(), experts_b[e].double()
        assert_op_close(grad_b.view(300, RANK, E)[:, :, e], SCALING * dy_e.T @ s_e, dtype,
                        f"dB_{e}")
        assert_op_close(grad_s[first:end], SCALING * dy_e @ b_e, dtype, f"dS_{e}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_lora_grouped_gathers_rows_through_row_index(dtype, fused_output_grad):
    """x's rows read through row_index in the shrink, the GEMM and dA (no sorted copy): the same
    as the op over x[row_index], and x's gradient sums the shares of its repeated rows."""
    _, weight, lora_a, lora_b, offsets, grad_y = make_case(dtype, False)
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randn(23, K, generator=gen).to(dtype).requires_grad_()
    row_index = torch.randint(0, 23, (sum(COUNTS),), generator=gen)
    lora_a.requires_grad_()
    lora_b.requires_grad_()
    y = ops.lora_grouped(tokens, weight, lora_a, lora_b, SCALING, offsets, row_index=row_index)
    y.backward(grad_y)
    leaves = [t.detach().double().requires_grad_() for t in (tokens, lora_a, lora_b)]
    expected = reference.lora_grouped(leaves[0][row_index], weight.double(), leaves[1], leaves[2],
                                      SCALING, offsets)
    expected.backward(grad_y.double())
    assert_op_close(y, expected.detach(), dtype, "y")
    assert_op_close(tokens.grad, leaves[0].grad, dtype, "dx")
    assert_op_close(lora_a.grad, leaves[1].grad, torch.float32, "dA", TOLERANCE[dtype])
    assert_op_close(lora_b.grad, leaves[2].grad, torch.float32, "dB", TOLERANCE[dtype])


def test_lora_grouped_rank_over_one_chunk():
    """Rank 20: two 16-rank chunks in every kernel (the shrink's and the dS / dB pass's program
    axis, the GEMMs' rank loops), against the fp64 reference."""
    gen = torch.Generator().manual_seed(3)
    experts, rank, counts = 3, 20, (0, 37, 5)
    x = torch.randn(sum(counts), K, generator=gen).requires_grad_()
    weight = torch.randn(experts, N, K, generator=gen) * 0.2
    lora_a = (torch.randn(experts * rank, K, generator=gen) * 0.3).requires_grad_()
    lora_b = (torch.randn(N, rank * experts, generator=gen) * 0.3).requires_grad_()
    offsets, grad_y = offsets_of(counts), torch.randn(sum(counts), N, generator=gen)
    ops.lora_grouped(x, weight, lora_a, lora_b, SCALING, offsets).backward(grad_y)
    leaves = [t.detach().double().requires_grad_() for t in (x, lora_a, lora_b)]
    expected = reference.lora_grouped(leaves[0], weight.double(), leaves[1], leaves[2], SCALING,
                                      offsets)
    expected.backward(grad_y.double())
    for name, actual, leaf in zip(("dx", "dA", "dB"), (x, lora_a, lora_b), leaves):
        assert_op_close(actual.grad, leaf.grad, torch.float32, name)


def test_lora_grouped_all_rows_on_one_expert_and_none():
    x, weight, lora_a, lora_b, offsets, grad_y = make_case(torch.float32, False,
                                                           counts=(0, 0, 11, 0, 0))
    y = ops.lora_grouped(x, weight, lora_a, lora_b, SCALING, offsets)
    assert_op_close(y, fp64_oracle(x, weight, lora_a, lora_b, offsets, grad_y, False)[0],
                    torch.float32, "y")
    empty = ops.lora_grouped(x[:0], weight, lora_a, lora_b, SCALING, offsets_of((0,) * E))
    assert empty.shape == (0, N)


def test_lora_grouped_refuses_bad_arguments():
    x, weight, lora_a, lora_b, offsets, _ = make_case(torch.float32, False)
    with pytest.raises(ValueError, match="PEFT's target_parameters layout"):
        ops.lora_grouped(x, weight, lora_a[:-1], lora_b, SCALING, offsets)
    with pytest.raises(ValueError, match="x has 28 features"):
        ops.lora_grouped(x[:, 1:], weight, lora_a, lora_b, SCALING, offsets)
    with pytest.raises(TypeError, match="offsets must be 6"):
        ops.lora_grouped(x, weight, lora_a, lora_b, SCALING, offsets[1:])
    with pytest.raises(TypeError, match="expert stack in x's dtype"):
        ops.lora_grouped(x, weight.half(), lora_a, lora_b, SCALING, offsets)
    for bad in (offsets + 1, offsets.flip(0), torch.cat((offsets[:-1], offsets[-1:] - 1))):
        with pytest.raises(RuntimeError, match="offsets must rise from 0 to the 80 rows"):
            ops.lora_grouped(x, weight, lora_a, lora_b, SCALING, bad)
    with pytest.raises(TypeError, match="row_index must be a 1-D int32/int64"):
        ops.lora_grouped(x, weight, lora_a, lora_b, SCALING, offsets, row_index=offsets.float())
    for bad in (torch.full((80,), 9), torch.full((80,), -1)):
        with pytest.raises(RuntimeError, match="row_index must name rows of x's 9"):
            ops.lora_grouped(x[:9], weight, lora_a, lora_b, SCALING, offsets, row_index=bad)


def test_lora_grouped_custom_ops_trace():
    """The custom ops' fake implementations agree with the kernels (torch.library.opcheck), and
    torch.compile traces the op whole (fullgraph) with gradients."""
    import importlib

    module = importlib.import_module("lowrank.ops.lora_grouped")
    x, weight, lora_a, lora_b, offsets, grad_y = make_case(torch.float32, False, counts=(3, 0, 4, 1, 1))
    experts_b = module._experts_b(lora_b, E, x.dtype)  # the ops take B's E x N x r copy
    torch.library.opcheck(module.lora_grouped_forward,
                          (x, weight, False, lora_a, experts_b, SCALING, offsets, None))
    s = torch.randn(x.shape[0], RANK)
    torch.library.opcheck(module.lora_grouped_backward,
                          (grad_y, x, s, weight, False, lora_a, experts_b, SCALING, offsets, None))
    tokens, row_index = x[:4], torch.tensor([3, 0, 1, 3, 2, 0, 1, 2, 0])  # gathered rows
    torch.library.opcheck(module.lora_grouped_forward,
                          (tokens, weight, False, lora_a, experts_b, SCALING, offsets, row_index))
    torch.library.opcheck(module.lora_grouped_backward, (grad_y, tokens, s, weight, False, lora_a,
                                                         experts_b, SCALING, offsets, row_index))
    lora_a.requires_grad_()
    compiled = torch.compile(lambda a: ops.lora_grouped(x, weight, a, lora_b, SCALING, offsets),
                             fullgraph=True, backend="aot_eager")
    compiled(lora_a).backward(grad_y)
    expected = fp64_oracle(x, weight, lora_a, lora_b, offsets, grad_y, False)
    assert_op_close(lora_a.grad, expected[2], torch.float32, "dA")


@pytest.mark.parametrize("arch", [None, 80, 86, 89, 90])
def test_grouped_gemm_configs_share_one_block_m(arch):
    """The launcher builds its tile list for the first config's BLOCK_M before autotuning picks
    one: every config of a list must have that BLOCK_M."""
    from lowrank.kernels._common import Target

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for configs in (grouped_kernels.gemm_configs(Target(arch, 132), dtype),
                        grouped_kernels.grad_input_configs(Target(arch, 132), dtype)):
            assert {config["BLOCK_M"] for config in configs} == {configs[0]["BLOCK_M"]}


def test_fuses_output_grad_where_the_model_says(monkeypatch):
    """dS and dB inside the dX GEMM (``fuses_output_grad``): on sm_90 for both Qwen3-30B-A3B
    widths, on sm_80/86/89 only for down's 768-wide dX and widths of multiples of 16; never on
    64-wide tiles (fp32, the interpreter), for a rank whose padded block is over an eighth of the
    tile's width, or on a GPU the model has not read."""
    from lowrank.kernels._common import Target

    def fuses(arch, dtype, rank, in_features, out_features=2048):
        monkeypatch.setattr(grouped_kernels._common, "target", lambda device: Target(arch, 132))
        return grouped_kernels.fuses_output_grad(torch.device("cpu"), dtype, rank, in_features,
                                                 out_features)

    bf16 = torch.bfloat16
    assert fuses(90, bf16, 16, 2048) and fuses(90, bf16, 16, 768) and fuses(89, bf16, 16, 768)
    assert not fuses(89, bf16, 16, 2048) and not fuses(90, bf16, 32, 768)
    assert fuses(89, bf16, 8, 768) and fuses(80, torch.float16, 16, 768)
    assert fuses(90, bf16, 16, 770, 37) and not fuses(89, bf16, 16, 770) and not fuses(
        86, bf16, 16, 768, 2050)
    assert not fuses(90, torch.float32, 16, 768) and not fuses(None, bf16, 16, 768)
    assert not fuses(94, bf16, 16, 768)  # gfx942: not read by the model
    # S inside the forward GEMM: x up to 1024 wide on sm_90 too (gate_up's 2048: no gain there).
    monkeypatch.setattr(grouped_kernels._common, "target", lambda device: Target(90, 132))
    cpu = torch.device("cpu")
    assert grouped_kernels.fuses_shrink(cpu, bf16, 16, 768, 2048, True)
    assert not grouped_kernels.fuses_shrink(cpu, bf16, 16, 2048, 1536, False)
    monkeypatch.setattr(grouped_kernels._common, "target", lambda device: Target(89, 128))
    assert grouped_kernels.fuses_shrink(cpu, bf16, 16, 768, 2048, False)
    assert not grouped_kernels.fuses_shrink(cpu, bf16, 16, 768, 2048, True)


def test_expert_offsets():
    ids = torch.tensor([1, 1, 2, 4, 4, 4])
    assert ops.expert_offsets(ids, E).tolist() == [0, 0, 2, 3, 3, 6]


# Patched tiny MoE models against PEFT's target_parameters (fp32).

MODEL_TOLERANCE = 1e-5


def tiny_moe(family, seed=0):
    """A one-block MoE causal LM, 4 experts, top-2, odd-ish sizes."""
    from transformers import (GptOssConfig, GptOssForCausalLM, OlmoeConfig, OlmoeForCausalLM,
                              Qwen3MoeConfig, Qwen3MoeForCausalLM)

    common = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, vocab_size=64)
    torch.manual_seed(seed)
    if family == "qwen3_moe":
        return Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, intermediate_size=40, head_dim=8,
                                                  moe_intermediate_size=24, num_experts=4))
    if family == "gpt_oss":  # experts stored E x in x out, with biases and its own gate
        model = GptOssForCausalLM(GptOssConfig(**common, intermediate_size=24, head_dim=8,
                                               num_local_experts=4, layer_types=["full_attention"],
                                               eos_token_id=0, pad_token_id=0))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "experts" in name and name.endswith("bias"):
                    param.normal_(0, 0.1)  # they start at zero
        return model
    return OlmoeForCausalLM(OlmoeConfig(**common, intermediate_size=24, num_experts=4,
                                        eos_token_id=0))


EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def patched_and_peft(family, target_parameters=EXPERT_PARAMETERS, route_to=None):
    """(base, a patched copy with random adapters on every linear layer and the experts, PEFT's
    model loaded from its save). ``route_to``: an expert that every token picks first (the router
    made to answer it; the second pick is expert 0: the others get no rows)."""
    import copy
    import tempfile

    import peft

    import lowrank

    base = tiny_moe(family)
    if route_to is not None:
        router = base.model.layers[0].mlp.gate

        def forced(hidden_states):  # every token: expert route_to first, expert 0 second
            rows = hidden_states.reshape(-1, router.hidden_dim).shape[0]
            index = torch.tensor([route_to, 0]).expand(rows, 2)
            return None, torch.tensor([0.75, 0.25]).expand(rows, 2), index

        router.forward = forced
    ours = copy.deepcopy(base)
    with pytest.warns(UserWarning, match=r"mlp\.(gate|router)\.weight") as caught:
        lowrank.patch_model(ours, rank=3, alpha=5)
    assert not any("experts" in str(w.message) for w in caught), "the experts are adapted now"
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in ours.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    directory = tempfile.mkdtemp()
    lowrank.save_adapter(ours, directory)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), directory, is_trainable=True)
    return base, ours, theirs, directory


def grads_by_peft_key(model, ids):
    """(logits, {PEFT key without prefix and adapter name: gradient}) after one backward."""
    import lowrank
    from lowrank.adapter_layer import adapter_layers

    model.zero_grad()
    logits = model(ids).logits
    logits.square().mean().backward()
    if hasattr(model, "lowrank_state"):
        return logits.detach(), {f"{path}.{attr}.weight": weight.grad
                                 for path, layer in adapter_layers(model).items()
                                 for attr, weight in layer.adapter_weights("default").items()}
    assert lowrank  # PEFT's model: its own names
    return logits.detach(), {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
                             for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "gpt_oss"])
def test_patched_moe_matches_peft(family):
    from helpers import assert_model_close

    base, ours, theirs, _ = patched_and_peft(family)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    logits, grads = grads_by_peft_key(ours, ids)
    expected, expected_grads = grads_by_peft_key(theirs, ids)
    assert_model_close(logits, expected, MODEL_TOLERANCE, "logits")
    assert grads.keys() == expected_grads.keys()
    assert any(".experts.base_layer.lora_A" in k for k in grads)
    for key, grad in grads.items():
        assert_model_close(grad, expected_grads[key], MODEL_TOLERANCE, key)
    # A fresh (B = 0) adapter adds nothing: the base model's output to rounding.
    import lowrank

    with lowrank.disable_adapters(ours):
        assert_model_close(ours(ids).logits, base(ids).logits, 0.0, "disabled")


def test_imbalanced_routing_matches_peft():
    """Every token on experts 2 and 0 (1 and 3 get no rows): outputs and adapter gradients as PEFT's,
    the idle experts' gradients exactly zero."""
    from helpers import assert_model_close

    _, ours, theirs, _ = patched_and_peft("qwen3_moe", route_to=2)
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(2))
    logits, grads = grads_by_peft_key(ours, ids)
    expected, expected_grads = grads_by_peft_key(theirs, ids)
    assert_model_close(logits, expected, MODEL_TOLERANCE, "logits")
    for key, grad in grads.items():
        assert_model_close(grad, expected_grads[key], MODEL_TOLERANCE, key)
    idle = grads["model.layers.0.mlp.experts.lora_A.weight"].view(4, 3, -1)[[1, 3]]
    assert idle.eq(0).all()


def test_peft_saved_expert_adapter_loads_bit_equal():
    """PEFT's save (target_parameters) -> lowrank.load_adapter: the same tensors, the same outputs;
    and lowrank's save of it is PEFT's file again."""
    import copy
    import tempfile

    from safetensors.torch import load_file

    import lowrank
    from helpers import assert_model_close

    base, ours, theirs, directory = patched_and_peft("olmoe")
    resaved = tempfile.mkdtemp()
    theirs.save_pretrained(resaved)
    loaded = lowrank.load_adapter(copy.deepcopy(base), resaved)
    again = tempfile.mkdtemp()
    lowrank.save_adapter(loaded, again)
    first, second = (load_file(f"{d}/adapter_model.safetensors") for d in (resaved, again))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(4))
    assert_model_close(loaded(ids).logits, theirs(ids).logits, MODEL_TOLERANCE, "loaded")


def test_expert_projection_by_name_merge_and_unmerge():
    """target_modules naming one expert projection adapts it alone (PEFT's single ParamWrapper
    keys); merge writes s B_e A_e into the stored experts, unmerge takes it out again."""
    import copy

    import lowrank
    from helpers import assert_model_close

    base = tiny_moe("qwen3_moe")
    model = lowrank.patch_model(copy.deepcopy(base), rank=2, target_modules=["q_proj", "gate_up_proj"])
    experts = model.model.layers[0].mlp.experts
    assert experts.projections["default"] == ("gate_up_proj",)
    assert set(experts.adapter_weights("default")) == {"lora_A", "lora_B"}
    with torch.no_grad():
        experts.lora_B["default"]["gate_up_proj"].weight.normal_(0, 0.1)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(5))
    adapted = model(ids).logits
    original = experts.base_layer.gate_up_proj.detach().clone()
    lowrank.merge(model)
    assert not torch.equal(experts.base_layer.gate_up_proj, original)
    assert_model_close(model(ids).logits, adapted, MODEL_TOLERANCE, "merged")
    lowrank.unmerge(model)
    assert_model_close(experts.base_layer.gate_up_proj, original, 1e-6, "unmerged")
    merged = lowrank.merge_and_unload(model)
    assert type(merged.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
    assert_model_close(merged(ids).logits, adapted, MODEL_TOLERANCE, "merge_and_unload")


def test_moe_trains_and_refuses_dropout():
    import lowrank

    model = lowrank.patch_model(tiny_moe("olmoe"), rank=2, target_modules=["experts"])
    experts = model.model.layers[0].mlp.experts
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(w) for w in experts.adapter_weights("default").values()}
    assert len(trainable) == 4
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(6))
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    no_tokens = experts(torch.zeros(0, 32), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert no_tokens.shape == (0, 32)
    with pytest.raises(ValueError, match="takes no dropout"):
        lowrank.patch_model(tiny_moe("olmoe"), rank=2, dropout=0.1)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_patch_peft_model_accelerates_param_wrappers(family, monkeypatch):
    """A PEFT model with LoRA on the experts (target_parameters) is fully accelerated: its nested
    ParamWrappers run as lora_grouped through the outermost one, with PEFT's outputs and
    gradients, and no call falls back; unpatch gives PEFT's forward back."""
    import copy

    import lowrank
    from helpers import assert_model_close

    _, _, theirs, _ = patched_and_peft(family)
    accelerated = copy.deepcopy(theirs)
    lowrank.reset_stats()
    report = lowrank.patch_peft_model(accelerated)
    assert not report.not_accelerated and not report.adapters_not_served
    assert report.accelerated["base_model.model.model.layers.0.mlp.experts"] == "LoRA over MoE experts"
    assert "run by" in report.accelerated["base_model.model.model.layers.0.mlp.experts.base_layer"]
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(7))
    calls = []
    monkeypatch.setattr(ops, "lora_grouped", lambda *args: calls.append(1) or lora_grouped(*args))
    logits, grads = grads_by_peft_key(accelerated, ids)
    assert len(calls) == 2  # both projections of the one MoE block, each one grouped op
    monkeypatch.undo()
    expected, expected_grads = grads_by_peft_key(theirs, ids)
    assert_model_close(logits, expected, MODEL_TOLERANCE, "logits")
    for key, grad in grads.items():
        assert_model_close(grad, expected_grads[key], MODEL_TOLERANCE, key)
    assert lowrank.stats()["peft_fallbacks"] == {}
    with accelerated.disable_adapter():  # PEFT runs the base experts alone: not a fallback
        accelerated(ids)
    assert lowrank.stats()["peft_fallbacks"] == {}
    lowrank.unpatch_peft_model(accelerated)
    assert "forward" not in vars(accelerated.base_model.model.model.layers[0].mlp.experts)


def test_several_adapter_features_refuse_experts_by_name():
    """Weighted merges and mixed batches have no form for experts yet: an error naming them; a
    second adapter on the experts and a hot swap of their weights work."""
    import lowrank

    model = lowrank.patch_model(tiny_moe("qwen3_moe"), rank=2, target_modules=["experts"])
    lowrank.patch_model(model, rank=2, target_modules=["experts"], adapter_name="b")
    with pytest.raises(ValueError, match="mixture-of-experts experts"):
        lowrank.add_weighted_adapter(model, ["default", "b"], [1.0, 1.0], "sum")
    with pytest.raises(ValueError, match="mixture-of-experts experts module"):
        with lowrank.mixed_batch(model, ["default", "b"]):
            pass
    experts = model.model.layers[0].mlp.experts
    swapped = {f"base_model.model.model.layers.0.mlp.experts.{attr}.weight": torch.ones_like(w)
               for attr, w in experts.adapter_weights("default").items()}
    lowrank.hotswap_adapter(model, swapped, "default")
    assert all(w.eq(1).all() for w in experts.adapter_weights("default").values())


@pytest.fixture(params=[False, True], ids=["own-passes", "in-the-GEMMs"])
def fused_output_grad(request, monkeypatch):
    """Both routes: S, and dS with dB, in their own passes over x and dY, or inside the forward
    and dX GEMMs (``grouped_forward``, ``grouped_grad_input``; on a GPU only where
    ``fuses_shrink`` / ``fuses_output_grad`` say they pay)."""
    monkeypatch.setattr(grouped_kernels, "fuses_output_grad", lambda *args: request.param)
    monkeypatch.setattr(grouped_kernels, "fuses_shrink", lambda *args: request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("counts", [COUNTS, (0, 0, 11, 0, 0)], ids=["imbalanced", "one-expert"])
def test_lora_grouped_backward_routes_against_fp64(dtype, counts, fused_output_grad):
    """The whole op through each route, E x K x N weights (gpt-oss's, read transposed by dX),
    imbalanced routing and every row on one expert: Y, dX, dA and dB against the fp64
    reference, zeros for experts without rows."""
    lora_a, lora_b = check_op_against_fp64(dtype, True, counts)
    assert lora_b.grad.view(N, RANK, E)[:, :, 0].eq(0).all()
    assert lora_b.grad.view(N, RANK, E)[:, :, 3].eq(0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_grouped_grad_input_writes_every_element(dtype):
    """``grouped_grad_input`` into NaN-filled outputs, B through PEFT's strides (ranks E apart; the
    op passes an E x N x r copy, these strides are the general case), N =
    300 columns of dY (several BLOCK_K chunks, dealt over the column tiles for dB) and K = 150
    (three column tiles: dS from each, stored once), rank 20 (padded to 32), an expert with no
    rows, one with every row of a 64-row tile and one more (two tiles): every dX row, dS row and
    dB element written, against fp64."""
    gen = torch.Generator().manual_seed(4)
    experts, rank, k, n, counts = 4, 20, 150, 300, (0, 65, 0, 3)
    rows = sum(counts)
    offsets = offsets_of(counts)
    grad_y = torch.randn(rows, n, generator=gen).to(dtype)
    s = (torch.randn(rows, rank, generator=gen) * 0.5).to(dtype)
    weight = (torch.randn(experts, n, k, generator=gen) * 0.2).to(dtype)  # E x N x K: dX reads it
    lora_a = torch.randn(experts * rank, k, generator=gen) * 0.3
    lora_b = torch.randn(n, rank * experts, generator=gen) * 0.3
    grad_x = poisoned((rows, k), dtype, "cpu")
    grad_s = poisoned((rows, rank), dtype, "cpu")
    grad_b = poisoned(lora_b.shape, torch.float32, "cpu")
    a, b, w = lora_a.stride(), lora_b.stride(), weight.stride()
    grouped_kernels.grouped_grad_input(
        grad_y, weight, (w[0], w[2], w[1]), s, lora_b, (b[1], b[0], experts * b[1]), lora_a,
        (rank * a[0], a[1], a[0]), grad_x, grad_s, grad_b, (1, rank * experts, experts), offsets,
        SCALING)
    grad_bs = grad_b.view(n, rank, experts)
    for e, (first, end) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        if first == end:
            assert grad_bs[:, :, e].eq(0).all(), f"dB_{e} of an expert without rows"
            continue
        dy_e, s_e = grad_y[first:end].double(), s[first:end].double()
        b_e = lora_b.view(n, rank, experts)[:, :, e].double()
        a_e = lora_a.view(experts, rank, k)[e].double()
        grad_s_e = SCALING * dy_e @ b_e
        assert_op_close(grad_s[first:end], grad_s_e, dtype, f"dS_{e}")
        # dX's expand takes dS as stored (rounded to x's dtype), as the separate route does.
        expected_x = dy_e @ weight[e].double() + grad_s[first:end].double() @ a_e
        assert_op_close(grad_x[first:end], expected_x, dtype, f"dX_{e}")
        assert_op_close(grad_bs[:, :, e], SCALING * dy_e.T @ s_e, torch.float32, f"dB_{e}",
                        TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_grouped_forward_writes_every_element(dtype):
    """``grouped_forward`` (S inside the forward GEMM) into NaN-filled y and S, N = 150 (three
    column tiles, each computing S, one storing it), K = 70 (several BLOCK_K chunks of A_e),
    rank 20 (padded to 32), x's rows gathered through row_index, an expert with no rows and one
    with two tiles: against fp64, S as stored (rounded to x's dtype) in y's expand."""
    gen = torch.Generator().manual_seed(5)
    experts, rank, k, n, counts = 3, 20, 70, 150, (66, 0, 2)
    rows = sum(counts)
    offsets = offsets_of(counts)
    tokens = torch.randn(31, k, generator=gen).to(dtype)
    row_index = torch.randint(0, 31, (rows,), generator=gen)
    weight = (torch.randn(experts, n, k, generator=gen) * 0.2).to(dtype)
    lora_a = torch.randn(experts * rank, k, generator=gen) * 0.3
    lora_b = torch.randn(n, rank * experts, generator=gen) * 0.3
    experts_b = lora_b.view(n, rank, experts).permute(2, 0, 1).to(dtype).contiguous()
    s = poisoned((rows, rank), dtype, "cpu")
    y = poisoned((rows, n), dtype, "cpu")
    a = lora_a.stride()
    grouped_kernels.grouped_forward(tokens, weight, weight.stride(), lora_a,
                                    (rank * a[0], a[1], a[0]), experts_b, experts_b.stride(), s,
                                    y, offsets, SCALING, row_index)
    x = tokens[row_index].double()
    for e, (first, end) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        if first == end:
            continue
        a_e = lora_a.view(experts, rank, k)[e].double()
        assert_op_close(s[first:end], x[first:end] @ a_e.T, dtype, f"S_{e}")
        expected = (x[first:end] @ weight[e].double().T
                    + SCALING * s[first:end].double() @ experts_b[e].double().T)
        assert_op_close(y[first:end], expected, dtype, f"y_{e}")


def expert_biases(dtype, experts=E, n=N, seed=6):
    return (torch.randn(experts, n, generator=torch.Generator().manual_seed(seed)) * 0.5).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_lora_grouped_bias_in_the_epilogue_against_fp64(dtype, fused_output_grad):
    """The experts' biases added in the forward GEMM's epilogue (both forward routes), E x K x N
    weights, x's rows gathered through row_index, experts without rows: Y, dX, dA and dB against
    the fp64 reference with the bias added after the projection (biases of 0.5: far above the
    tolerances, so a bias left out or on another expert's rows fails), and a bias that requires
    grad is refused (it would get no gradient)."""
    _, weight, lora_a, lora_b, offsets, grad_y = make_case(dtype, True)
    bias = expert_biases(dtype)
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randn(23, K, generator=gen).to(dtype).requires_grad_()
    row_index = torch.randint(0, 23, (sum(COUNTS),), generator=gen)
    lora_a.requires_grad_()
    lora_b.requires_grad_()
    y = ops.lora_grouped(tokens, weight, lora_a, lora_b, SCALING, offsets, True, row_index, bias)
    y.backward(grad_y)
    leaves = [t.detach().double().requires_grad_() for t in (tokens, lora_a, lora_b)]
    expected = reference.lora_grouped(leaves[0][row_index], weight.double(), leaves[1], leaves[2],
                                      SCALING, offsets, True, bias.double())
    expected.backward(grad_y.double())
    assert_op_close(y, expected.detach(), dtype, "y")
    assert_op_close(tokens.grad, leaves[0].grad, dtype, "dx")
    assert_op_close(lora_a.grad, leaves[1].grad, torch.float32, "dA", TOLERANCE[dtype])
    assert_op_close(lora_b.grad, leaves[2].grad, torch.float32, "dB", TOLERANCE[dtype])
    with pytest.raises(ValueError, match="expert bias requires grad"):
        ops.lora_grouped(tokens, weight, lora_a, lora_b, SCALING, offsets, True, row_index,
                         bias.clone().requires_grad_())
    with pytest.raises(TypeError, match=r"bias must be the experts' \(5, 37\) biases"):
        ops.lora_grouped(tokens, weight, lora_a, lora_b, SCALING, offsets, True, row_index,
                         bias[:, :-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_grouped_gemm_bias_writes_every_element(dtype):
    """Both forward launchers with a bias (through strides: a column slice of a wider table) into
    NaN-filled outputs, N = 150 (three column tiles), an expert with no rows and one with two
    row tiles: every row written, each with its expert's bias, against fp64."""
    gen = torch.Generator().manual_seed(8)
    experts, rank, k, n, counts = 3, 5, 70, 150, (66, 0, 2)
    rows = sum(counts)
    offsets = offsets_of(counts)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    weight = (torch.randn(experts, n, k, generator=gen) * 0.2).to(dtype)
    lora_a = torch.randn(experts * rank, k, generator=gen) * 0.3
    lora_b = torch.randn(n, rank * experts, generator=gen) * 0.3
    experts_b = lora_b.view(n, rank, experts).permute(2, 0, 1).to(dtype).contiguous()
    bias = expert_biases(dtype, experts, 2 * n)[:, 1::2]  # strides (2n, 2)
    a = lora_a.stride()
    s = poisoned((rows, rank), dtype, "cpu")
    grouped_kernels.grouped_shrink(x, lora_a, (rank * a[0], a[0], a[1]), s, offsets)
    y = poisoned((rows, n), dtype, "cpu")
    grouped_kernels.grouped_gemm(x, weight, weight.stride(), s, experts_b, experts_b.stride(), y,
                                 offsets, SCALING, bias=bias)
    fused_s = poisoned((rows, rank), dtype, "cpu")
    fused_y = poisoned((rows, n), dtype, "cpu")
    grouped_kernels.grouped_forward(x, weight, weight.stride(), lora_a, (rank * a[0], a[1], a[0]),
                                    experts_b, experts_b.stride(), fused_s, fused_y, offsets,
                                    SCALING, bias=bias)
    for e, (first, end) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        if first == end:
            continue
        for name, out, s_e in (("y", y, s), ("fused y", fused_y, fused_s)):
            expected = (x[first:end].double() @ weight[e].double().T
                        + SCALING * s_e[first:end].double() @ experts_b[e].double().T
                        + bias[e].double())
            assert_op_close(out[first:end], expected, dtype, f"{name}_{e}")


def test_gpt_oss_trainable_expert_bias_matches_peft():
    """gpt-oss's expert biases made trainable (as PEFT's bias="all" does): ``experts_forward``
    adds them after the op (the epilogue takes only frozen ones), so they get gradients, PEFT's
    to rounding, and the logits stay PEFT's."""
    from helpers import assert_model_close

    _, ours, theirs, _ = patched_and_peft("gpt_oss")
    biases = {}
    for name, model in (("ours", ours), ("theirs", theirs)):
        biases[name] = [p for n, p in model.named_parameters()
                        if "experts" in n and n.endswith("_bias")]
        assert len(biases[name]) == 2
        for bias in biases[name]:
            bias.requires_grad_()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(4))
    logits, _ = grads_by_peft_key(ours, ids)
    expected, _ = grads_by_peft_key(theirs, ids)
    assert_model_close(logits, expected, MODEL_TOLERANCE, "logits")
    for ours_bias, their_bias in zip(biases["ours"], biases["theirs"]):
        assert ours_bias.grad is not None and ours_bias.grad.abs().sum() > 0
        assert_model_close(ours_bias.grad, their_bias.grad, MODEL_TOLERANCE, "bias grad")


@pytest.mark.parametrize("group_tiles", [1, 4, 8])
def test_grouped_gemm_tile_order_covers_every_tile(group_tiles, monkeypatch):
    """The GEMM's programs taken in groups of GROUP_TILES row tiles (``_tile_and_column``): with
    9 row tiles (6 with rows, 3 spare) and 3 column tiles, groups of 1, 4 (the last one short)
    and 8 each write every output element of the forward (with the bias) and of dX with dS and
    dB (dB's partials indexed by row tile, dS stored by column tile 0) into NaN-filled outputs,
    against fp64."""
    monkeypatch.setattr(grouped_kernels, "GROUP_TILES", group_tiles)
    gen = torch.Generator().manual_seed(9)
    counts, k, n = (0, 130, 5, 0, 70), 29, 150
    target = grouped_kernels._common.target(torch.device("cpu"))
    rows, block_m = sum(counts), grouped_kernels.gemm_configs(target, torch.float32)[0]["BLOCK_M"]
    assert (rows + block_m - 1) // block_m + E == 9 and n > 2 * 64
    offsets = offsets_of(counts)
    x = torch.randn(rows, k, generator=gen)
    weight = torch.randn(E, n, k, generator=gen) * 0.2
    s = torch.randn(rows, RANK, generator=gen) * 0.5
    lora_a = torch.randn(E * RANK, k, generator=gen) * 0.3
    experts_b = torch.randn(E, n, RANK, generator=gen) * 0.3
    bias = expert_biases(torch.float32, E, n)
    y = poisoned((rows, n), torch.float32, "cpu")
    grouped_kernels.grouped_gemm(x, weight, weight.stride(), s, experts_b, experts_b.stride(), y,
                                 offsets, SCALING, bias=bias)
    grad_y = torch.randn(rows, n, generator=gen)
    grad_x = poisoned((rows, k), torch.float32, "cpu")
    grad_s = poisoned((rows, RANK), torch.float32, "cpu")
    grad_b = poisoned((E, n, RANK), torch.float32, "cpu")
    a, w = lora_a.stride(), weight.stride()
    grouped_kernels.grouped_grad_input(grad_y, weight, (w[0], w[2], w[1]), s, experts_b,
                                       experts_b.stride(), lora_a, (RANK * a[0], a[1], a[0]),
                                       grad_x, grad_s, grad_b, grad_b.stride(), offsets, SCALING)
    for e, (first, end) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        if first == end:
            assert grad_b[e].eq(0).all(), f"dB_{e} of an expert without rows"
            continue
        x_e, s_e, dy_e = x[first:end].double(), s[first:end].double(), grad_y[first:end].double()
        w_e, b_e = weight[e].double(), experts_b[e].double()
        a_e = lora_a.view(E, RANK, k)[e].double()
        assert_op_close(y[first:end], x_e @ w_e.T + SCALING * s_e @ b_e.T + bias[e].double(),
                        torch.float32, f"y_{e}")
        grad_s_e = SCALING * dy_e @ b_e
        assert_op_close(grad_s[first:end], grad_s_e, torch.float32, f"dS_{e}")
        assert_op_close(grad_x[first:end], dy_e @ w_e + grad_s_e @ a_e, torch.float32, f"dX_{e}")
        assert_op_close(grad_b[e], SCALING * dy_e.T @ s_e, torch.float32, f"dB_{e}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_grouped_weight_grad_writes_every_element(dtype):
    """``grouped_weight_grad`` (dA) into a NaN-filled gradient, as the op allocates it (no zero
    fill): experts without rows get zeros, the others dS_e^T x_e (x's rows gathered through
    row_index), rank 20 (two rank chunks), K = 70 (two column chunks), an expert with two row
    tiles, against fp64."""
    gen = torch.Generator().manual_seed(6)
    experts, rank, k, counts = 4, 20, 70, (0, 70, 0, 3)
    rows = sum(counts)
    offsets = offsets_of(counts)
    tokens = torch.randn(19, k, generator=gen).to(dtype)
    row_index = torch.randint(0, 19, (rows,), generator=gen)
    grad_s = (torch.randn(rows, rank, generator=gen) * 0.5).to(dtype)
    grad_a = poisoned((experts * rank, k), torch.float32, "cpu")
    grouped_kernels.grouped_weight_grad(grad_s, tokens, grad_a, (rank * k, k, 1), offsets, 1.0,
                                        row_index)
    x = tokens[row_index].double()
    for e, (first, end) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        grad_a_e = grad_a.view(experts, rank, k)[e]
        if first == end:
            assert grad_a_e.eq(0).all(), f"dA_{e} of an expert without rows"
            continue
        assert_op_close(grad_a_e, grad_s[first:end].double().T @ x[first:end], torch.float32,
                        f"dA_{e}", TOLERANCE[dtype])
