"""Patched models under torch.distributed: DDP and FSDP2 with 2 processes on CPU (gloo), started
with torchrun and bounded in time, against single-process training on the same global batch, and
the FSDP2 adapter saved and restored; Trainer under DeepSpeed ZeRO-2/3 saving, resuming and
reloading; the Trainer example under torchrun; and, in-process, how a patched Linear4bit reads its weight once
FSDP has replaced the Params4bit (the state from the module; a cast weight refused).

Each run trains tiny_model("llama", blocks=1) (hidden 32) for a few SGD steps in fp32 with the
kernels in Triton's interpreter (the children inherit TRITON_INTERPRET=1)."""

import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from deepspeed_worker import probe
from distributed_worker import build, global_batch, load_base, save_checkpoint, train, trainable
from helpers import token_ids
from safetensors.torch import load_file
from torch import nn

import lowrank

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
TIMEOUT_S = 300  # one torchrun of 2 processes: ~35 s on 2 busy cores
# fp32 on both sides; only the order of sums differs (two half batches averaged by the all-reduce
# vs one batch; FSDP's reduce-scatter). Measured, relative to the largest value: gradients 5e-7,
# weights after 3 steps 9e-8, losses 1e-7.
TOLERANCE = 1e-5
PEFT_PREFIX = "base_model.model."

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch has no torch.distributed gloo backend")


def deepspeed_skip_reason():
    """DeepSpeed (in the test extra) builds a small C++ op with g++ on its first CPU run."""
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (pip install -e '.[test]')"
    if shutil.which("g++") is None:
        return "DeepSpeed on CPU compiles an op with g++, which this machine lacks"
    return None


def fsdp2_skip_reason():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return "this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)"
    return None


