"""Run a trainer's command line in this process, recording what the comparison needs:

    python tests/integration/counted_run.py RECORD.json MODULE [ARGS ...]

runs ``python -m MODULE ARGS`` and writes RECORD.json at exit: the loss of every model forward that
computed one (exact floats: the Trainer's logs round the loss), the Trainer's logs (grad_norm), and
how many times lowrank's fused ops ran. A run whose lowrank plugin failed to load (Axolotl only logs
that) or was bypassed shows zero calls.
"""

import atexit
import functools
import json
import os
import runpy
import sys

import transformers
from transformers import LlamaForCausalLM

import lowrank.ops

record = {"losses": [], "logs": [], "lowrank_calls": {}}


def counted(name, op):
    @functools.wraps(op)
    def call(*args, **kwargs):
        record["lowrank_calls"][name] = record["lowrank_calls"].get(name, 0) + 1
        return op(*args, **kwargs)
    return call


for name in ("lora_linear", "ia3_linear"):
    setattr(lowrank.ops, name, counted(name, getattr(lowrank.ops, name)))

model_forward = LlamaForCausalLM.forward


@functools.wraps(model_forward)
def forward(self, *args, **kwargs):
    output = model_forward(self, *args, **kwargs)
    if self.training and getattr(output, "loss", None) is not None:
        record["losses"].append(output.loss.item())
    return output


LlamaForCausalLM.forward = forward
trainer_log = transformers.Trainer.log


@functools.wraps(trainer_log)
def log(self, logs, *args, **kwargs):
    record["logs"].append(dict(logs))
    return trainer_log(self, logs, *args, **kwargs)


transformers.Trainer.log = log


def write(path):
    with open(path, "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    path, module = sys.argv[1], sys.argv[2]
    atexit.register(write, path)
    sys.argv = [module] + sys.argv[3:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # axolotl_seed, for the YAML
    runpy.run_module(module, run_name="__main__", alter_sys=True)
