"""Nothing lost: a failed save leaves the previous adapter as it was, a patched model pickles,
Trainer resumes from its adapter-only checkpoints, IA3 merges never write what they cannot undo,
and a failed load_adapter leaves the model as it was."""

import io
import json
import os
import pickle

import pytest
import torch
from helpers import load_tiny_4bit_llama, randomize_adapters, tiny_model, token_ids
from safetensors.torch import load_file

import lowrank
from lowrank import adapters
from lowrank.patch import adapter_layers


# save_adapter is atomic

def files_under(directory):
    """{relative path: bytes} of every file under ``directory``."""
    found = {}
    for root, _, names in os.walk(directory):
        for name in names:
            full = os.path.join(root, name)
            found[os.path.relpath(full, directory)] = open(full, "rb").read()
    return found


def disk_full(tensors, filename, metadata=None):
    """A weight writer that fails half-way, as on a full disk."""
    with open(filename, "wb") as f:
        f.write(b"partial")
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("others", [False, True], ids=["adapter-only", "with-other-files"])
def test_failed_save_leaves_the_previous_adapter_as_it_was(others, tmp_path, monkeypatch):
    target = tmp_path / "checkpoint"
    old = lowrank.patch_model(tiny_model("llama", blocks=1), rank=2, alpha=4)
    lowrank.save_adapter(old, target)
    if others:  # a Trainer checkpoint's files, the user's own
        (target / "optimizer.pt").write_bytes(b"optimizer state")
        (target / "notes").mkdir()
        (target / "notes" / "README").write_text("mine")
    before, beside = files_under(target), sorted(os.listdir(tmp_path))
    new = lowrank.patch_model(tiny_model("llama", blocks=1), rank=2, alpha=16)  # other scaling
    randomize_adapters(new)
    with monkeypatch.context() as patched:
        patched.setattr(adapters, "save_file", disk_full)
        with pytest.raises(OSError, match="No space left"):
            lowrank.save_adapter(new, target)
    assert files_under(target) == before
    assert sorted(os.listdir(tmp_path)) == beside  # no staging directory left behind
    lowrank.save_adapter(new, target)
    after = files_under(target)
    assert after.keys() == before.keys()
    assert all(after[k] == v for k, v in before.items() if k.startswith(("optimizer", "notes")))
    assert json.loads(after["adapter_config.json"])["lora_alpha"] == 16
    assert sorted(os.listdir(tmp_path)) == beside


def test_failed_first_save_leaves_no_directory(tmp_path, monkeypatch):
    model = lowrank.patch_model(tiny_model("llama", blocks=1), rank=2)
    monkeypatch.setattr(adapters, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        lowrank.save_adapter(model, tmp_path / "adapter")
    assert os.listdir(tmp_path) == []


def test_save_interrupted_between_the_renames_fails_loudly_on_load(tmp_path, monkeypatch):
    """Killed after the weights moved in and before the config did: the old config is gone, so a
    load fails instead of pairing the new weights with the old scaling."""
    target = tmp_path / "adapter"
    lowrank.save_adapter(lowrank.patch_model(tiny_model("llama", blocks=1), rank=2, alpha=4), target)
    replace = os.replace

    def killed_before_the_config(src, dst):
        if str(dst).endswith(adapters.CONFIG_NAME):
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_the_config)
    with pytest.raises(KeyboardInterrupt):
        lowrank.save_adapter(lowrank.patch_model(tiny_model("llama", blocks=1), rank=2, alpha=16),
                             target)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        lowrank.load_adapter(tiny_model("llama", blocks=1), target)


def test_saves_racing_to_a_new_directory_both_succeed(tmp_path, monkeypatch):
    """Every rank saving the same unsharded adapter (README's DeepSpeed example): another process
    makes the directory between this one's check and its rename, which then fails (the directory
    is not empty); this save then replaces the files in it, as in an existing directory."""
    target = tmp_path / "adapter"
    first = lowrank.patch_model(tiny_model("llama", blocks=1), rank=2, alpha=4)
    second = lowrank.patch_model(tiny_model("llama", blocks=1), rank=2, alpha=16)
    randomize_adapters(second)
    rename = os.rename

    def another_process_first(src, dst):
        monkeypatch.setattr(os, "rename", rename)
        lowrank.save_adapter(first, target)  # the other rank's save lands first
        rename(src, dst)

    monkeypatch.setattr(os, "rename", another_process_first)
    lowrank.save_adapter(second, target)
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no staging directory left behind
    saved = load_file(target / adapters.WEIGHTS_NAME)
    assert json.loads((target / adapters.CONFIG_NAME).read_text())["lora_alpha"] == 16
    fresh = tmp_path / "fresh"
    lowrank.save_adapter(second, fresh)
    expected = load_file(fresh / adapters.WEIGHTS_NAME)
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in saved)