def torchrun(script, *args, cwd=ROOT, env=None):
    """Run ``script`` in 2 processes with torchrun; kill the whole group after TIMEOUT_S."""
    return launch([sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node", "2", script, *map(str, args)], cwd, env)


def launch(command, cwd=ROOT, env=None):
    """Run a launcher ``command``; kill the whole group after TIMEOUT_S."""
    shown = " ".join(map(str, command[2:]))
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True, env={**os.environ, **(env or {})})
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{shown} took over {TIMEOUT_S} s:\n{output[-4000:]}")
    assert process.returncode == 0, f"{shown} failed:\n{output[-4000:]}"
    return output


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_llama")
    save_checkpoint(directory)
    return directory


def run_workers(engine, base, checkpoint, out):
    torchrun(os.path.join(TESTS, "distributed_worker.py"), engine, base, checkpoint, out)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def assert_matches_one_process(ranks, base, checkpoint):
    """Every rank's losses, last adapter gradients and final adapter weights equal those of one
    process training on the whole batch."""
    model = build(base, checkpoint)
    losses, grads, weights = train(model, global_batch(), trainable(model))
    for result in ranks:
        assert result["grads"].keys() == grads.keys() and len(grads) == 14  # 7 layers, A and B
        assert all("lora_" in name for name in grads)
        assert torch.allclose(torch.tensor(result["losses"]), torch.tensor(losses), rtol=TOLERANCE)
        for name in grads:
            assert relative_error(result["grads"][name], grads[name]) <= TOLERANCE, name
            assert relative_error(result["weights"][name], weights[name]) <= TOLERANCE, name
    assert losses[-1] < losses[0]


@needs_gloo
@pytest.mark.parametrize("base", ["dense", "nf4-uint8"])
def test_ddp_all_reduces_only_adapters_and_matches_one_process(base, checkpoint, tmp_path):
    ranks = run_workers("ddp", base, checkpoint, tmp_path)
    for result in ranks:
        assert result["bucketed"] == result["trainable"]  # the frozen base never enters a bucket
    assert all(torch.equal(ranks[0]["weights"][n], ranks[1]["weights"][n]) for n in ranks[0]["weights"])
    assert_matches_one_process(ranks, base, checkpoint)


def saved_adapter(folder):
    """The saved adapter keyed as the model names its parameters (``...lora_A.default.weight``)."""
    tensors = load_file(folder / "adapter_model.safetensors")
    return {re.sub(r"\.(lora_[AB])\.weight$", r".\1.default.weight", k.removeprefix(PEFT_PREFIX)): t
            for k, t in tensors.items()}


@needs_gloo
@pytest.mark.skipif(fsdp2_skip_reason() is not None, reason=str(fsdp2_skip_reason()))
@pytest.mark.parametrize("base", ["dense", "nf4-bfloat16", "nf4-uint8"])
def test_fsdp2_shards_the_base_and_matches_one_process(base, checkpoint, tmp_path):
    """Dense and 4-bit (bitsandbytes' FSDP route: bnb_4bit_quant_storage bf16; and the default
    uint8) bases, each rank holding half of every weight, packed NF4 included. The trained
    adapter, saved by three routes (save_adapter on every rank; Trainer's full state dict passed
    to save_pretrained on rank 0; unshard, save on rank 0, reshard), is the same whole weights
    each time; restored into the sharded model from the file, it is those weights again. Refused,
    with an error: merging a sharded adapter, loading a new adapter into a sharded model, and a
    mixed-precision policy that casts float-stored packed bytes."""
    ranks = run_workers("fsdp2", base, checkpoint, tmp_path)
    storage = "torch.float32" if base == "dense" else f"torch.{base.removeprefix('nf4-')}"
    for result in ranks:
        assert result["q_proj_dtype"] == storage
        assert result["q_proj_local"] * 2 == result["q_proj_full"]
        assert "sharded by FSDP2" in result["refusals"]["merge"]
        assert "already sharded" in result["refusals"]["load_adapter"]
        if base == "nf4-bfloat16":  # MixedPrecisionPolicy(param_dtype=fp32) converts the bytes
            assert "stored as torch.bfloat16 and is now torch.float32" in result["cast_refusal"]
            assert "MixedPrecisionPolicy" in result["cast_refusal"]
        assert all(torch.equal(result["restored"][n], w) for n, w in result["weights"].items())
    for route in ("collective", "state_dict", "unshard"):
        saved = saved_adapter(tmp_path / route)
        assert saved.keys() == ranks[0]["weights"].keys(), route
        assert all(torch.equal(saved[n], w) for n, w in ranks[0]["weights"].items()), route
    assert_matches_one_process(ranks, base, checkpoint)


@needs_gloo
@pytest.mark.skipif(deepspeed_skip_reason() is not None, reason=str(deepspeed_skip_reason()))
@pytest.mark.parametrize("base", ["dense", "nf4-uint8"])
def test_trainer_under_deepspeed_saves_checkpoints_and_adapters_that_reload(
        base, checkpoint, tmp_path):
    """Trainer(deepspeed=...) under ZeRO-2 and ZeRO-3 (the adapter partitioned too): 2 steps with a
    checkpoint at each, trainer.save_model, save_adapter on every rank, and a run resumed from
    the first checkpoint all write the same adapter (the last checkpoint's), which loaded onto
    the base in one process gives the trained model's logits. Under ZeRO-3, refused instead of
    written or loaded: an empty state dict (Trainer's without
    stage3_gather_16bit_weights_on_model_save), the partitions themselves, restoring into the
    partitioned adapter, loading a new adapter into the engine's model."""
    torchrun(os.path.join(TESTS, "deepspeed_worker.py"), base, checkpoint, tmp_path,
             env={"DS_ACCELERATOR": "cpu"})
    for stage in (2, 3):
        out = tmp_path / f"zero{stage}"
        result = torch.load(out / "rank0.pt")
        assert result["partitioned"] == (stage == 3)
        assert len(result["losses"]) == 2 and all(math.isfinite(x) for x in result["losses"])
        final = saved_adapter(out / "final")
        assert len(final) == 14 and all(t.numel() > 0 for t in final.values())
        for other in ("checkpoint-2", "collective", "resumed-final"):
            saved = saved_adapter(out / other)
            assert all(torch.equal(saved[n], t) for n, t in final.items()), (stage, other)
        first = saved_adapter(out / "checkpoint-1")
        assert any(not torch.equal(first[n], t) for n, t in final.items())
        model = lowrank.load_adapter(load_base(base, checkpoint), out / "final")
        with torch.no_grad():
            logits = model(input_ids=probe()).logits
        torch.testing.assert_close(logits, result["logits"], rtol=TOLERANCE, atol=1e-6)
        if stage == 3:
            assert result["partitioned_at_refusals"]
            refusals = result["refusals"]
            assert "stage3_gather_16bit_weights_on_model_save" in refusals["empty_state_dict"]
            assert "has shape (0,)" in refusals["partitions"]
            assert "partitioned by DeepSpeed ZeRO-3" in refusals["restore"]
            assert "already sharded" in refusals["load"]
            assert not (out / "no").exists()


@needs_gloo
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_trainer_under_torchrun_trains_and_saves_a_peft_adapter(launcher, tmp_path):
    """The example, started as README says: torchrun, or accelerate launch --multi_gpu (on CPU)."""
    args = ("--output-dir", tmp_path, "--cpu", "--rank", "4")
    script = os.path.join(ROOT, "examples", "distributed_finetune.py")
    if launcher == "torchrun":
        output = torchrun(script, *args)
    else:
        output = launch([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                         "--num_processes", "2", script, *map(str, args)])
    assert "2 processes" in output
    log = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    steps = [entry for entry in log if "loss" in entry]
    assert len(steps) == 3
    assert all(torch.isfinite(torch.tensor([e["loss"], e["grad_norm"]])).all() for e in steps)
    assert all(e["grad_norm"] > 0 for e in steps)
    adapter = tmp_path / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert len(tensors) == 14 and all(
        k.startswith("base_model.model.model.layers.0.") and k.endswith(("lora_A.weight", "lora_B.weight"))
        for k in tensors)


# In-process: what FSDP does to a Linear4bit, without the processes.

def patched_4bit(storage, directory):
    save_checkpoint(directory)
    model = build(f"nf4-{storage}", directory)
    return model, model.model.layers[0].self_attn.q_proj


def drop_params4bit(linear4bit):
    """What fully_shard leaves: a plain Parameter holding the packed bytes, without quant_state."""
    linear4bit.weight = nn.Parameter(linear4bit.weight.data.clone(), requires_grad=False)


def test_a_4bit_layer_reads_its_quant_state_from_the_module_once_the_params4bit_is_gone(tmp_path):
    model, layer = patched_4bit("bfloat16", tmp_path)
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    expected = layer(x)
    drop_params4bit(layer.base_layer)
    assert getattr(layer.base_layer.weight, "quant_state", None) is None
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


def test_merging_keeps_the_module_quant_state_in_step(tmp_path):
    """After merge / unmerge the module's copy of the state is the weight's: a layer that later
    loses its Params4bit computes with the bytes it holds."""
    model, layer = patched_4bit("uint8", tmp_path)
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    lowrank.merge(model)
    assert layer.base_layer.quant_state is layer.base_layer.weight.quant_state
    merged = layer(x)
    lowrank.unmerge(model)
    assert layer.base_layer.quant_state is layer.base_layer.weight.quant_state
    lowrank.merge(model)
    drop_params4bit(layer.base_layer)
    torch.testing.assert_close(layer(x), merged, rtol=0, atol=0)


def test_a_cast_packed_weight_is_refused(tmp_path):
    model, layer = patched_4bit("bfloat16", tmp_path)
    nn.Module.float(model)  # casts float-stored packed bytes as numbers (transformers' float() refuses)
    with pytest.raises(RuntimeError, match="stored as torch.bfloat16 and is now torch.float32"):
        model(input_ids=token_ids(vocab_size=64))

