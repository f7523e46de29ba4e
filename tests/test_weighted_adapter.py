"""lowrank.add_weighted_adapter against PEFT's add_weighted_adapter on the same adapters: the new
adapter's weights equal PEFT's (bit for bit: the same torch operations in the same order; DARE's
masks from the same generator state), and PEFT's refusals are errors here too."""

import pytest
import torch
from helpers import randomize_adapters, tiny_model, token_ids
from peft import LoraConfig, get_peft_model

import lowrank
from lowrank.patch import adapter_layers


def peft_and_ours(tmp_path, architecture="llama", ranks=(4, 4), targets=(("q_proj", "v_proj"),) * 2):
    """A PEFT model with adapters "x", "y" (random weights) and a patched twin holding the same."""
    peft_model = get_peft_model(tiny_model(architecture, blocks=1),
                                LoraConfig(r=ranks[0], lora_alpha=8, target_modules=list(targets[0])),
                                adapter_name="x")
    peft_model.add_adapter("y", LoraConfig(r=ranks[1], lora_alpha=3, target_modules=list(targets[1])))
    randomize_adapters(peft_model)
    ours = tiny_model(architecture, blocks=1)
    peft_model.save_pretrained(tmp_path)
    for name in ("x", "y"):
        lowrank.load_adapter(ours, tmp_path / name, adapter_name=name)
    return peft_model, ours


def new_weights(model, name):
    """{module path: (A, B)} of adapter ``name`` (PEFT's or ours)."""
    weights = {}
    for path, module in model.named_modules():
        if hasattr(module, "lora_A") and name in module.lora_A:
            path = path.removeprefix("base_model.model.")
            weights[path] = (module.lora_A[name].weight.detach(), module.lora_B[name].weight.detach())
    return weights


def reseed_after_peft_injects(monkeypatch, seed):
    """PEFT draws random initial weights for the new adapter before combining; we combine first.
    Reseeding at the hook between the two (its _freeze_adapter call) gives both the same state."""
    import peft.tuners.lora.model as lora_model

    freeze = lora_model._freeze_adapter

    def freeze_then_seed(*args):
        freeze(*args)
        torch.manual_seed(seed)

    monkeypatch.setattr(lora_model, "_freeze_adapter", freeze_then_seed)


def assert_same_as_peft(peft_model, ours, monkeypatch, **kwargs):
    reseed_after_peft_injects(monkeypatch, 11)
    peft_model.add_weighted_adapter(adapter_name="new", **kwargs)
    torch.manual_seed(11)
    lowrank.add_weighted_adapter(ours, adapter_name="new", **kwargs)
    expected, actual = new_weights(peft_model, "new"), new_weights(ours, "new")
    assert expected.keys() == actual.keys()
    for path, (a, b) in expected.items():
        torch.testing.assert_close(actual[path][0], a, rtol=0, atol=0, msg=f"{path} A")
        torch.testing.assert_close(actual[path][1], b, rtol=0, atol=0, msg=f"{path} B")
    return actual


@pytest.mark.parametrize("combination_type, extra", [
    ("linear", {}),
    ("cat", {}),
    ("svd", {}),
    ("svd", {"svd_rank": 3, "svd_clamp": 0.9}),
    ("ties", {"density": 0.5, "majority_sign_method": "total"}),
    ("ties", {"density": 0.4, "majority_sign_method": "frequency"}),
    ("dare_linear", {"density": 0.6}),
    ("dare_ties", {"density": 0.6, "majority_sign_method": "frequency"}),
    ("magnitude_prune", {"density": 0.3}),
    ("ties_svd", {"density": 0.5}),
    ("dare_linear_svd", {"density": 0.7}),
    ("dare_ties_svd", {"density": 0.7}),
    ("magnitude_prune_svd", {"density": 0.5}),
])
def test_same_weights_as_peft(combination_type, extra, tmp_path, monkeypatch):
    peft_model, ours = peft_and_ours(tmp_path)
    assert_same_as_peft(peft_model, ours, monkeypatch, adapters=["x", "y"], weights=[0.7, -1.3],
                        combination_type=combination_type, **extra)


