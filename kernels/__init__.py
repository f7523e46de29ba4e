"""Triton kernels and their launchers, installed as ``lowrank.kernels``: one file per fused op.

Launchers take plain tensors that callers in ``lowrank`` have already validated; they do not
choose between kernels and the reference (that is ``lowrank._dispatch``).
"""

import os

# Triton picks interpreted or compiled kernels when ``@triton.jit`` runs, that is when these
# modules are imported. Record the choice once so dispatch agrees with the kernels we have.
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"

if INTERPRETER:  # the interpreter computes bf16 dots and sums on raw bits: widen them first
    from . import _interpreter

    _interpreter.install()
