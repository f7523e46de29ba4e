"""Shared by the trainer integration tests: run a trainer's command line twice (PEFT alone, then
with lowrank) in a subprocess, and compare what the two runs recorded and saved.

These tests run in the frameworks' own venvs (``./run integration``), not in the default suite:
their file names (check_*.py) are outside pytest's default patterns, so ``./run test`` does not
collect them.
"""

import json
import math
import os
import subprocess
import sys

import yaml
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DATA = os.path.join(ROOT, "examples", "data", "alpaca_tiny.jsonl")
TIMEOUT_S = 600
# The reference ops (plain PyTorch, the CPU default) do PEFT's arithmetic in PEFT's order: runs are
# bit-identical. The Triton kernels in the interpreter (TRITON_INTERPRET=1) accumulate in another
# order: within 1e-6.
TOLERANCE = 1e-6 if os.environ.get("TRITON_INTERPRET") == "1" else 0.0


def train(tmp_path, name, config, module, *args):
    """Write ``config`` as tmp_path/name.yaml, run ``python -m module *args name.yaml`` through
    counted_run.py; return (record, adapter tensors, log text)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    record = tmp_path / f"{name}.json"
    env = dict(os.environ, AXOLOTL_DO_NOT_TRACK="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=HERE)
    command = [sys.executable, os.path.join(HERE, "counted_run.py"), str(record), module, *args,
               str(path)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"{name}: the run failed\n{log[-6000:]}"
    with open(record) as f:
        record = json.load(f)
    adapter = load_file(os.path.join(config["output_dir"], "adapter_model.safetensors"))
    return record, adapter, log


def grad_norms(record):
    return [logs["grad_norm"] for logs in record["logs"] if "grad_norm" in logs]


def assert_same_training(peft, ours, label):
    """The lowrank run trained exactly as PEFT's: lowrank's ops ran in it (and not in PEFT's), same
    losses and gradient norms at every step, same saved adapter. Prints the figures."""
    (peft_record, peft_adapter, _), (our_record, our_adapter, our_log) = peft, ours
    assert not peft_record["lowrank_calls"], f"{label}: lowrank ran in the PEFT-only run"
    assert our_record["lowrank_calls"].get("lora_linear", 0) > 0, (
        f"{label}: lowrank's layers never ran (plugin not loaded, or bypassed)\n{our_log[-6000:]}")
    assert len(peft_record["losses"]) == len(our_record["losses"]) > 0
    loss_gap = max(abs(a - b) for a, b in zip(peft_record["losses"], our_record["losses"]))
    norms = grad_norms(peft_record), grad_norms(our_record)
    assert len(norms[0]) == len(norms[1]) > 0
    norm_gap = max(abs(a - b) for a, b in zip(*norms))
    assert peft_adapter.keys() == our_adapter.keys() and peft_adapter
    adapter_gap = max((peft_adapter[k] - our_adapter[k]).abs().max().item() for k in peft_adapter)
    print(f"\n{label}: {our_record['lowrank_calls']['lora_linear']} lowrank lora_linear calls; "
          f"losses PEFT {peft_record['losses']}\n  lowrank {our_record['losses']}\n"
          f"  max |loss gap| {loss_gap:.3g}, max |grad-norm gap| {norm_gap:.3g}, "
          f"max |adapter gap| {adapter_gap:.3g} over {len(peft_adapter)} tensors")
    for gap, what in ((loss_gap, "loss"), (norm_gap, "gradient norm"), (adapter_gap, "adapter")):
        assert gap <= TOLERANCE * max(1.0, abs(peft_record["losses"][0])), (
            f"{label}: {what} differs from PEFT's by {gap}")
    assert all(math.isfinite(x) for x in our_record["losses"])
