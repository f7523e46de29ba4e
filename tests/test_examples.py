"""The examples run end to end, in a subprocess, with their smallest settings, and learn.

They run on lowrank's reference ops (TRITON_INTERPRET is removed from their environment): the
kernels they would run in Triton's interpreter are checked on small shapes by the kernel tests and,
through whole training runs, by test_convergence.py; the examples' models are too large for the
interpreter within the suite's time."""

import os
import re
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def run_example(name, *args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, os.path.join(EXAMPLES, name), *args], env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    summary = result.stdout[result.stdout.index("\nsummary:"):]
    assert "run as reference" in result.stdout
    return summary


def test_qlora_finetune_smoke(tmp_path):
    summary = run_example("qlora_finetune.py", "--smoke", "--output", str(tmp_path))
    first, last = map(float, re.search(r"loss (\S+) -> (\S+) in 30 steps", summary).groups())
    assert last < 0.5 * first, summary
    assert "reloaded adapter: identical logits" in summary
    # Merged in the compute dtype (fp32 on a CPU): the merged model answers as the unmerged one.
    same, prompts = map(int, re.search(r"(\d+)/(\d+) answers as before the merge", summary).groups())
    assert same == prompts == 88, summary
    assert {"loss.csv", "loss.png", "adapter"} <= set(os.listdir(tmp_path))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "adapter"))


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_encoder_classification_smoke(method):
    summary = run_example("encoder_classification.py", "--smoke", "--method", method)
    chance, probe, tuned = map(float, re.search(
        r"accuracy (\S+)% untrained -> (\S+)% linear probe -> (\S+)% fine-tuned", summary).groups())
    assert tuned >= 80.0, summary  # 2 classes, 80 held-out sentences
