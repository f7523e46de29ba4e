"""lowrank.blocks, the block-fusion stage, and lowrank.architectures, the table it finds blocks
with. The stage is tested with a fusion defined here: a tiny Llama's gated MLP run
by the fusion over its three patched projections (the MLP's own math, so outputs are equal bit
for bit), counting the calls it serves and declines. Ops run on the reference path: the stage, not
the kernels, is under test."""

import collections
import copy

import pytest
import torch
from helpers import (TINY_ARCHITECTURES, assert_model_close, compiled_recording_graphs,
                     loss_and_grads, randomize_adapters, tiny_model, token_ids)
from torch import nn
from transformers.pytorch_utils import Conv1D

import lowrank
from lowrank import _dispatch, blocks, ops
from lowrank.architectures import ARCHITECTURES, architecture
from lowrank.blocks import BlockFusion, serving_adapter
from lowrank.modules import LoraLinear

MLP_PATHS = {"model.layers.0.mlp", "model.layers.1.mlp"}
ROLES = ("gate", "up", "down")


def mlp_fusion(calls):
    def finds(model, architecture):
        if architecture is None or not architecture.gated_mlp:
            return {}
        name, projections = architecture.mlp
        return {path: module for path, module in model.named_modules()
                if path.rpartition(".")[2] == name
                and all(hasattr(module, projections[role]) for role in ROLES)}

    def forward(block, x):
        gate, up, down = (getattr(block, f"{role}_proj") for role in ROLES)
        if serving_adapter((gate, up, down), LoraLinear) is None:
            calls["declined"] += 1
            return NotImplemented
        calls["fused"] += 1
        return down(block.act_fn(gate(x)) * up(x))

    return BlockFusion("test-mlp", finds, forward)


@pytest.fixture
def calls(monkeypatch):
    calls = {"fused": 0, "declined": 0}
    monkeypatch.setattr(blocks, "FUSIONS", [mlp_fusion(calls)])
    monkeypatch.setattr(_dispatch, "INTERPRETER", False)
    return calls


def fused_and_unfused(**patch):
    """(a tiny Llama patched with the fusion, the same patched without it, ids)."""
    fused = tiny_model("llama")
    unfused = copy.deepcopy(fused)
    for model, fuse in ((fused, True), (unfused, False)):
        lowrank.patch_model(model, rank=4, fuse_blocks=fuse, **patch)
        randomize_adapters(model)
    return fused, unfused, token_ids()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def instance_forwards(model):
    return {path for path, module in model.named_modules() if "forward" in vars(module)}


def test_installed_on_every_block_it_finds_and_computes_what_the_blocks_compute(calls):
    fused, unfused, ids = fused_and_unfused()
    assert fused.lowrank_state.fused_blocks == {path: "test-mlp" for path in MLP_PATHS}
    assert instance_forwards(fused) == MLP_PATHS and not instance_forwards(unfused)
    # Names and state dict are the first stage's.
    assert [n for n, _ in fused.named_modules()] == [n for n, _ in unfused.named_modules()]
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    assert torch.equal(logits(fused, ids), logits(unfused, ids))
    assert calls == {"fused": 2, "declined": 0}


def test_a_declined_call_runs_the_blocks_own_forward(calls):
    fused, unfused, ids = fused_and_unfused()
    base = copy.deepcopy(unfused)
    lowrank.unpatch(base)
    with lowrank.disable_adapters(fused):
        assert torch.equal(logits(fused, ids), logits(base, ids))
    assert calls == {"fused": 0, "declined": 2}
    for model in (fused, unfused):
        lowrank.merge(model)
    assert torch.equal(logits(fused, ids), logits(unfused, ids))
    assert calls == {"fused": 0, "declined": 4}
    lowrank.unmerge(fused)
    logits(fused, ids)
    assert calls == {"fused": 2, "declined": 4}


