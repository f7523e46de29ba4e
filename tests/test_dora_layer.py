"""DoRA as a method: ``patch_model(use_dora=True)`` (a ``LoraLinear`` running
``lowrank.methods.lora.DoraVariant`` for the adapter), its merges,
PEFT's adapter format both ways, ``patch_peft_model`` serving PEFT's DoRA layers, and 20 training
steps against PEFT's DoRA.

The model is the mini Llama of tests/helpers.py (hidden 32, one block) with adapters on q_proj and
down_proj only, to keep the interpreted kernels cheap; fp32, so that ours and PEFT's agree to fp32
rounding (1e-5 relative on outputs)."""

import warnings

import pytest
import torch
from helpers import (assert_same_bits, load_tiny_4bit_llama, randomize_adapters, relative_error,
                     tiny_model, token_ids, train_losses)
from peft import LoraConfig, PeftModel, get_peft_model

import lowrank
from lowrank.block_forwards import gated_mlp_forward
from lowrank.methods.lora import DoraVariant, LoraLinear

TARGETS = ["q_proj", "down_proj"]


def peft_dora(model, targets=TARGETS):
    config = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, config)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_patch_initializes_the_magnitude_as_peft_does():
    ours = lowrank.patch_model(tiny_model("llama", blocks=1), rank=4, alpha=8,
                               target_modules=TARGETS, use_dora=True)
    theirs = peft_dora(tiny_model("llama", blocks=1))
    layers = lowrank.patch.adapter_layers(ours)
    assert sorted(layers) == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"]
    keys = {k for k in ours.state_dict() if "lora_magnitude_vector" in k}
    assert keys == {f"{path}.lora_magnitude_vector.default.weight" for path in layers}
    peft_state = theirs.state_dict()
    for path, layer in layers.items():
        assert isinstance(layer, LoraLinear) and isinstance(layer.variants["default"], DoraVariant)
        magnitude = layer.lora_magnitude_vector["default"].weight
        assert magnitude.requires_grad and magnitude.dtype == torch.float32
        expected = peft_state[f"base_model.model.{path}.lora_magnitude_vector.default.weight"]
        assert relative_error(magnitude, expected) <= 1e-6
    ids = token_ids()
    # B = 0 and m = ||W||: the adapter changes nothing yet.
    plain = tiny_model("llama", blocks=1)
    assert relative_error(logits(ours, ids), logits(plain, ids)) <= 1e-5
    # A plain LoRA adapter beside the DoRA one on the same layers, as PEFT allows; DoRA's
    # magnitude goes with its adapter.
    lowrank.patch_model(ours, rank=4, target_modules=TARGETS, adapter_name="plain")
    for layer in layers.values():
        assert set(layer.variants) == {"default"}
        assert set(layer.adapter_weights("plain")) == {"lora_A", "lora_B"}
    with pytest.raises(ValueError, match="DoRA adapters"):
        with lowrank.mixed_batch(ours, ["default", "plain"]):
            pass
    with pytest.raises(ValueError, match="DoRA adapters"):
        lowrank.add_weighted_adapter(ours, ["default", "plain"], [1.0, 1.0], "combined")
    with pytest.warns(UserWarning, match="'plain' is active now"):
        lowrank.delete_adapter(ours, "default")
    assert not any("lora_magnitude_vector" in k for k in ours.state_dict())
    assert all(not layer.variants for layer in layers.values())


def test_bad_use_dora_is_refused_by_name():
    with pytest.raises(TypeError, match="use_dora must be a bool"):
        lowrank.patch_model(tiny_model("llama", blocks=1), rank=4, use_dora="yes")
    with pytest.raises(ValueError, match=r"\['use_dora'\] are LoRA settings"):
        lowrank.patch_model(tiny_model("llama", blocks=1), method="ia3", use_dora=True)


def test_block_fusion_leaves_dora_adapters_to_their_layers():
    """patch_model's block stage (fuse_blocks=True) runs plain LoRA's fused MLP op; an MLP whose
    active adapter is DoRA runs its layers, each on dora_linear."""
    model = lowrank.patch_model(tiny_model("llama", blocks=1), rank=4, use_dora=True)
    randomize_adapters(model)
    mlp = model.model.layers[0].mlp
    x = torch.randn(3, 7, model.config.hidden_size)  # 21 rows: more than the decode path's 16
    assert gated_mlp_forward(mlp, x) is NotImplemented
    with torch.no_grad():
        expected = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        assert torch.equal(mlp(x), expected)


