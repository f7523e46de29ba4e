"""PEFT-format adapters, both ways: what lowrank.save_adapter writes, peft.PeftModel.from_pretrained
loads (no missing keys, bit-equal weights, the same logits), and what PEFT's save_pretrained
writes, lowrank.load_adapter loads."""

import json
import warnings

import pytest
import torch
from helpers import load_tiny_4bit_llama, randomize_adapters, tiny_model, token_ids
from peft import IA3Config, LoHaConfig, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import lowrank
from lowrank.patch import adapter_layers

FP32_TOLERANCE = 2e-5  # fused kernels vs torch's GEMMs, relative to the largest logit


def assert_logits_close(actual, expected):
    error = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert error <= FP32_TOLERANCE, f"relative error {error:.2e}"


def peft_load(base, path):
    """PeftModel.from_pretrained, failing on any warning (a missing or unexpected key warns)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        return PeftModel.from_pretrained(base, path)


def lora_weights(model):
    """{PEFT file key: tensor} of a model's LoRA or IA3 weights (PEFT's or ours), adapter name
    left out."""
    weights = {}
    for name, param in model.named_parameters():
        if "lora_" in name or "ia3_l" in name:
            name = name.removeprefix("base_model.model.").replace(".default.", ".")
            name = name.removesuffix(".default")
            weights[f"base_model.model.{name}"] = param.detach()
    return weights


def two_bases(kind, tmp_path):
    if kind == "4bit":
        return (load_tiny_4bit_llama(tmp_path / "a", torch.float32, dtype=torch.float32),
                load_tiny_4bit_llama(tmp_path / "b", torch.float32, dtype=torch.float32), 128)
    return tiny_model(kind, blocks=1), tiny_model(kind, blocks=1), 64


@pytest.mark.parametrize("kind", ["llama", "gpt2", "4bit"])
def test_saved_adapter_loads_in_peft(kind, tmp_path):
    model, fresh, vocab = two_bases(kind, tmp_path)
    lowrank.patch_model(model, rank=4, alpha=12, target_modules=None if kind != "llama" else
                        ["q_proj", "v_proj", "down_proj"])
    randomize_adapters(model)
    ids = token_ids(vocab_size=vocab)
    with torch.no_grad():
        logits = model(ids).logits
    lowrank.save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 12)
    assert config["fan_in_fan_out"] == (kind == "gpt2")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    ours = lora_weights(model)
    assert saved.keys() == ours.keys() and all(torch.equal(saved[k], v) for k, v in ours.items())
    theirs = peft_load(fresh, tmp_path / "adapter")
    loaded = lora_weights(theirs)
    assert loaded.keys() == ours.keys() and all(torch.equal(loaded[k], v) for k, v in ours.items())
    with torch.no_grad():
        assert_logits_close(theirs(ids).logits, logits)


def peft_adapter(base, path, **config):
    """A LoRA adapter made and saved by PEFT, with random weights; returns the PEFT model."""
    peft_model = get_peft_model(base, LoraConfig(**config))
    randomize_adapters(peft_model)
    peft_model.save_pretrained(path)
    return peft_model


@pytest.mark.parametrize("kind", ["llama", "4bit"])
def test_peft_saved_adapter_loads_here_and_round_trips(kind, tmp_path):
    base, fresh, vocab = two_bases(kind, tmp_path)
    theirs = peft_adapter(base, tmp_path / "peft", r=4, lora_alpha=8, use_rslora=True,
                          target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
                          rank_pattern={"k_proj": 2}, alpha_pattern={"o_proj": 3})
    lowrank.load_adapter(fresh, tmp_path / "peft")
    k_proj = fresh.model.layers[0].self_attn.k_proj
    assert k_proj.r["default"] == 2 and k_proj.scaling["default"] == 8 / 2 ** 0.5
    assert fresh.model.layers[0].self_attn.o_proj.scaling["default"] == 3 / 2
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours = lora_weights(fresh)
    assert ours.keys() == peft_file.keys()
    assert all(torch.equal(peft_file[k], v) for k, v in ours.items())
    ids = token_ids(vocab_size=vocab)
    with torch.no_grad():
        assert_logits_close(fresh(ids).logits, theirs(ids).logits)
    # Saved again by us, PEFT reads the same ranks and scalings from our config.
    lowrank.save_adapter(fresh, tmp_path / "ours")
    again = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert again.keys() == peft_file.keys()
    assert all(torch.equal(again[k], v) for k, v in peft_file.items())
    _, third, _ = two_bases(kind, tmp_path / "third")
    reloaded = peft_load(third, tmp_path / "ours")
    with torch.no_grad():
        assert_logits_close(reloaded(ids).logits, theirs(ids).logits)


def test_load_as_a_second_adapter(tmp_path):
    base, fresh, _ = two_bases("llama", tmp_path)
    theirs = peft_adapter(base, tmp_path / "peft", r=2, lora_alpha=4, target_modules=["v_proj"])
    lowrank.patch_model(fresh, rank=4)
    lowrank.load_adapter(fresh, tmp_path / "peft", adapter_name="loaded")
    lowrank.set_adapter(fresh, "loaded")
    ids = token_ids()
    with torch.no_grad():
        assert_logits_close(fresh(ids).logits, theirs(ids).logits)
    with pytest.raises(ValueError, match="already has an adapter named 'loaded'"):
        lowrank.load_adapter(fresh, tmp_path / "peft", adapter_name="loaded")


@pytest.mark.parametrize("config,named", [
    (LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
    (LoraConfig(r=2, target_modules=["q_proj"], bias="all"), "bias='all'"),
    (LoHaConfig(r=2, target_modules=["q_proj"]), "peft_type 'LOHA' is not supported"),
    (IA3Config(target_modules=["q_proj"], feedforward_modules=[], modules_to_save=["lm_head"]),
     "modules_to_save"),
], ids=["modules_to_save", "bias", "loha", "ia3-modules_to_save"])
def test_unsupported_peft_features_are_refused_by_name(config, named, tmp_path):
    get_peft_model(tiny_model("llama", blocks=1), config).save_pretrained(tmp_path)
    model = tiny_model("llama", blocks=1)
    with pytest.raises(ValueError, match=named):
        lowrank.load_adapter(model, tmp_path)
    assert not adapter_layers(model)


def test_load_errors_are_named(tmp_path):
    peft_adapter(tiny_model("llama", blocks=2), tmp_path / "two", r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="weights for model.layers.1.self_attn.q_proj, which this "
                                         "model does not have"):
        lowrank.load_adapter(tiny_model("llama", blocks=1), tmp_path / "two")
    config = json.loads((tmp_path / "two" / "adapter_config.json").read_text())
    config["r"] = 3
    (tmp_path / "two" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"needs lora_A \(3, 32\)"):
        lowrank.load_adapter(tiny_model("llama"), tmp_path / "two")
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        lowrank.load_adapter(tiny_model("llama"), tmp_path / "nothing")
    with pytest.raises(ValueError, match=r"no adapter named 'b'; the model has \['default'\]"):
        lowrank.save_adapter(lowrank.patch_model(tiny_model("llama", blocks=1), rank=2), tmp_path,
                             adapter_name="b")


def test_target_modules_saved_as_leaf_names_only_when_they_select_exactly(tmp_path):
    model = lowrank.patch_model(tiny_model("llama"), rank=2, target_modules=["q_proj"], layers=1)
    lowrank.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.1.self_attn.q_proj"]
    model = lowrank.patch_model(tiny_model("llama"), rank=2, target_modules=["q_proj"])
    lowrank.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["q_proj"]


@pytest.mark.parametrize("kind", ["gpt2", "4bit"])
def test_ia3_saved_adapter_loads_in_peft(kind, tmp_path):
    model, fresh, vocab = two_bases(kind, tmp_path)
    lowrank.patch_model(model, method="ia3")
    randomize_adapters(model)
    ids = token_ids(vocab_size=vocab)
    with torch.no_grad():
        logits = model(ids).logits
    lowrank.save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3"
    assert set(config["feedforward_modules"]) <= set(config["target_modules"])  # PEFT's rule
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    ours = lora_weights(model)
    assert saved.keys() == ours.keys() and all(torch.equal(saved[k], v) for k, v in ours.items())
    theirs = peft_load(fresh, tmp_path / "adapter")
    loaded = lora_weights(theirs)
    assert loaded.keys() == ours.keys() and all(torch.equal(loaded[k], v) for k, v in ours.items())
    with torch.no_grad():
        assert_logits_close(theirs(ids).logits, logits)


def test_ia3_saved_by_peft_loads_here_and_round_trips(tmp_path):
    base, fresh, vocab = two_bases("bert", tmp_path)
    theirs = get_peft_model(base, IA3Config(target_modules=["query", "value", "intermediate.dense"],
                                            feedforward_modules=["intermediate.dense"]))
    randomize_adapters(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    lowrank.load_adapter(fresh, tmp_path / "peft")
    layers = adapter_layers(fresh)
    assert {n for n, m in layers.items() if m.is_feedforward} == {
        "bert.encoder.layer.0.intermediate.dense"}
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert lora_weights(fresh).keys() == peft_file.keys()
    assert all(torch.equal(peft_file[k], v) for k, v in lora_weights(fresh).items())
    ids = token_ids()
    with torch.no_grad():
        assert_logits_close(fresh(ids).logits, theirs(ids).logits)
    lowrank.save_adapter(fresh, tmp_path / "ours")
    again = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert again.keys() == peft_file.keys()
    assert all(torch.equal(again[k], v) for k, v in peft_file.items())