@pytest.mark.parametrize("how", ["unpatch", "merge_and_unload"])
def test_revert_leaves_the_model_as_before(how, calls):
    model, ids = tiny_model("llama"), token_ids()
    before, keys = logits(model, ids), model.state_dict().keys()
    lowrank.patch_model(model, rank=4)
    assert instance_forwards(model) == MLP_PATHS
    assert torch.equal(logits(model, ids), before)  # B is zero: the adapter adds nothing
    assert calls["fused"] == 2
    getattr(lowrank, how)(model)
    assert not instance_forwards(model) and not hasattr(model, "lowrank_state")
    assert model.state_dict().keys() == keys
    assert torch.equal(logits(model, ids), before)
    assert calls["fused"] == 2


def test_delete_adapter_unfuses_blocks_left_without_patched_layers(calls):
    model = tiny_model("llama")
    lowrank.patch_model(model, rank=4, target_modules=["gate_proj", "up_proj", "down_proj"],
                        adapter_name="mlp")
    lowrank.patch_model(model, rank=4, target_modules=["q_proj"], adapter_name="attention")
    assert instance_forwards(model) == MLP_PATHS
    lowrank.delete_adapter(model, "mlp")
    assert not instance_forwards(model) and not model.lowrank_state.fused_blocks


def test_gradient_checkpointing_gives_the_same_gradients(calls):
    fused, unfused, ids = fused_and_unfused()
    fused.train()
    unfused.train()
    _, expected = loss_and_grads(unfused, ids)
    _, plain = loss_and_grads(fused, ids)
    fused.gradient_checkpointing_enable()
    _, checkpointed = loss_and_grads(fused, ids)
    assert expected.keys() == plain.keys() == checkpointed.keys() and len(expected) == 28
    assert all(torch.equal(plain[n], expected[n]) for n in expected)
    assert all(torch.equal(checkpointed[n], expected[n]) for n in expected)
    assert calls["fused"] == 2 + 4  # checkpointing runs each block again in backward


def test_torch_compile_traces_the_fused_forward_without_graph_breaks(calls):
    fused, unfused, ids = fused_and_unfused()
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(logits(compiled, ids), logits(unfused, ids))
    assert calls["fused"] == 2
    with lowrank.disable_adapters(fused):  # a declined call, compiled too
        assert torch.equal(logits(compiled, ids), logits(fused, ids))
    assert calls["declined"] >= 2


def table_model(model_type):
    """A one-block model of ``model_type`` built from its config (no hub)."""
    if model_type in TINY_ARCHITECTURES:
        return tiny_model(model_type, blocks=1)
    import transformers as tf

    config = tf.AutoConfig.for_model(model_type, hidden_size=32, intermediate_size=48,
                                     num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=8, vocab_size=64,
                                     pad_token_id=0)
    return tf.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_the_architecture_table_names_the_modules_each_block_has(model_type):
    model = table_model(model_type)
    assert architecture(model) is ARCHITECTURES[model_type]
    table = ARCHITECTURES[model_type]
    getattr(model.config, table.activation)  # the field exists
    block = next(p for p, _ in model.named_modules() if p.endswith(".0"))  # the first block
    for part, projections in (table.attention, table.mlp):
        for projection in projections.values():
            path = ".".join(filter(None, (block, part, projection)))
            assert isinstance(model.get_submodule(path), (nn.Linear, Conv1D)), path
    if table.ia3 is not None:
        lowrank.patch_model(model, method="ia3")  # the defaults select existing layers


# patch_peft_model's block fusions, on lowrank's ops (the Triton interpreter on a CPU): a PeftModel
# of a one-block tiny Llama, 2 x 13 tokens (more rows than the decode path's, so the fused ops
# serve them).

PEFT_BLOCKS = {"base_model.model.model.layers.0.mlp": "lora_gated_mlp",
               "base_model.model.model.layers.0.self_attn": "lora_qkv_attention"}


@pytest.fixture
def block_calls(monkeypatch):
    """The fused block ops' calls: {op name: calls}."""
    calls = collections.Counter()

    def counting(name, op):
        def run(*args, **kwargs):
            calls[name] += 1
            return op(*args, **kwargs)
        return run

    for name in ("lora_mlp", "lora_qkv"):
        monkeypatch.setattr(ops, name, counting(name, getattr(ops, name)))
    return calls


