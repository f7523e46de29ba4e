"""Every code block of README.md runs as written.

Python blocks run as a reader would paste them, each in a fresh process in an empty folder (the
block that saves the small model the later blocks load runs there first). A block whose first line
reads ``# NAME.py; run with: torchrun --nproc_per_node N NAME.py`` is saved as NAME.py and run that
way (2 processes, gloo on a CPU). Shell blocks run what this machine cannot (a GPU, the suite
itself): each must be preceded by ``<!-- readme-test: ... -->`` saying what runs it instead, and a
test named there must exist.

On a CPU the blocks run on lowrank's reference ops (TRITON_INTERPRET removed), as they do for a
reader without a GPU.
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
TIMEOUT_S = 300
MARKER = re.compile(r"<!-- readme-test: (.+?) -->\s*$")
TORCHRUN = re.compile(r"# (\w+\.py); run with: torchrun --nproc_per_node (\d+) \1")
MODEL_DIR = "tiny-llama"


def readme_blocks():
    """(language, code, marker or None, line number) of every fenced block, in order."""
    with open(README) as f:
        text = f.read()
    blocks = []
    for match in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.match(before)
        line = text[:match.start()].count("\n") + 1
        blocks.append((match.group(1), match.group(2), marker and marker.group(1), line))
    return blocks


BLOCKS = readme_blocks()
PYTHON = [(code, line) for language, code, _, line in BLOCKS if language == "python"]
SHELL = [(code, marker, line) for language, code, marker, line in BLOCKS if language != "python"]
MODEL_BLOCK = [code for code, _ in PYTHON if ".save_pretrained(path)" in code
               and f'path = "{MODEL_DIR}"' in code]


def run_block(code, folder):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONWARNINGS"] = "ignore"
    launch = TORCHRUN.match(code)
    if launch:
        name, processes = launch.groups()
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   processes, name]
    else:
        name, command = "block.py", [sys.executable, "block.py"]
    with open(os.path.join(folder, name), "w") as f:
        f.write(code)
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    return result


def test_the_readme_has_its_blocks():
    assert len(PYTHON) >= 9 and len(MODEL_BLOCK) == 1, "README.md's code blocks were not found"


@pytest.mark.parametrize("code,line", PYTHON, ids=[f"line{line}" for _, line in PYTHON])
def test_python_block_runs(code, line, tmp_path):
    if MODEL_DIR in code and code is not MODEL_BLOCK[0]:
        setup = run_block(MODEL_BLOCK[0], tmp_path)
        assert setup.returncode == 0, setup.stderr[-3000:]
    result = run_block(code, tmp_path)
    assert result.returncode == 0, (f"README.md line {line}: the block failed\n{code}\n"
                                    f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}")


@pytest.mark.parametrize("code,marker,line", SHELL, ids=[f"line{line}" for *_, line in SHELL])
def test_shell_block_is_covered(code, marker, line):
    """Shell blocks need a GPU or are the suite itself; the marker names what runs them."""
    assert marker, (f"README.md line {line}: a shell block without a <!-- readme-test: ... --> "
                    f"marker saying what runs it:\n{code}")
    for path, test in re.findall(r"(tests/[\w/]+\.py)::(\w+)", marker):
        with open(os.path.join(ROOT, path)) as f:
            assert re.search(rf"def {test}\(", f.read()), f"README.md line {line}: no {path}::{test}"