def test_dare_masks_differ_by_seed_and_keep_the_density(tmp_path):
    """Not a constant mask: another seed draws another one, keeping about `density` of values."""
    _, ours = peft_and_ours(tmp_path)
    torch.manual_seed(1)
    lowrank.add_weighted_adapter(ours, ["x"], [1.0], "one", combination_type="linear")
    for seed, name in ((1, "seed1"), (2, "seed2")):
        torch.manual_seed(seed)
        lowrank.add_weighted_adapter(ours, ["x", "y"], [1.0, 0.0], name,
                                     combination_type="dare_linear", density=0.5)
    x, y, one = new_weights(ours, "seed1"), new_weights(ours, "seed2"), new_weights(ours, "one")
    kept = torch.cat([(x[p][0] != 0).flatten() for p in x]).float().mean().item()
    assert 0.4 < kept < 0.6
    assert any(not torch.equal(x[p][0], y[p][0]) for p in x)
    for p in x:  # the kept values are the adapter's, rescaled by 1 / density
        kept_a = x[p][0] != 0
        torch.testing.assert_close(x[p][0][kept_a], one[p][0][kept_a] / 0.5)


def test_cat_over_different_ranks_and_targets_and_outputs(tmp_path, monkeypatch):
    """cat sums the ranks; a layer that only one adapter targets gets zero rows for the other.
    The new adapter computes the weighted sum of the two adapters' deltas."""
    peft_model, ours = peft_and_ours(tmp_path, ranks=(4, 2),
                                     targets=(("q_proj", "v_proj"), ("v_proj", "o_proj")))
    actual = assert_same_as_peft(peft_model, ours, monkeypatch, adapters=["x", "y"],
                                 weights=[0.5, 2.0], combination_type="cat")
    assert set(actual) == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                           "model.layers.0.self_attn.o_proj"}
    assert actual["model.layers.0.self_attn.q_proj"][0].shape[0] == 6
    layer = adapter_layers(ours)["model.layers.0.self_attn.v_proj"]
    delta = lambda n: layer.lora_B[n].weight @ layer.lora_A[n].weight * layer.scaling[n]  # noqa: E731
    torch.testing.assert_close(delta("new"), 0.5 * delta("x") + 2.0 * delta("y"))
    lowrank.set_adapter(ours, "new")
    peft_model.set_adapter("new")
    with torch.no_grad():
        torch.testing.assert_close(ours(token_ids()).logits, peft_model(token_ids()).logits,
                                   rtol=2e-5, atol=2e-5)


def test_conv1d_layers_match_peft(tmp_path, monkeypatch):
    """GPT-2's Conv1D stores its weight transposed: PEFT prunes the delta in that layout."""
    peft_model, ours = peft_and_ours(tmp_path, "gpt2", targets=(("c_attn", "c_fc"),) * 2)
    assert_same_as_peft(peft_model, ours, monkeypatch, adapters=["x", "y"], weights=[1.0, 0.5],
                        combination_type="dare_ties_svd", density=0.5, svd_rank=5)


def test_errors_where_peft_raises(tmp_path):
    peft_model, ours = peft_and_ours(tmp_path, ranks=(4, 2))
    with pytest.raises(ValueError, match="same r value"):
        peft_model.add_weighted_adapter(["x", "y"], [1.0, 1.0], "new", combination_type="linear")
    with pytest.raises(ValueError, match="needs adapters of one rank"):
        lowrank.add_weighted_adapter(ours, ["x", "y"], [1.0, 1.0], "new", "linear")
    with pytest.raises(ValueError, match="no adapter"):
        lowrank.add_weighted_adapter(ours, ["x", "zzz"], [1.0, 1.0], "new")
    with pytest.raises(ValueError, match="combination_type must be one of"):
        lowrank.add_weighted_adapter(ours, ["x", "y"], [1.0, 1.0], "new", "mean")
    with pytest.raises(ValueError, match="needs a density"):
        lowrank.add_weighted_adapter(ours, ["x", "y"], [1.0, 1.0], "new", "ties_svd")
    with pytest.raises(ValueError, match="one per adapter"):
        lowrank.add_weighted_adapter(ours, ["x", "y"], [1.0], "new")
    with pytest.raises(ValueError, match="already has an adapter named 'x'"):
        lowrank.add_weighted_adapter(ours, ["x", "y"], [1.0, 1.0], "x")
    with pytest.raises(ValueError, match="larger than"):
        lowrank.add_weighted_adapter(ours, ["x", "y"], [1.0, 1.0], "new", svd_rank=64)
    lowrank.patch_model(ours, rank=4, target_modules=r".*\.k_proj", adapter_name="regex")
    with pytest.raises(ValueError, match="regular expression"):
        lowrank.add_weighted_adapter(ours, ["x", "regex"], [1.0, 1.0], "new", "cat")
    assert list(ours.lowrank_state.adapters) == ["x", "y", "regex"]  # nothing added on errors