def peft_model(**config):
    from peft import LoraConfig, get_peft_model

    config = {"r": 4, "lora_alpha": 6, "target_modules": "all-linear", **config}
    model = get_peft_model(tiny_model("llama", blocks=1), LoraConfig(**config))
    randomize_adapters(model)
    return model.train()


def peft_ids():
    return token_ids(length=13)


def assert_same_as(ours, expected, tolerance=1e-5):
    (logits, grads), (expected_logits, expected_grads) = ours, expected
    assert grads.keys() == expected_grads.keys() and grads
    assert_model_close(logits, expected_logits, tolerance, "logits")
    for name in grads:
        assert_model_close(grads[name], expected_grads[name], tolerance, name)


def test_patch_peft_model_fuses_the_blocks_and_matches_peft(block_calls):
    model = peft_model(rank_pattern={"up_proj": 3}, alpha_pattern={"down_proj": 5.0})
    ids = peft_ids()
    names, keys = [n for n, _ in model.named_modules()], model.state_dict().keys()
    expected = loss_and_grads(model, ids)
    report = lowrank.patch_peft_model(model)
    assert report.fused_blocks == PEFT_BLOCKS
    assert instance_forwards(model) >= PEFT_BLOCKS.keys()
    assert [n for n, _ in model.named_modules()] == names and model.state_dict().keys() == keys
    assert_same_as(loss_and_grads(model, ids), expected)
    assert block_calls == {"lora_mlp": 1, "lora_qkv": 1}
    assert lowrank.patch_peft_model(model).fused_blocks == report.fused_blocks  # again: the same
    lowrank.unpatch_peft_model(model)
    assert not instance_forwards(model)
    assert torch.equal(loss_and_grads(model, ids)[0], expected[0])


def test_patch_peft_model_without_fuse_blocks_runs_the_layers_one_by_one(block_calls):
    model = peft_model()
    assert not lowrank.patch_peft_model(model, fuse_blocks=False).fused_blocks
    loss_and_grads(model, peft_ids())
    assert not block_calls and not (instance_forwards(model) & PEFT_BLOCKS.keys())


def test_patch_peft_model_fuses_only_blocks_whose_projections_are_all_patched(block_calls):
    # down_proj and v_proj stay plain Linears
    model = peft_model(target_modules=["gate_proj", "up_proj", "q_proj", "k_proj"])
    assert not lowrank.patch_peft_model(model).fused_blocks
    assert not instance_forwards(model) & PEFT_BLOCKS.keys()


