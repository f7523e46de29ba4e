"""bf16 in Triton's interpreter (``TRITON_INTERPRET=1``), made right.

The interpreter stores bf16 values as their uint16 bit patterns, and its ``tl.dot`` and ``tl.sum``
do arithmetic on those patterns: results off by ~1e10, with no error (triton issues 11584 and
11604; upstream does not support bf16 in the interpreter). ``install`` wraps those two steps of
the interpreter so that bf16 operands are widened to fp32 first, which is exact. A dot then
accumulates in fp32 as a GPU's does; a bf16 sum is summed in fp32 and rounded to bf16 once, to
nearest even. Compiled kernels never go through the interpreter, so nothing a GPU runs changes.
Loads, stores and casts of bf16 are the interpreter's own (they are right, except that its
fp32 -> bf16 cast truncates: see ``_common.round_to_bf16``).
"""

import logging

import numpy as np
import triton.language as tl
from triton.runtime import interpreter

NOTICE = ("lowrank: running Triton kernels in Triton's interpreter (TRITON_INTERPRET=1); bf16 "
          "operands of tl.dot and tl.sum are widened to fp32 there, since the interpreter would "
          "compute on their raw bits (triton issues 11584, 11604)")


def _widened(handle):
    """A bf16 TensorHandle as the same values in fp32 (other dtypes as they are)."""
    if handle.dtype.scalar != tl.bfloat16:
        return handle
    return interpreter.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32),
                                    tl.float32)


def _bf16_bits(values):
    """fp32 ``values`` rounded to nearest even bf16, as the uint16 bits the interpreter keeps."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)  # the carry could make a NaN inf


def install():
    """Wrap the interpreter's dot and sum (once per process: lowrank.kernels calls it on import)."""
    create_dot = interpreter.InterpreterBuilder.create_dot
    reduce_sum = interpreter.ReduceOps.sum

    def create_dot_widening_bf16(self, a, b, d, *args):
        return create_dot(self, _widened(a), _widened(b), d, *args)

    def sum_widening_bf16(self, input):
        if input.dtype != tl.bfloat16:
            return reduce_sum(self, input)
        total = np.sum(_widened(input.handle).data, axis=self.axis, keepdims=self.keep_dims)
        return self.to_tensor(_bf16_bits(total), tl.bfloat16)

    interpreter.InterpreterBuilder.create_dot = create_dot_widening_bf16
    interpreter.ReduceOps.sum = sum_widening_bf16
    logging.getLogger("lowrank").info(NOTICE)
