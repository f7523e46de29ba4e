"""lowrank.hotswap_adapter: an adapter's weights replaced in place from a saved adapter (directory
or PEFT state dict), without re-patching and without recompiling a compiled model; mismatches
refused before anything is copied."""

import pytest
import torch
from helpers import randomize_adapters, tiny_model, token_ids
from peft import get_peft_model_state_dict

import lowrank
from lowrank.patch import adapter_layers


def patched(seed, rank=4, alpha=8, method="lora"):
    model = tiny_model("llama", blocks=1)
    if method == "lora":
        lowrank.patch_model(model, rank=rank, alpha=alpha, target_modules=["q_proj", "v_proj", "down_proj"])
    else:
        lowrank.patch_model(model, method="ia3")
    randomize_adapters(model, seed=seed)
    return model


def adapter_state(model):
    return {name: param.detach().clone() for name, param in model.named_parameters()
            if "lora_" in name or "ia3_l" in name}


def peft_state_dict(model):
    """The adapter as PEFT's get_peft_model_state_dict keys it (what its files hold)."""
    return {f"base_model.model.{name.replace('.default', '')}": param.detach().clone()
            for name, param in adapter_state(model).items()}


@pytest.mark.parametrize("form", ["directory", "state dict"])
def test_swapped_adapter_computes_what_the_saved_one_does(form, tmp_path):
    model, other = patched(seed=3), patched(seed=4)
    ids = token_ids()
    with torch.no_grad():
        expected = other(ids).logits
        before = model(ids).logits
    assert not torch.allclose(before, expected)
    lowrank.save_adapter(other, tmp_path / "other")
    held = [p for n, p in model.named_parameters() if "lora_" in n]
    lowrank.hotswap_adapter(model, tmp_path / "other" if form == "directory" else peft_state_dict(other))
    assert all(a is b for a, b in zip(held, [p for n, p in model.named_parameters() if "lora_" in n]))
    for name, param in adapter_state(other).items():
        assert torch.equal(dict(model.named_parameters())[name], param), name
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)


def test_state_dict_from_peft_itself(tmp_path):
    """A state dict as PEFT returns it for its own model holding the same adapter."""
    from peft import PeftModel

    model, other = patched(seed=3), patched(seed=4)
    lowrank.save_adapter(other, tmp_path / "other")
    peft_model = PeftModel.from_pretrained(tiny_model("llama", blocks=1), tmp_path / "other")
    lowrank.hotswap_adapter(model, get_peft_model_state_dict(peft_model))
    for name, param in adapter_state(other).items():
        assert torch.equal(dict(model.named_parameters())[name], param), name


def test_ia3_state_dict():
    model, other = patched(seed=3, method="ia3"), patched(seed=4, method="ia3")
    lowrank.hotswap_adapter(model, peft_state_dict(other))
    for name, param in adapter_state(other).items():
        assert torch.equal(dict(model.named_parameters())[name], param), name


def test_compiled_model_runs_the_new_weights_without_recompiling():
    model, other = patched(seed=3), patched(seed=4)
    ids = token_ids()
    with torch.no_grad():
        expected_before, expected_after = model(ids).logits, other(ids).logits
    compilations = []

    def counting_backend(graph, example_inputs):
        compilations.append(graph)
        return graph.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting_backend)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(compiled(ids).logits, expected_before, rtol=0, atol=0)
        lowrank.hotswap_adapter(model, peft_state_dict(other))
        after = compiled(ids).logits
    torch._dynamo.reset()
    assert len(compilations) == 1
    torch.testing.assert_close(after, expected_after, rtol=0, atol=0)


def test_mismatches_are_refused_and_nothing_is_swapped(tmp_path):
    model = patched(seed=3)
    state = adapter_state(model)
    good = peft_state_dict(patched(seed=4))
    other_rank = patched(seed=4, rank=2)
    lowrank.save_adapter(other_rank, tmp_path / "rank2")
    lowrank.save_adapter(patched(seed=4, alpha=16), tmp_path / "alpha16")
    fewer = {k: v for k, v in good.items() if "down_proj" not in k}
    last = sorted(good)[-1]
    bad_shape = {**good, last: good[last][:, :-1]}  # every other layer fits: none may be copied
    cases = [
        (peft_state_dict(other_rank), "holds a floating-point"),
        (bad_shape, "holds a floating-point"),
        (fewer, "none for layers it is on"),
        ({**good, "base_model.model.lm_head.lora_A.weight": good[last]}, "not on"),
        ({**good, "lm_head.weight": good[last]}, "not a LoRA A or B"),
        ({k: v.to(torch.int32) for k, v in good.items()}, "floating-point"),
        (tmp_path / "rank2", "differ"),
        (tmp_path / "alpha16", "differ"),
        ([1, 2], "must be a directory or a state dict"),
    ]
    for source, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            lowrank.hotswap_adapter(model, source)
        for name, param in state.items():
            assert torch.equal(dict(model.named_parameters())[name], param), (message, name)
    with pytest.raises(ValueError, match="no adapter|has no adapter"):
        lowrank.hotswap_adapter(model, good, adapter_name="other")
    lowrank.merge(model)
    with pytest.raises(ValueError, match="unmerge first"):
        lowrank.hotswap_adapter(model, good)
    lowrank.unmerge(model)
    assert set(adapter_layers(model)) == {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
                                          for k in good}