def test_a_fused_peft_block_follows_peft_state_at_every_call(block_calls):
    """PEFT's adapter switching, disabling, merging and DoRA adapters, after patching: what PEFT
    gives, the fused op running exactly where one plain LoRA adapter runs on every projection."""
    from peft import LoraConfig

    model, ids = peft_model(), peft_ids()
    model.add_adapter("mlp_half", LoraConfig(r=2, target_modules=["gate_proj", "up_proj"]))
    model.add_adapter("dora", LoraConfig(r=2, target_modules="all-linear", use_dora=True))
    randomize_adapters(model, seed=5)
    reference = copy.deepcopy(model)
    lowrank.patch_peft_model(model)

    def same_as_peft(fused_calls):  # by each fused op
        block_calls.clear()
        assert_same_as(loss_and_grads(model, ids), loss_and_grads(reference, ids))
        assert (block_calls["lora_mlp"], block_calls["lora_qkv"]) == (fused_calls, fused_calls)

    same_as_peft(1)
    for name, fused_calls in (("mlp_half", 0), ("dora", 0), ("default", 1)):
        for m in (model, reference):
            m.set_adapter(name)
        same_as_peft(fused_calls)
    with model.disable_adapter(), reference.disable_adapter():
        block_calls.clear()
        with torch.no_grad():
            assert torch.equal(model(ids).logits, reference(ids).logits)
        assert not block_calls
    for m in (model, reference):
        m.merge_adapter()
    with torch.no_grad():
        assert_model_close(model(ids).logits, reference(ids).logits, 1e-5, "merged")
    for m in (model, reference):
        m.unmerge_adapter()
    same_as_peft(1)
    # merge_and_unload gives PEFT's layers' base layers back: the blocks take their own forward
    # back at their next call.
    merged = [m.merge_and_unload() for m in (model, reference)]
    with torch.no_grad():
        assert_model_close(merged[0](ids).logits, merged[1](ids).logits, 1e-5, "merged")
    assert not instance_forwards(merged[0])


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_a_fused_peft_model_checkpoints_to_the_same_gradients(reentrant, block_calls):
    model, ids = peft_model(), peft_ids()
    lowrank.patch_peft_model(model)
    plain = loss_and_grads(model, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    checkpointed = loss_and_grads(model, ids)
    assert_same_as(checkpointed, plain, tolerance=0)
    # checkpointing runs the blocks again in backward
    assert block_calls == {"lora_mlp": 1 + 2, "lora_qkv": 1 + 2}


# The q/k/v fusion bound into attention by patch_model, on lowrank's ops: each architecture's own
# attention forward, its q, k and v from one lowrank.ops.lora_qkv call.

# qwen2: q, k and v with biases; qwen3: q and k normed after their projection.
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_fused_qkv_attention_matches_the_unfused_layers(model_type, block_calls):
    fused = table_model(model_type)
    unfused = copy.deepcopy(fused)
    for model, fuse in ((fused, True), (unfused, False)):
        lowrank.patch_model(model, rank=4, fuse_blocks=fuse)
        randomize_adapters(model)
        model.train()
    assert fused.lowrank_state.fused_blocks == {"model.layers.0.mlp": "lora_gated_mlp",
                                                "model.layers.0.self_attn": "lora_qkv_attention"}
    ids = peft_ids()
    assert_same_as(loss_and_grads(fused, ids), loss_and_grads(unfused, ids))
    assert block_calls == {"lora_mlp": 1, "lora_qkv": 1}
    block_calls.clear()
    with torch.no_grad():  # decode-sized inputs: the layers' own (split-K decode) path
        assert torch.equal(fused(ids[:, :5]).logits, unfused(ids[:, :5]).logits)
    assert not block_calls


@pytest.mark.parametrize("way", ["patch_model", "patch_peft_model"])
def test_torch_compile_traces_the_fused_attention_and_mlp_in_one_graph(way):
    from torch._dynamo.utils import counters

    if way == "patch_model":
        model = tiny_model("llama", blocks=1)
        lowrank.patch_model(model, rank=4)
        randomize_adapters(model)
        model.train()
    else:
        model = peft_model()
        lowrank.patch_peft_model(model)
    ids = peft_ids()
    eager = loss_and_grads(model, ids)
    compiled, graphs = compiled_recording_graphs(model, fullgraph=True)
    logits, grads = loss_and_grads(compiled, ids)
    assert len(graphs) == 1 and not counters["graph_break"]
    names = {n: n.removeprefix("_orig_mod.").removeprefix("base_model.model.") for n in grads}
    assert_same_as((logits, {names[n]: g for n, g in grads.items()}), eager)
    ops_traced = collections.Counter(
        str(node.target) for graph in graphs for module in graph.modules()
        if isinstance(module, torch.fx.GraphModule) for node in module.graph.nodes
        if str(node.target).startswith("lowrank."))
    # One shrink for q, k and v, one for gate and up, one for down; an expand per projection.
    assert ops_traced["lowrank.lora_shrink.default"] == 3
    assert ops_traced["lowrank.lora_expand.default"] == 6
    assert ops_traced["lowrank.lora_forward.default"] == 1  # o_proj, a layer on its own


def test_an_attention_calling_a_projection_on_another_input_is_an_error(monkeypatch):
    model = tiny_model("llama", blocks=1)
    lowrank.patch_model(model, rank=4)
    attention = model.model.layers[0].self_attn
    forward = type(attention).forward

    def projecting_a_copy(self, hidden_states, *args, **kwargs):
        self.q_proj(hidden_states.clone())
        return forward(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(type(attention), "forward", projecting_a_copy)
    with pytest.raises(RuntimeError, match="calls q_proj on another input"):
        model(peft_ids())