def test_save_and_load_in_peft_format_both_ways(tmp_path):
    ids = token_ids()
    ours = lowrank.patch_model(tiny_model("llama", blocks=1), rank=4, alpha=8,
                               target_modules=TARGETS, use_dora=True)
    randomize_adapters(ours)
    lowrank.save_adapter(ours, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(tiny_model("llama", blocks=1), tmp_path / "ours")
    ours_state, peft_state = ours.state_dict(), theirs.state_dict()
    for key, value in ours_state.items():
        if "lora_" in key:
            assert_same_bits(peft_state[f"base_model.model.{key}"], value)
    assert relative_error(logits(ours, ids), logits(theirs, ids)) <= 1e-5

    theirs.save_pretrained(tmp_path / "peft")
    back = lowrank.load_adapter(tiny_model("llama", blocks=1), tmp_path / "peft")
    for key, value in back.state_dict().items():
        if "lora_" in key:
            assert_same_bits(value, ours_state[key])
    assert lowrank.patch.patch_state(back, "test").adapters["default"].use_dora

    # hotswap_adapter takes DoRA's magnitude with A and B (PEFT's keys, the older
    # ``lora_magnitude_vector.weight`` form too).
    swapped = {f"base_model.model.{key.replace('.default', '')}": 2 * value
               for key, value in ours_state.items() if "lora_" in key}
    lowrank.hotswap_adapter(back, swapped)
    for key, value in back.state_dict().items():
        if "lora_" in key:
            assert torch.equal(value, 2 * ours_state[key])


def one_block_llama(quantized, directory):
    """A tiny fp32 Llama of one block, 4-bit (saved and loaded through bitsandbytes) or dense."""
    if quantized:
        return load_tiny_4bit_llama(directory, torch.float32, dtype=torch.float32)
    return tiny_model("llama", blocks=1)


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "nf4"])
def test_merge_unmerge_and_merge_and_unload(quantized, tmp_path):
    ids = token_ids()
    model = one_block_llama(quantized, tmp_path)
    lowrank.patch_model(model, rank=4, alpha=8, target_modules=TARGETS, use_dora=True)
    randomize_adapters(model)
    layer = lowrank.patch.adapter_layers(model)["model.layers.0.mlp.down_proj"]
    before = layer.base_layer.weight.data.clone()
    expected = logits(model, ids)
    if not quantized:  # a dense row scaled to zero could not be unmerged
        magnitude = layer.lora_magnitude_vector["default"].weight
        kept = magnitude.detach().clone()
        with torch.no_grad():
            magnitude[3] = 0.0
        with pytest.raises(ValueError, match="1 zeros in its magnitude"):
            lowrank.merge(model)
        assert torch.equal(layer.base_layer.weight.data, before) and not layer.merged_adapters
        with torch.no_grad():
            magnitude.copy_(kept)
    lowrank.merge(model)
    merged = logits(model, ids)
    # NF4: the merged weight is requantized (4-bit rounding); dense: fp32 rounding.
    assert relative_error(merged, expected) <= (5e-2 if quantized else 1e-5)
    lowrank.unmerge(model)
    if quantized:
        assert_same_bits(layer.base_layer.weight.data, before)  # the original bytes, restored
    else:
        assert relative_error(layer.base_layer.weight.data, before) <= 1e-6
    assert relative_error(logits(model, ids), expected) <= 1e-5
    unloaded = lowrank.merge_and_unload(model, dtype=torch.float32) if quantized else \
        lowrank.merge_and_unload(model)
    assert not any(isinstance(m, LoraLinear) for m in unloaded.modules())
    assert relative_error(logits(unloaded, ids), expected) <= 1e-5


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "nf4"])
def test_patch_peft_model_serves_dora_layers(quantized, tmp_path):
    ids = token_ids()
    base = one_block_llama(quantized, tmp_path)
    theirs = peft_dora(base)
    randomize_adapters(theirs)
    theirs.train()  # dropout is 0: the training forward, without masks to match
    with torch.compiler.set_stance("force_eager"):  # bitsandbytes' CPU ops, run as they are
        expected = theirs(input_ids=ids).logits
    expected_grads = torch.autograd.grad(expected.square().sum(),
                                         [p for p in theirs.parameters() if p.requires_grad])
    report = lowrank.patch_peft_model(theirs)
    assert len(report.accelerated) == 2 and not report.not_accelerated
    assert not report.adapters_not_served
    got = theirs(input_ids=ids).logits
    grads = torch.autograd.grad(got.square().sum(), [p for p in theirs.parameters() if p.requires_grad])
    assert relative_error(got, expected) <= 1e-5
    for grad, want in zip(grads, expected_grads):
        assert relative_error(grad, want) <= 1e-4
    # PEFT's mixed batches: lora_mixed computes plain LoRA, so a DoRA adapter among the rows is
    # left to PEFT's own forward, which refuses it.
    theirs.eval()
    with torch.no_grad(), pytest.raises(ValueError, match="DoRA"):
        theirs(input_ids=ids, adapter_names=["default"] * ids.shape[0])


def train(model, data, steps=20, learning_rate=2e-2):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return train_losses(model, data, torch.optim.AdamW(params, lr=learning_rate), steps)


def test_twenty_steps_match_peft_dora(tmp_path):
    """Same base, same initial adapter (PEFT's, saved and loaded), same data: the losses stay
    together step by step (fp32: the same math summed in another order), and both learn. One
    layer (down_proj) keeps the 20 interpreted steps cheap."""
    theirs = peft_dora(tiny_model("llama", blocks=1), targets=["down_proj"])
    theirs.save_pretrained(tmp_path / "initial")
    ours = lowrank.load_adapter(tiny_model("llama", blocks=1), tmp_path / "initial")
    data = [token_ids(length=8, seed=s) for s in (7, 8)]
    peft_losses = train(theirs, data)
    losses = train(ours, data)
    # Both learn (one DoRA layer of a random base moves its loss ~0.01 in 20 steps here).
    assert losses[-1] < losses[0] - 0.005 and peft_losses[-1] < peft_losses[0] - 0.005
    error = max(abs(a - b) / abs(b) for a, b in zip(losses, peft_losses))
    assert error <= 1e-4, (error, losses, peft_losses)