# pickling

def peft_key(name):
    """The file key PEFT's format gives a patched model's parameter ``name``."""
    return "base_model.model." + name.replace(".default.", ".").removesuffix(".default")


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("architecture,method", [("llama", "lora"), ("gpt2", "ia3")])
def test_pickled_patched_model_loads_back_saves_and_unpatches(architecture, method, tmp_path):
    base = tiny_model(architecture, blocks=1)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = lowrank.patch_model(base, method=method, **({"rank": 4} if method == "lora" else {}))
    randomize_adapters(model)
    ids = token_ids()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    again = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(loaded(ids).logits, expected)
        assert torch.equal(again(ids).logits, expected)
    randomize_adapters(loaded, seed=5)  # save_pretrained must write the loaded model, not the pickled one
    loaded.save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "adapter_model.safetensors")
    held = trainable(loaded)
    assert saved.keys() == {peft_key(n) for n in held}
    assert all(torch.equal(saved[peft_key(n)], p) for n, p in held.items())
    lowrank.unpatch(loaded)
    assert not adapter_layers(loaded) and "save_pretrained" not in vars(loaded)
    assert all(torch.equal(v, original[k]) for k, v in loaded.state_dict().items())


# Trainer resumes

def train(model, output_dir, resume=None, steps=4, **arguments):
    """Trainer on a fixed tiny dataset, checkpoints every 2 steps; returns (trainer, losses, the
    trainable weights when training began)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    began = {}

    class AtBegin(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            began.update({n: p.detach().clone() for n, p in model.named_parameters()
                          if p.requires_grad})

    ids = token_ids(batch=4, length=9)
    rows = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=output_dir, max_steps=steps, learning_rate=1e-2,
                             per_device_train_batch_size=2, logging_steps=1, report_to=[],
                             use_cpu=True, save_strategy="steps", save_steps=2, seed=0,
                             **arguments)
    trainer = Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows,
                      callbacks=[AtBegin()])
    trainer.train(resume_from_checkpoint=resume)
    losses = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    return trainer, losses, began


def test_trainer_resumes_from_an_adapter_only_checkpoint(tmp_path):
    model = lowrank.patch_model(tiny_model("llama", blocks=1), rank=4)
    _, losses, _ = train(model, tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert not (checkpoint / "model.safetensors").exists()
    torch.manual_seed(42)  # another initial adapter: resuming must replace it
    fresh = lowrank.patch_model(tiny_model("llama", blocks=1), rank=4)
    _, resumed, began = train(fresh, tmp_path / "resumed", resume=str(checkpoint))
    at_checkpoint = load_file(checkpoint / "adapter_model.safetensors")
    assert at_checkpoint.keys() == {peft_key(n) for n in began}
    assert all(torch.equal(p, at_checkpoint[peft_key(n)]) for n, p in began.items())
    assert resumed == losses  # steps 1-2 from the checkpoint's log, 3-4 run again, the same
    final = trainable(model)
    assert all(torch.equal(p, final[n]) for n, p in trainable(fresh).items())


def test_trainer_loads_the_best_adapter_at_end(tmp_path):
    model = lowrank.patch_model(tiny_model("llama", blocks=1), rank=4)
    trainer, _, _ = train(model, tmp_path / "run", eval_strategy="steps", eval_steps=2,
                          load_best_model_at_end=True, metric_for_best_model="loss")
    best = load_file(os.path.join(trainer.state.best_model_checkpoint, "adapter_model.safetensors"))
    weights = trainable(model)
    assert best.keys() == {peft_key(n) for n in weights}
    assert all(torch.equal(p, best[peft_key(n)]) for n, p in weights.items())


# IA3 merges

def snapshot(model):
    """What a failed call must leave as it was: module types, every tensor, flags, attributes."""
    return ({n: type(m) for n, m in model.named_modules()},
            {k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            sorted(vars(model)), getattr(model, "lowrank_state", None) and
            (list(model.lowrank_state.adapters), model.lowrank_state.active))


def assert_same_snapshot(actual, expected):
    modules, tensors, flags, attributes, state = actual
    assert modules == expected[0] and flags == expected[2] and attributes == expected[3]
    assert state == expected[4]
    assert tensors.keys() == expected[1].keys()
    assert all(torch.equal(t, expected[1][k]) for k, t in tensors.items())


def put_zero_in_l(model, path):
    layer = adapter_layers(model)[path]
    with torch.no_grad():
        layer.ia3_l["default"].view(-1)[1] = 0.0


def test_ia3_merge_refuses_a_zero_in_l_before_touching_the_weights():
    model, ids = tiny_model("qwen2"), token_ids()  # qwen2: biases, scaled by l too
    lowrank.patch_model(model, method="ia3")
    randomize_adapters(model)
    last = list(adapter_layers(model))[-1]  # any layer merged before the check would show
    put_zero_in_l(model, last)
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"1 zeros in l of {last}.*merge_and_unload"):
        lowrank.merge(model)
    assert_same_snapshot(snapshot(model), before)
    assert not any(layer.merged_adapters for layer in adapter_layers(model).values())
    with torch.no_grad():
        adapted = model(ids).logits
        lowrank.merge_and_unload(model)  # merging for good is fine
        torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-5, atol=1e-5)


def test_ia3_unmerge_refuses_a_zero_set_after_merging():
    model = tiny_model("qwen2")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    lowrank.patch_model(model, method="ia3")
    randomize_adapters(model)
    lowrank.merge(model)
    path = list(adapter_layers(model))[-1]
    kept = adapter_layers(model)[path].ia3_l["default"].detach().clone()
    put_zero_in_l(model, path)
    before = snapshot(model)
    for call in (lowrank.unmerge, lowrank.unpatch):
        with pytest.raises(ValueError, match=f"zeros in l of {path}.*nothing was unmerged"):
            call(model)
        assert_same_snapshot(snapshot(model), before)
    with torch.no_grad():
        adapter_layers(model)[path].ia3_l["default"].copy_(kept)
    lowrank.unpatch(model)
    for key, value in model.state_dict().items():
        assert torch.isfinite(value).all()
        torch.testing.assert_close(value, original[key], rtol=1e-6, atol=1e-6)


def test_ia3_zero_in_l_merges_into_nf4_and_unmerges_exactly(tmp_path):
    """NF4 keeps the original bytes for unmerge: nothing to divide, nothing refused."""
    model = load_tiny_4bit_llama(tmp_path, torch.float32, dtype=torch.float32)
    lowrank.patch_model(model, method="ia3")
    randomize_adapters(model)
    path = list(adapter_layers(model))[-1]
    put_zero_in_l(model, path)
    packed = adapter_layers(model)[path].base_layer.weight.data.clone()
    lowrank.merge(model)
    lowrank.unmerge(model)
    assert torch.equal(adapter_layers(model)[path].base_layer.weight.data, packed)


# load_adapter fails cleanly

@pytest.fixture
def saved_lora(tmp_path):
    model = lowrank.patch_model(tiny_model("llama", blocks=1), rank=8, alpha=16)
    randomize_adapters(model)
    lowrank.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


BAD_CONFIGS = {
    "float-r": (lambda c: {**c, "r": 8.0}, "'r'.*positive integer, got 8.0"),
    "string-alpha": (lambda c: {**c, "lora_alpha": "16"}, "'lora_alpha'.*got '16'"),
    "missing-r": (lambda c: {k: v for k, v in c.items() if k != "r"}, "'r'.*got None"),
    "not-an-object": (lambda c: [c], "holds a JSON list"),
    "bad-regex": (lambda c: {**c, "rank_pattern": {"q_proj(": 8}},
                  "'rank_pattern'.*'q_proj\\('.*not a valid regular expression"),
    "pattern-value": (lambda c: {**c, "alpha_pattern": {"q_proj": "x"}},
                      "'alpha_pattern' .*maps 'q_proj' to 'x'"),
    "dropout-one": (lambda c: {**c, "lora_dropout": 1.0}, r"'lora_dropout'.*\[0, 1\), got 1.0"),
    "dropout-negative": (lambda c: {**c, "lora_dropout": -0.1}, "'lora_dropout'.*got -0.1"),
    "rslora-string": (lambda c: {**c, "use_rslora": "yes"}, "'use_rslora'.*got 'yes'"),
}


@pytest.mark.parametrize("patched", [False, True], ids=["plain", "patched"])
@pytest.mark.parametrize("bad", BAD_CONFIGS, ids=list(BAD_CONFIGS))
def test_failed_load_leaves_the_model_as_it_was(bad, patched, saved_lora):
    edit, named = BAD_CONFIGS[bad]
    config_file = saved_lora / "adapter_config.json"
    config_file.write_text(json.dumps(edit(json.loads(config_file.read_text()))))
    model = tiny_model("llama", blocks=1)
    if patched:
        lowrank.patch_model(model, rank=2, target_modules=["v_proj"], adapter_name="mine")
    before = snapshot(model)
    with pytest.raises(ValueError, match=named):
        lowrank.load_adapter(model, saved_lora, adapter_name="loaded")
    assert_same_snapshot(snapshot(model), before)
