"""What the launchers launch, captured on CPU tensors and specialized as Triton's JIT would.

The launchers of ``lowrank.kernels`` are called as ``lowrank.ops`` calls them, with uninitialised
CPU tensors of real shapes; ``capture`` intercepts each ``kernel[grid](...)`` instead of running
it. ``specialize`` then binds the captured arguments with Triton's own JIT binder for a GPU
target, so what is compiled is what would run there: integers equal to 1 become constants, and
16-byte aligned pointers and integers divisible by 16 carry ``tt.divisibility`` attributes (which
decide vector widths and software pipelining).

Two sets of launches:
- ``bench_launches``: the benchmark cases (bench/*.py shapes, bf16): what the static report reads.
- ``coverage_launches``: every launcher with every flag, dtype and weight kind it takes, on an
  aligned and a ragged shape, each value at least once (not their full product: the rule is at
  ``coverage_calls``): what the compile test builds.
"""

import contextlib
import itertools
from dataclasses import dataclass, field

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, create_function_from_signature

from bench.lora_linear import BLOCKSIZE, RANK, SCALING
from lowrank.kernels import (_common, dora_grad_scale, dora_norm, gated_activation, ia3_linear,
                             ia3_merge, lora_grouped, lora_linear, lora_linear_decode, lora_merge,
                             lora_mixed, lora_output_grad)
from lowrank.kernels import nf4_dequantize, nf4_quantize
from lowrank.kernels._common import NF4_BLOCKSIZES, Target
from lowrank.ops import FrozenWeight

NESTED_BLOCKSIZE = nf4_quantize.NESTED_BLOCKSIZE
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
WEIGHT_KINDS = ("dense", "nf4", "nf4-nested")


@dataclass
class Launch:
    """One captured ``kernel[grid](*args, **kwargs)``; ``case`` names the call that made it."""

    case: str
    kernel: JITFunction
    grid: tuple
    args: tuple
    kwargs: dict
    config: int = 0  # its index in the launcher's config list (autotuned when it has several)
    configs: int = 1  # the list's length
    # Integers the kernel reads from a tensor that the model needs and cannot read from its integer
    # arguments: the grouped kernels' rows per expert and row tiles, from the offsets.
    model_ints: dict = field(default_factory=dict)

    @property
    def name(self):
        return self.kernel.fn.__name__


@dataclass
class Specialized:
    """A launch as Triton's JIT compiles it for one target."""

    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    values: dict = field(default_factory=dict)  # every argument by name, tensors as their shapes

    def constant_ones(self):
        """Integer arguments the JIT made constants because they were 1."""
        return sorted(name for name, kind in self.signature.items()
                      if kind == "constexpr" and self.values.get(name) == 1
                      and isinstance(self.values[name], int) and not isinstance(self.values[name], bool))

    def divisible(self, names):
        """Arguments carrying tt.divisibility=16 (``names``: the kernel's argument names)."""
        return sorted(names[path[0]] for path, attr in self.attrs.items()
                      if ["tt.divisibility", 16] in attr)


def gpu(arch, multiprocessors=132):
    """The ``Target`` the launchers configure for: sm_``arch`` with ``multiprocessors`` SMs (the
    split-K decode sizes its grid from them; 132 is H100 SXM's count), inline PTX allowed."""
    return Target(arch, multiprocessors, inline_ptx=True)


# Where ``torch_gemm`` records while a ``capture`` runs: (case, list) or None.
_torch_sink = None


def torch_gemm(m, n, k, read, written, what):
    """A product torch runs on the cublas route (cuBLAS on a GPU), which no Triton launch shows:
    ``torch_op`` with ``2 m n k`` flops. ``read`` / ``written``: elements of 2 bytes (bf16, the
    bench cases' dtype), each operand once (an addmm_ reads its output too). ``what``: the
    product, as the report names it. ``k`` 0: a copy (torch.cat), bytes only."""
    torch_op(2 * m * n * k, 2 * (read + written), what)


def torch_op(flops, nbytes, what):
    """A torch op no Triton launch shows, recorded for the model (``model.launch_time``: its flops
    at cuBLAS's rate or its bytes at copy bandwidth, the slower) while a ``capture`` with a
    ``modelled`` list runs; not built, so the compile test never sees it."""
    if _torch_sink is not None:
        case, records = _torch_sink
        records.append({"case": case, "kernel": f"torch: {what}", "config": 0, "configs": 1,
                        "modelled": {"flops": flops, "bytes": nbytes}})


@contextlib.contextmanager
def capture(case, launches, target, every_config=True, model_ints=None, modelled=None):
    """Record every kernel launch made inside the block as ``Launch``es of ``case`` instead of
    running it, the launchers configuring for ``target`` (``_common.Target``): the CPU tensors'
    device stands for that GPU. An autotuned launch (``_common.launch`` with several configs) is
    recorded once per config of its list, or only its first unless ``every_config``.
    ``model_ints``: the launches' ``Launch.model_ints``. ``modelled``: a list that gets the
    block's ``torch_gemm`` records (None: they are dropped)."""
    global _torch_sink
    model_ints = model_ints or {}

    def record(kernel, *args, grid, warmup, **kwargs):
        launches.append(Launch(case, kernel, grid, args, kwargs, model_ints=model_ints))

    def record_configs(tuner, *args, grid, warmup, **kwargs):
        configs = tuner.configs if every_config else tuner.configs[:1]
        for index, config in enumerate(configs):
            options = {**kwargs, **config.all_kwargs()}
            meta = {**dict(zip(tuner.arg_names, args)), **options}
            launches.append(Launch(case, tuner.fn, grid(meta), args, options, index,
                                   len(tuner.configs), model_ints))

    run, tuned_run, device_target = JITFunction.run, Autotuner.run, _common.target
    JITFunction.run, Autotuner.run, _common.target = record, record_configs, lambda device: target
    _torch_sink = None if modelled is None else (case, modelled)
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run, _common.target = run, tuned_run, device_target
        _torch_sink = None


def specialize(launch, arch):
    """``launch`` as Triton's JIT specializes it for sm_``arch``: its own binder and packing."""
    kernel = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {**launch.kwargs, "debug": launch.kwargs.get("debug", kernel.debug) or False}
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization,
                                                              options)
    values = {name: tuple(v.shape) if isinstance(v, torch.Tensor) else v for name, v in bound.items()}
    return Specialized(signature, constexprs, attrs, options.__dict__, values)


# The weight as lowrank.ops hands it to the launchers: a FrozenWeight's tensor (dense N x K in x's
# dtype, or flat packed bytes) and its NF4 decoding (FrozenWeight.nf4, None for a dense weight).

def weight(kind, n, k, dtype, blocksize=BLOCKSIZE):
    if kind == "dense":
        return torch.empty(n, k, dtype=dtype), None
    blocks = -(-n * k // blocksize)
    nested = kind == "nf4-nested"
    frozen = FrozenWeight(
        torch.empty((n * k + 1) // 2, dtype=torch.uint8), (n, k),
        absmax=torch.empty(blocks, dtype=torch.uint8 if nested else torch.float32),
        nested_code=torch.empty(256) if nested else None,
        nested_absmax=torch.empty(-(-blocks // NESTED_BLOCKSIZE)) if nested else None,
        offset=torch.empty(()) if nested else None, blocksize=blocksize,
        nested_blocksize=NESTED_BLOCKSIZE if nested else 1)
    return frozen.tensor, frozen.nf4


def nested_args(nf4):
    """nf4_dequantize's ``nested`` argument for a weight()'s decoding."""
    if nf4.nested_code is None:
        return None
    return nf4.nested_code, nf4.nested_absmax, nf4.offset, nf4.nested_blocksize


def seed():
    return torch.empty(1, dtype=torch.int64)


def empty(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype)


def lora_linear_calls(m, k, n, kind, dtype, dropout=0.0, bias=False, branch=None,
                      blocksize=BLOCKSIZE):
    """{step: fn} for one LoRA linear forward and backward, as lowrank.ops runs them (a decode
    forward alone when M is small enough for the split-K path). ``branch``: the LoRA branch's
    dtype (A, B, S, dS) if not x's (fp32 adapters of a 16-bit x: the split products)."""
    branch = branch or dtype
    w, nf4 = weight(kind, n, k, dtype, blocksize)
    x, a, b = empty(m, k, dtype=dtype), empty(RANK, k, dtype=branch), empty(n, RANK, dtype=branch)
    y, s = empty(m, n, dtype=dtype), empty(m, RANK, dtype=branch)
    bias_t = empty(n, dtype=dtype) if bias else None
    if m <= lora_linear_decode.DECODE_MAX_M:
        return {"forward": lambda: lora_linear_decode.lora_decode_forward(
            x, w, a, b, bias_t, y, s, seed(), dropout, SCALING, nf4)}
    return {
        "forward": lambda: (lora_linear.lora_shrink(x, a, s, seed(), dropout),
                            lora_linear.lora_forward(x, w, s, b, bias_t, y, SCALING, nf4)),
        "backward": lambda: (
            lora_branch_grads(m, n, dtype, branch),
            lora_linear.lora_grad_input(empty(m, n, dtype=dtype), w, s, a, empty(m, k, dtype=dtype),
                                        seed(), dropout, nf4),
            lora_linear.lora_grad_a(s, x, empty(RANK, k), seed(), dropout))}


def lora_branch_grads(m, n, dtype, branch=None):
    """The backward's dS = s dY B and dB = s dY^T S on every route (lowrank.ops.lora_output_grad,
    before dX): one pass over dY (M x N), then torch's sums of its fp32 partials (modelled: each
    reads its partials and writes its result, dS in the branch's dtype, dB in fp32)."""
    branch = branch or dtype
    dy, s, b = empty(m, n, dtype=dtype), empty(m, RANK, dtype=branch), empty(n, RANK, dtype=branch)
    lora_output_grad.lora_output_grad(dy, s, b, SCALING, empty(m, RANK, dtype=branch),
                                      empty(n, RANK))
    target = _common.target(dy.device)
    chunks, slabs, _, _ = lora_output_grad.partition(
        m, n, RANK, target, lora_output_grad.output_grad_config(target, dtype, branch))
    torch_op(0, 4 * chunks * m * RANK + branch.itemsize * m * RANK, "dS = sum of partials")
    torch_op(0, 4 * slabs * n * RANK + 4 * n * RANK, "dB = sum of partials")


def lora_cublas_calls(m, k, n, kind, dtype):
    """{step: fn} for one LoRA linear forward and backward on the cublas route (no dropout, bias,
    adapters in x's dtype: the bench cases), as lowrank.ops.lora runs it: the Triton launches
    captured, torch's products modelled (``torch_gemm``). Forward: for NF4 where
    ``joined_forward`` says so, the shrink writing [x | S], the dequantize into rows beside s B,
    one GEMM; else the shrink, the dequantize, Y = s S B^T and addmm_(x, W^T) into it. Backward:
    dS and dB, dX (NF4 where ``joined_grad_input`` says so: [dY | dS] [W ; A] after a copy of dY
    beside dS; else dX = dS A and addmm_(dY, W) into it), dA. An addmm_ reads its output inside
    the GEMM (M x N or M x K more bytes), where the flops bound it."""
    from lowrank.ops.lora import joined_forward, joined_grad_input

    w, nf4 = weight(kind, n, k, dtype)
    x, a, s = empty(m, k, dtype=dtype), empty(RANK, k, dtype=dtype), empty(m, RANK, dtype=dtype)
    nested = None if nf4 is None else nested_args(nf4)

    def dequantize(out):
        nf4_dequantize.nf4_dequantize(w, nf4.absmax, nf4.code, out, BLOCKSIZE, nested)

    def forward():
        if nf4 is not None and joined_forward(m, k, n, RANK, False):
            lora_linear.lora_shrink(x, a, s, seed(), 0.0, empty(m, k + RANK, dtype=dtype))
            dequantize(empty(n, k + RANK, dtype=dtype)[:, :k])
            torch_gemm(m, n, k + RANK, (m + n) * (k + RANK), m * n, "[x | S] [W | sB]^T")
            return
        lora_linear.lora_shrink(x, a, s, seed(), 0.0)
        if nf4 is not None:
            dequantize(empty(n, k, dtype=dtype))
        torch_gemm(m, n, RANK, (m + n) * RANK, m * n, "s S B^T")
        torch_gemm(m, n, k, (m + n) * k + m * n, m * n, "addmm_(x, W^T)")

    def backward():
        lora_branch_grads(m, n, dtype)
        if nf4 is not None and joined_grad_input(m, k, n, RANK, False):
            dequantize(empty(n + RANK, k, dtype=dtype)[:n])
            torch_gemm(m, n + RANK, 0, m * (n + RANK), m * (n + RANK), "cat(dY, dS)")
            torch_gemm(m, k, n + RANK, (m + k) * (n + RANK), m * k, "[dY | dS] [W ; A]")
        else:
            if nf4 is not None:
                dequantize(empty(n, k, dtype=dtype))
            torch_gemm(m, k, RANK, (m + k) * RANK, m * k, "dS A")
            torch_gemm(m, k, n, (m + k) * n + m * k, m * k, "addmm_(dY, W)")
        lora_linear.lora_grad_a(s, x, empty(RANK, k), seed(), 0.0)
    return {"forward": forward, "backward": backward}


def lora_mixed_call(m, k, n, kind, dtype, adapters, bias=False, blocksize=BLOCKSIZE):
    """One mixed-adapter forward (one adapter per row, ``adapters`` stacked), as lowrank.ops runs it."""
    w, nf4 = weight(kind, n, k, dtype, blocksize)
    index = torch.empty(m, dtype=torch.int64)
    return lambda: lora_mixed.lora_mixed_forward(
        empty(m, k, dtype=dtype), w, empty(adapters, RANK, k, dtype=dtype),
        empty(adapters, n, RANK, dtype=dtype), empty(adapters), index,
        empty(n, dtype=dtype) if bias else None, empty(m, RANK, dtype=dtype),
        empty(m, n, dtype=dtype), nf4)


def ia3_linear_calls(m, k, n, kind, dtype, feedforward, bias=False):
    """{step: fn} for one IA3 linear forward and backward (dX and dl), as lowrank.ops runs them."""
    w, nf4 = weight(kind, n, k, dtype)
    x, y, dy, dx = (empty(m, k, dtype=dtype), empty(m, n, dtype=dtype), empty(m, n, dtype=dtype),
                    empty(m, k, dtype=dtype))
    scale = empty(k if feedforward else n)
    bias_t = empty(n, dtype=dtype) if bias else None
    partials = empty(ia3_linear.partial_rows(m, feedforward), scale.numel())
    if feedforward:  # x * l in a pass of its own before the GEMM; dl comes out of the dX kernel
        def forward():
            ia3_linear.scale_columns(x, scale, empty(m, k, dtype=dtype))
            ia3_linear.ia3_forward(x, w, bias_t, y, nf4=nf4)

        def backward():
            ia3_linear.ia3_grad_input(dy, w, dx, scale, x, partials, nf4)
    else:  # dY * l in a pass of its own before the dX GEMM
        def forward():
            ia3_linear.ia3_forward(x, w, bias_t, y, scale, nf4)

        def backward():
            ia3_linear.scale_columns(dy, scale, empty(m, n, dtype=dtype))
            ia3_linear.ia3_grad_input(dy, w, dx, nf4=nf4)
            ia3_linear.ia3_grad_scale(x, w, bias_t, dy, partials, nf4)
    return {"forward": forward, "backward": backward}


def merge_call(op, n, k, kind, dtype, out, unmerge=False, feedforward=False, blocksize=BLOCKSIZE):
    """One merge of a LoRA adapter (``op="lora"``) or an IA3 vector (``"ia3"``) into a weight of
    ``kind`` (dense in ``dtype``), into ``out``: a dense dtype, or "nf4" (requantized at the
    weight's ``blocksize``, the nested absmax quantized afterwards when the weight is nested, as
    ops.merge_lora does)."""
    w, nf4 = weight(kind, n, k, dtype, blocksize)
    blocks = -(-n * k // blocksize)
    if out == "nf4":
        target = (empty((n * k + 1) // 2, dtype=torch.uint8), empty(blocks), empty(15))
    else:
        target = (w if kind == "dense" and out == dtype else empty(n, k, dtype=out), None, None)

    def call():
        if op == "lora":
            lora_merge.lora_merge(w, empty(RANK, k), empty(n, RANK), SCALING, *target, nf4=nf4)
        else:
            ia3_merge.ia3_merge(w, empty(k if feedforward else n), (n, k), feedforward, unmerge,
                                *target, nf4=nf4)
        if out == "nf4" and kind == "nf4-nested":
            nf4_quantize.quantize_absmax(target[1], empty(()), empty(255),
                                         empty(blocks, dtype=torch.uint8),
                                         empty(-(-blocks // NESTED_BLOCKSIZE)))
    return call


def dora_norm_call(n, k, kind, dtype, rank=RANK):
    """DoRA's weight norm ||W + s B A|| per row (fp32 factors, as lowrank.ops passes them)."""
    w, nf4 = weight(kind, n, k, dtype)
    return lambda: dora_norm.dora_norm(w, empty(rank, k), empty(n, rank), SCALING, empty(n), nf4)


def dora_forward_call(m, k, n, kind, dtype, dropout=0.0, keep_product=True, bias=False):
    """DoRA's forward on the fused route (lowrank.ops.dora): the shrink, with dropout the undropped
    product, then the forward kernel with DoRA's epilogue (kernels/_dora_epilogue.py), storing the
    product for dm if ``keep_product`` (training)."""
    w, nf4 = weight(kind, n, k, dtype)
    x, a, b = empty(m, k, dtype=dtype), empty(RANK, k, dtype=dtype), empty(n, RANK, dtype=dtype)
    y, s = empty(m, n, dtype=dtype), empty(m, RANK, dtype=dtype)
    bias_t = empty(n, dtype=dtype) if bias else None
    undropped = empty(m, n, dtype=dtype) if dropout > 0 else None
    product = empty(m, n, dtype=dtype) if keep_product else None

    def call():
        lora_linear.lora_shrink(x, a, s, seed(), dropout)
        if undropped is not None:  # the bias goes into P, not into the epilogue's launch
            lora_linear.lora_forward(x, w, s, b, bias_t, undropped, SCALING, nf4)
        lora_linear.lora_forward(x, w, s, b, None if undropped is not None else bias_t, y,
                                 SCALING, nf4, column_scale=empty(n), undropped=undropped,
                                 product=product)
    return call


def dora_grad_scale_call(m, n, dtype, shifted, column_sums):
    """DoRA's backward scale (lowrank.ops.dora): g dY, with dropout (g - 1) dY, and when m wants a
    gradient the column sums of dY * Q."""
    dy = empty(m, n, dtype=dtype)
    partial = empty(dora_grad_scale.partial_rows(m), n) if column_sums else None
    return lambda: dora_grad_scale.dora_grad_scale(
        dy, empty(n), empty(m, n, dtype=dtype), empty(m, n, dtype=dtype) if shifted else None,
        empty(m, n, dtype=dtype) if column_sums else None, partial)


def dequantize_call(n, k, kind, out_dtype):
    packed, nf4 = weight(kind, n, k, out_dtype)
    return lambda: nf4_dequantize.nf4_dequantize(packed, nf4.absmax, nf4.code,
                                                 empty(n, k, dtype=out_dtype), BLOCKSIZE,
                                                 nested_args(nf4))


def quantize_call(n, k, dtype, blocksize):
    return lambda: nf4_quantize.nf4_quantize(
        empty(n * k, dtype=dtype), empty(15), empty((n * k + 1) // 2, dtype=torch.uint8),
        empty(-(-n * k // blocksize)), blocksize)


def lora_grouped_calls(rows, k, n, experts, dtype, transposed=False, rank=RANK, top_k=None,
                       fused_shrink=None, fused_output_grad=None, bias=False):
    """The grouped LoRA GEMM over ``experts`` experts (rows spread evenly): forward (shrink and
    GEMM) and backward (dS and dB in one pass over dY, dX GEMM, dA reduction), in PEFT's adapter
    layout; the calls carry ``model_ints`` (``grouped_model_ints``). With ``top_k`` the kernels
    gather x's rows from rows / top_k tokens (``row_index``), as the first projection of
    ``experts_forward`` runs; the dX GEMM writes the sorted rows, which torch sums into the
    tokens'. The forward computes S inside its GEMM, and the backward dS and dB inside the dX
    GEMM, where ``lora_grouped.fuses_shrink`` / ``fuses_output_grad`` say so, as the op does, or
    as ``fused_shrink`` / ``fused_output_grad`` say (compile coverage: every GPU builds both).
    ``bias``: the forward adds the experts' biases (E x N) in its GEMM's epilogue, as the op does
    for gpt-oss's experts."""
    offsets = torch.linspace(0, rows, experts + 1).to(torch.int32)
    x = empty(rows // top_k if top_k else rows, k, dtype=dtype)
    row_index = empty(rows, dtype=torch.int64) if top_k else None
    grad_x = empty(rows, k, dtype=dtype)
    dy, y = empty(rows, n, dtype=dtype), empty(rows, n, dtype=dtype)
    s, w = empty(rows, rank, dtype=dtype), empty(experts, *((k, n) if transposed else (n, k)), dtype=dtype)
    lora_a, lora_b = empty(experts * rank, k), empty(n, rank * experts)
    b_rows = empty(experts, n, rank, dtype=dtype)  # lora_grouped's E x N x r copy of B (_experts_b)
    grad_b = empty(n, rank * experts)  # B's gradient, as lora_grouped_backward allocates it
    expert_bias = empty(experts, n, dtype=dtype) if bias else None
    w_strides = (w.stride(0), w.stride(2), w.stride(1)) if transposed else w.stride()
    a = lora_a.stride()

    # Torch's work around the launches (lowrank.ops.lora_grouped): B copied into b_rows by the
    # forward (fp32 read, x's dtype written), which the backward's kernels read too (saved, not
    # copied again), and the sum of the fp32 dS partials, one per chunk of dY's columns.
    b_copy = n * rank * experts * (lora_b.element_size() + b_rows.element_size())

    def forward():
        torch_op(0, b_copy, "B as E x N x r (copy)")
        fused = fused_shrink
        if fused is None:  # as lora_grouped_forward chooses
            fused = lora_grouped.fuses_shrink(x.device, dtype, rank, k, n, transposed)
        if fused:
            lora_grouped.grouped_forward(x, w, w_strides, lora_a, (rank * a[0], a[1], a[0]), b_rows,
                                         b_rows.stride(), s, y, offsets, SCALING, row_index,
                                         expert_bias)
            return
        lora_grouped.grouped_shrink(x, lora_a, (rank * a[0], a[0], a[1]), s, offsets, row_index)
        lora_grouped.grouped_gemm(x, w, w_strides, s, b_rows, b_rows.stride(), y, offsets, SCALING,
                                  row_index, expert_bias)

    def backward():
        peft_b = (1, rank * experts, experts)  # B_e's (n, rank) in PEFT's N x (r E)
        w_t = (w_strides[0], w_strides[2], w_strides[1])
        fused = fused_output_grad
        if fused is None:  # as lora_grouped_backward chooses
            fused = lora_grouped.fuses_output_grad(dy.device, dtype, rank, k, n)
        if fused:
            lora_grouped.grouped_grad_input(dy, w, w_t, s, b_rows, b_rows.stride(), lora_a,
                                            (rank * a[0], a[1], a[0]), grad_x, s, grad_b, peft_b,
                                            offsets, SCALING)
        else:
            config = lora_grouped.output_grad_config(_common.target(dy.device), dtype)
            chunks = -(-n // config["BLOCK_N"])
            torch_op(0, rows * rank * (4 * chunks + s.element_size()), "sum of the dS partials")
            lora_grouped.grouped_output_grad(dy, s, b_rows, b_rows.stride(), grad_b, peft_b, s,
                                             offsets, SCALING)
            lora_grouped.grouped_gemm(dy, w, w_t, s, lora_a, (rank * a[0], a[1], a[0]), grad_x,
                                      offsets, 1.0)
        lora_grouped.grouped_weight_grad(s, x, lora_a, (rank * k, k, 1), offsets, 1.0, row_index)
    for call in (forward, backward):
        call.model_ints = grouped_model_ints(rows, experts)
    return {"forward": forward, "backward": backward}


def grouped_model_ints(rows, experts):
    """What the model reads of a grouped launch's offsets (``Launch.model_ints``): the experts
    and each one's rows (spread evenly), for the reductions' trip counts and the row tiles that
    have rows (``model.working_ctas``)."""
    return {"rows_per_expert": -(-rows // experts), "experts": experts}


def train_call(calls):
    """``calls``' forward, then its backward, as one call (with the backward's ``model_ints``)."""
    def train():
        calls["forward"]()
        calls["backward"]()
    train.model_ints = getattr(calls["backward"], "model_ints", None)
    return train


def grouped_gemm_call(rows, k, n, experts, dtype, transposed=False, bias=False):
    """The same grouped GEMM without LoRA, forward and dX (frozen experts: no weight gradient):
    lora_grouped's GEMM at rank 0, whose LoRA loop runs no iteration. Issue 27's baseline.
    ``transposed``: the experts stored E x K x N (gpt-oss), as ``lora_grouped_calls``; ``bias``:
    the forward adds the experts' biases in its epilogue, as lowrank's LoRA forward does (the
    baseline is the same GEMM: a bias added by torch ops would flatter the LoRA rows).
    The empty adapters are rank-0 slices of rank-``RANK`` ones, so they keep LoRA's strides: with
    a 0-wide tensor's own strides (all 1) the JIT makes them constants, the idle rank loop
    compiles to element loads and outgrows the K loop, and the report read it as the hot loop
    (sm_89: half the K loop's flops per trip, so a baseline forward too fast by a third)."""
    offsets = torch.linspace(0, rows, experts + 1).to(torch.int32)
    x, dy, y = empty(rows, k, dtype=dtype), empty(rows, n, dtype=dtype), empty(rows, n, dtype=dtype)
    w = empty(experts, *((k, n) if transposed else (n, k)), dtype=dtype)
    s = empty(rows, 0, dtype=dtype)
    w_strides = (w.stride(0), w.stride(2), w.stride(1)) if transposed else w.stride()
    b_rows = empty(experts, n, RANK, dtype=dtype)[:, :, :0]
    lora_a = empty(experts, RANK, k)[:, :0]
    expert_bias = empty(experts, n, dtype=dtype) if bias else None

    def forward_and_grad_input():
        lora_grouped.grouped_gemm(x, w, w_strides, s, b_rows, b_rows.stride(), y, offsets, SCALING,
                                  bias=expert_bias)
        lora_grouped.grouped_gemm(dy, w, (w_strides[0], w_strides[2], w_strides[1]), s, lora_a,
                                  (lora_a.stride(0), lora_a.stride(2), lora_a.stride(1)), x,
                                  offsets, 1.0)
    forward_and_grad_input.model_ints = grouped_model_ints(rows, experts)
    return forward_and_grad_input


def peft_param_wrapper_ops(rows, k, n, experts, rank=RANK, itemsize=2):
    """PEFT's ``ParamWrapper`` path for one expert projection, forward + backward, as the torch ops
    it runs: [(op, flops, bytes)]. Read from peft 0.21.2 (``ParamWrapper._activate_lora``: one
    adapter on a bf16 stack takes ``_LoraFactorsProxy``) under transformers 5.24's grouped_mm
    experts forward:

    - forward: W' = W + s B_e A_e for every expert (``torch.baddbmm`` over the E x N x K stack: W
      read, W' written whole), then the grouped GEMM x W'_e^T;
    - backward: dX = dY W'_e, and because W' requires grad through A and B, its whole gradient
      dW'_e = dY_e^T x_e, then the baddbmm's backward: dB_e = s dW'_e A_e^T and dA_e = s B_e^T
      dW'_e, two bmm that each read the stack's gradient.

    Left out: the adapters' casts to and from the stack's dtype (r (N + K) E values each)."""
    stack = experts * n * k * itemsize
    x, y = rows * k * itemsize, rows * n * itemsize
    gemm, merge = 2 * rows * n * k, 2 * experts * n * k * rank
    return [("baddbmm W + s B A", merge, 2 * stack), ("grouped_mm x W'^T", gemm, x + stack + y),
            ("grouped_mm dY W'", gemm, y + stack + x), ("grouped_mm dY^T x", gemm, y + x + stack),
            ("bmm s dW' A^T", merge, stack), ("bmm s B^T dW'", merge, stack)]


def peft_param_wrapper_call(rows, k, n, experts):
    """PEFT's ``ParamWrapper`` forward + backward as modelled torch ops (``torch_op`` each: the
    slower of its flops at the cuBLAS rate and its bytes at copy bandwidth, as if each op reached
    both rates, a bound in PEFT's favour)."""
    def peft_train():
        for op, flops, nbytes in peft_param_wrapper_ops(rows, k, n, experts):
            torch_op(flops, nbytes, op)
    return peft_train


def gated_activation_call(m, n, dtype, activation):
    """The fused MLP's elementwise steps: act(g) * u forward, and its backward."""
    g, u, h, dh, dg, du = (empty(m, n, dtype=dtype) for _ in range(6))
    return lambda: (gated_activation.gated_forward(g, u, h, activation),
                    gated_activation.gated_backward(dh, g, u, h, dg, du, activation))


def run_calls(calls, target, every_config=True, modelled=None):
    """Every launch of ``calls`` ({case: fn}) configured for ``target``, in order: each config of
    an autotuned launch, or only the first of its list unless ``every_config``. ``modelled``: a
    list that gets the calls' ``torch_gemm`` records."""
    launches = []
    for case, call in calls.items():
        with capture(case, launches, target, every_config, getattr(call, "model_ints", None),
                     modelled):
            call()
    return launches


# The benchmark cases (bench/lora_linear.py, ia3_linear.py, merge.py, nf4_dequantize.py, dora_linear.py): bf16, the
# Llama-3-8B MLP projection, every weight kind. Shapes: (M, K, N) for the linear ops, (N, K) else.
TRAIN_SHAPE = (4096, 4096, 14336)
DECODE_ROWS = (1, 16)
WEIGHT_SHAPE = (14336, 4096)
MOE_PROJECTIONS = {"gate_up": (2048, 2 * 768), "down": (768, 2048)}  # (K, N), Qwen3-30B-A3B
MOE_TOP_K = 8
MOE_ROWS, MOE_EXPERTS = 4096 * MOE_TOP_K, 128  # 4096 tokens x top-8, Qwen3-30B-A3B's experts


def weight_bytes(kind, n, k):
    """Bytes of an n x k bf16 weight as stored: dense, or packed NF4 with its absmax."""
    blocks = n * k // BLOCKSIZE
    return {"dense": 2 * n * k, "nf4": n * k // 2 + 4 * blocks,
            "nf4-nested": n * k // 2 + blocks + 4 * (blocks // NESTED_BLOCKSIZE)}[kind]


def bench_cases():
    """{case: (fn, ideal)}. A case name is "op kind shape[ detail]", as the report shows it; its
    ideal is what the model compares it with: ("gemm", flops of its products) at cuBLAS's rate, or
    ("copy", bytes it must read and write) at copy bandwidth."""
    bf16 = torch.bfloat16
    m, k, n = TRAIN_SHAPE
    mkn = f"{m}x{k}x{n}"
    cases = {}
    for kind in WEIGHT_KINDS:
        lora = lora_linear_calls(m, k, n, kind, bf16)
        # Forward: x W^T, the shrink and the expand; backward: dY W, dS A and dS^T x.
        cases[f"lora_linear_forward {kind} {mkn}"] = (
            lora["forward"], ("gemm", 2 * m * n * k + 2 * m * RANK * (k + n)))
        cases[f"lora_linear_backward {kind} {mkn}"] = (
            lora["backward"], ("gemm", 2 * m * n * k + 4 * m * k * RANK))
        # The same on the cublas route; then forward + backward on each route against two GEMMs
        # without LoRA (x W^T and dY W: issue 17's <= 1.15x). ``model.chosen_routes`` adds the
        # cheaper route of each as "route=chosen".
        cublas = lora_cublas_calls(m, k, n, kind, bf16)
        cases[f"lora_linear_forward {kind} {mkn} route=cublas"] = (
            cublas["forward"], ("gemm", 2 * m * n * k + 2 * m * RANK * (k + n)))
        cases[f"lora_linear_backward {kind} {mkn} route=cublas"] = (
            cublas["backward"], ("gemm", 2 * m * n * k + 4 * m * k * RANK))
        cases[f"lora_linear_train {kind} {mkn}"] = (train_call(lora), ("gemm", 4 * m * n * k))
        cases[f"lora_linear_train {kind} {mkn} route=cublas"] = (train_call(cublas),
                                                                 ("gemm", 4 * m * n * k))
        # DoRA's forward (training: the product for dm stored by the epilogue), LoRA's products.
        cases[f"dora_linear_forward {kind} {mkn}"] = (
            dora_forward_call(m, k, n, kind, bf16),
            ("gemm", 2 * m * n * k + 2 * m * RANK * (k + n)))
        for rows in DECODE_ROWS:
            cases[f"lora_linear_decode {kind} {rows}x{k}x{n}"] = (
                lora_linear_calls(rows, k, n, kind, bf16)["forward"],
                ("copy", weight_bytes(kind, n, k) + 2 * rows * (k + n)))
        # A decode batch of 16 rows over 16 adapters: the weight read once, each adapter's A and B.
        cases[f"lora_mixed {kind} 16x{k}x{n} adapters=16"] = (
            lora_mixed_call(16, k, n, kind, bf16, 16),
            ("copy", weight_bytes(kind, n, k) + 2 * 16 * RANK * (k + n) + 2 * 16 * (k + n)))
        # Prefill over 16 adapters (256 rows each): the segmented path, a GEMM as the forward's.
        cases[f"lora_mixed {kind} {mkn} adapters=16"] = (
            lora_mixed_call(m, k, n, kind, bf16, 16), ("gemm", 2 * m * n * k + 2 * m * RANK * (k + n)))
        for feedforward in (False, True):
            form = "feedforward" if feedforward else "output"
            ia3 = ia3_linear_calls(m, k, n, kind, bf16, feedforward)
            cases[f"ia3_linear_forward {kind} {mkn} {form}"] = (ia3["forward"], ("gemm", 2 * m * n * k))
            # Backward: dX, and in the output form the recomputed x W^T for dl.
            cases[f"ia3_linear_backward {kind} {mkn} {form}"] = (
                ia3["backward"], ("gemm", 2 * m * n * k * (1 if feedforward else 2)))
    cases.update(bnb_peft_cases(m, k, n))  # the baseline of issue 17's ">= 1.4x" (model only)
    wn, wk = WEIGHT_SHAPE
    for kind in WEIGHT_KINDS:  # DoRA's norm: the stored weight read once
        cases[f"dora_norm {kind} {wn}x{wk}"] = (dora_norm_call(wn, wk, kind, bf16),
                                               ("copy", weight_bytes(kind, wn, wk)))
    dense = weight_bytes("dense", wn, wk)
    for kind in ("nf4", "nf4-nested"):
        packed = weight_bytes(kind, wn, wk)
        cases[f"nf4_dequantize {kind} {wn}x{wk}"] = (dequantize_call(wn, wk, kind, bf16),
                                                    ("copy", packed + dense))
        for op in ("lora", "ia3"):
            cases[f"merge_{op} {kind} {wn}x{wk} to-nf4"] = (
                merge_call(op, wn, wk, kind, bf16, "nf4"), ("copy", 2 * packed))
        cases[f"merge_lora {kind} {wn}x{wk} to-bf16"] = (
            merge_call("lora", wn, wk, kind, bf16, bf16), ("copy", packed + dense))
    cases[f"merge_lora dense {wn}x{wk} in-place"] = (
        merge_call("lora", wn, wk, "dense", bf16, bf16), ("copy", 2 * dense))
    cases[f"nf4_quantize dense {wn}x{wk}"] = (quantize_call(wn, wk, bf16, BLOCKSIZE),
                                              ("copy", dense + weight_bytes("nf4", wn, wk)))
    # The MoE layers of issue 27 (``moe_layer_cases``): Qwen3-30B-A3B's, then gpt-oss-20b's.
    cases.update(moe_layer_cases(MOE_ROWS, MOE_EXPERTS, MOE_PROJECTIONS, MOE_TOP_K))
    cases.update(moe_layer_cases(GPT_OSS_ROWS, GPT_OSS_EXPERTS, GPT_OSS_PROJECTIONS, GPT_OSS_TOP_K,
                                 transposed=True, biases=True))
    return cases


def bench_calls():
    return {case: call for case, (call, _) in bench_cases().items()}


def bench_launches(target, every_config=True):
    return run_calls(bench_calls(), target, every_config)


# Coverage: every argument that selects a different compiled kernel, each of its values built at
# least once per architecture. ALIGNED sizes are divisible by 16 (the common case: the JIT adds
# divisibility attributes); RAGGED ones are not.
#
# Not the full product of those arguments (CI time). The rule: a launch's *form* changes its hot
# loop, tiles or config (operand dtype, weight kind, shape class, IA3's feed-forward or output
# form, a grouped GEMM's expert layout, a block size); its *optional features* (bias, dropout)
# only add code to a form. Built:
# - bf16, the dtype models train in: every form; the plain NF4 weight on the aligned shapes only
#   (nf4-nested is the same read plus the absmax's decode, so it stands for it elsewhere).
# - fp32 (its own tiles, IEEE dot): the dense and nested weights on the aligned shapes.
# - fp16 (bf16's tiles and configs, only the element type differs): the nested weight on the
#   aligned shapes (where fp16 and bf16 builds both existed, registers differed by at most 8 and
#   shared memory not at all, so no gate read them apart).
# - Optional features: all on in every form (its heaviest build, which the resource, spill and
#   CTA gates read), all off on bf16's dense weight on the aligned shapes (each flag's False
#   branch). A form with some on is code between those two.
# When this rule came in (479 builds per architecture down to 302), every dropped build passed the
# gates, and all but 22 to 27 per architecture had registers and shared memory at most those of a
# kept build of its kernel, operand dtype (bf16 for fp16) and shape class; the others, fp32
# one-row decodes and ragged backward builds without dropout mostly, are within the limits by a
# margin, or exempt from the spill gate (tests/test_compile_gpu.py: spilling_today).
ALIGNED = (64, 128, 96)
RAGGED = (37, 72, 50)
DECODE = ((1, 128, 96), (16, 128, 96))  # one row (the JIT makes M a constant), a full M block
DECODE_RAGGED = (3, 72, 50)
# The NF4 split-K partial GEMMs' forms by K (the decode GEMV's, the mixed decode's: tile, stages
# and SCALE_GROUP follow K, kernels/lora_linear_decode.py's ``decode_tile`` and
# ``partial_stages``), beyond K = 128 (runs of one absmax of 64, pipelined) and K = 72 (runs of
# 8, unpipelined) above: odd K (decoded element by element), runs of 2 (the most absmax gathers
# of a tile) and of 32 (the shortest pipelined runs), and runs of 128 (blocksize 128: one absmax
# per row of a tile). Runs of 4 and 16 are between these. Nested, in bf16, with every feature of
# the decode kernel on (its heaviest build); the plain weight at odd K.
DECODE_K_FORMS = ((73, BLOCKSIZE), (74, BLOCKSIZE), (96, BLOCKSIZE), (128, 128))


def weight_kinds(dtype):
    """The weight kinds the forms of ``dtype`` are built over (the rule above)."""
    return {torch.bfloat16: WEIGHT_KINDS, torch.float32: ("dense", "nf4-nested"),
            torch.float16: ("nf4-nested",)}[dtype]


def optional_features(dtype, kind, shape, all_off, all_on):
    """The optional feature settings a form is built with (the rule above)."""
    aligned = shape not in (RAGGED, DECODE_RAGGED)
    return (all_off, all_on) if (dtype, kind, aligned) == (torch.bfloat16, "dense", True) else (all_on,)


def coverage_calls():
    calls = {}
    for dtype in DTYPES:
        t = str(dtype).removeprefix("torch.")
        bf16 = dtype == torch.bfloat16
        for kind in weight_kinds(dtype):
            every_shape = bf16 and kind != "nf4"
            for shape in (ALIGNED, DECODE[1]) + ((DECODE[0], RAGGED, DECODE_RAGGED) if every_shape else ()):
                for dropout, bias in optional_features(dtype, kind, shape, (0.0, False), (0.1, True)):
                    for step, call in lora_linear_calls(*shape, kind, dtype, dropout, bias).items():
                        calls[f"lora_linear_{step} {t} {kind} {shape} p={dropout} bias={bias}"] = call
                if dtype != torch.float32:  # fp32 adapters: the split fp32 branch
                    for dropout in (0.0, 0.1):
                        for step, call in lora_linear_calls(*shape, kind, dtype, dropout,
                                                            branch=torch.float32).items():
                            calls[f"lora_linear_{step} {t} {kind} {shape} p={dropout} "
                                  "branch=float32"] = call
            gemm_shapes = (ALIGNED, RAGGED) if every_shape else (ALIGNED,)
            for shape in gemm_shapes:
                for feedforward, bias in itertools.product(
                        (False, True), optional_features(dtype, kind, shape, False, True)):
                    for step, call in ia3_linear_calls(*shape, kind, dtype, feedforward, bias).items():
                        name = f"ia3_linear_{step} {t} {kind} {shape} ff={feedforward} bias={bias}"
                        calls[name] = call
                calls[f"dora_norm {t} {kind} {shape}"] = dora_norm_call(*shape[1:], kind, dtype)
            # DoRA's epilogue forms (training, inference, dropout) on one weight kind, on bf16's
            # aligned shape; the training form elsewhere (the epilogue follows the K loop, which
            # the LoRA forward's coverage builds).
            for shape in gemm_shapes if kind == "nf4-nested" else ():
                forms = ((0.0, True), (0.0, False), (0.1, True))
                for dropout, keep_product in forms if bf16 and shape == ALIGNED else forms[:1]:
                    calls[f"dora_linear_forward {t} {kind} {shape} p={dropout} "
                          f"product={keep_product}"] = dora_forward_call(
                              *shape, kind, dtype, dropout, keep_product, bias=True)
            # Eight adapters: too few rows per adapter for segments (the per-row path); two: the
            # segmented path (lora_mixed.segmented).
            for shape, bias in ((DECODE[1], False), (ALIGNED, True)) + (
                    ((DECODE_RAGGED, True),) if every_shape else ()):
                calls[f"lora_mixed {t} {kind} {shape} bias={bias}"] = lora_mixed_call(
                    *shape, kind, dtype, 8, bias)
            for shape in gemm_shapes:
                for bias in optional_features(dtype, kind, shape, False, True):
                    calls[f"lora_mixed {t} {kind} {shape} bias={bias} segmented"] = lora_mixed_call(
                        *shape, kind, dtype, 2, bias)
            if kind != "dense":
                calls[f"nf4_dequantize {t} {kind}"] = dequantize_call(96, 128, kind, dtype)
        # The experts' two layouts in bf16; the other dtypes with PEFT's (not transposed).
        # The expert bias (the forward's epilogue, gpt-oss's) on in gpt-oss's layout and in both
        # forward forms below, off in the others.
        for shape, transposed in ((ALIGNED, False),) + (((ALIGNED, True), (RAGGED, False)) if bf16 else ()):
            for step, call in lora_grouped_calls(*shape, 4, dtype, transposed,
                                                 bias=transposed).items():
                calls[f"lora_grouped_{step} {t} {shape} transposed={transposed}"] = call
        for step, call in lora_grouped_calls(*ALIGNED, 4, dtype, top_k=2).items():  # row_index
            calls[f"lora_grouped_{step} {t} {ALIGNED} gathered"] = call
        for fused in (False, True):  # S, dS and dB in their own passes or inside the GEMMs
            fused_calls = lora_grouped_calls(*ALIGNED, 4, dtype, fused_shrink=fused,
                                             fused_output_grad=fused, bias=True)
            for step, call in fused_calls.items():
                calls[f"lora_grouped_{step} {t} {ALIGNED} fused={fused}"] = call
        for shape in (ALIGNED, RAGGED) if bf16 else (ALIGNED,):
            for shifted, column_sums in ((False, True), (False, False), (True, True)):
                calls[f"dora_grad_scale {t} {shape} shifted={shifted} sums={column_sums}"] = \
                    dora_grad_scale_call(shape[0], shape[2], dtype, shifted, column_sums)
        for activation in gated_activation.ACTIVATIONS:
            for shape in (ALIGNED[:2], RAGGED[:2]):
                calls[f"gated_activation {t} {activation} {shape}"] = gated_activation_call(
                    *shape, dtype, activation)
        for blocksize in NF4_BLOCKSIZES if bf16 else (BLOCKSIZE,):  # block sizes: forms of bf16's
            calls[f"nf4_quantize {t} blocksize={blocksize}"] = quantize_call(96, 128, dtype, blocksize)
        # Dense weights merge in place, or into the next dtype (each dtype read and written once).
        for out in (dtype, DTYPES[(DTYPES.index(dtype) + 1) % len(DTYPES)]):
            calls.update(merge_calls(f"{t} dense to {out}", "dense", dtype, out, unmerge=out == dtype))
    for kind in ("nf4", "nf4-nested"):  # the packed weight has no dtype: into each dense dtype, or NF4
        for out in DTYPES:
            calls.update(merge_calls(f"{kind} to {out}", kind, None, out))
        # The block sizes requantized into: forms of the nested weight's merges (the heavier read).
        for blocksize in NF4_BLOCKSIZES if kind == "nf4-nested" else (BLOCKSIZE,):
            calls.update(merge_calls(f"{kind} to nf4 blocksize={blocksize}", kind, None, "nf4",
                                     blocksize=blocksize))
    for k, blocksize in DECODE_K_FORMS:
        shape = (DECODE_RAGGED[0], k, DECODE_RAGGED[2])
        for kind in ("nf4-nested", "nf4") if k % 2 else ("nf4-nested",):
            name = f"bfloat16 {kind} {shape} blocksize={blocksize}"
            calls[f"lora_linear_forward {name} p=0.1 bias=True branch=float32"] = lora_linear_calls(
                *shape, kind, torch.bfloat16, 0.1, True, torch.float32, blocksize)["forward"]
        calls[f"lora_mixed bfloat16 nf4-nested {shape} blocksize={blocksize} bias=True"] = \
            lora_mixed_call(*shape, "nf4-nested", torch.bfloat16, 8, True, blocksize)
    calls["lora_dropout_mask"] = lambda: lora_linear.dropout_mask(
        seed(), empty(64, 128, dtype=torch.int8), 0.1)
    return calls


def merge_calls(name, kind, dtype, out, unmerge=False, blocksize=BLOCKSIZE):
    """Both merge kernels (LoRA, IA3) on a 96 x 128 weight. IA3's two forms read l with strides
    (1, 0) or (0, 1), which the JIT specializes apart: both, except across the blocksize sweep;
    the IA3 unmerge too if ``unmerge`` (it runs in place on dense weights only)."""
    calls = {f"merge_lora {name}": merge_call("lora", 96, 128, kind, dtype, out, blocksize=blocksize)}
    for feedforward in (False, True) if blocksize == BLOCKSIZE else (False,):
        for undo in (False, True) if unmerge else (False,):
            calls[f"{'un' if undo else ''}merge_ia3 {name} ff={feedforward}"] = merge_call(
                "ia3", 96, 128, kind, dtype, out, undo, feedforward, blocksize)
    return calls


def coverage_launches(target, every_config=True):
    return run_calls(coverage_calls(), target, every_config)


# bitsandbytes + PEFT's formula (issue 17's ">= 1.4x" baseline): PEFT's Linear4bit over
# bitsandbytes' matmul_4bit, as the torch ops and kernels they launch, modelled like the cublas
# route's torch ops (``torch_op``: flops at the cuBLAS rate or bytes at copy bandwidth, the slower).
# Read from bitsandbytes 0.50.2 (autograd/_functions.py: matmul_4bit, MatMul4Bit; functional.py:
# dequantize_4bit; backends/cuda/ops.py: gemm_4bit's dispatch) and peft 0.21.2
# (tuners/lora/bnb.py: Linear4bit.forward). Every one of their kernels is taken at the slower of
# those two rates, as if it reached both: a bound in their favour. That includes bitsandbytes' own
# kernels (dequantize_4bit, the nested absmax's dequantize_blockwise, the fused gemm_4bit), which
# no build shows: at copy bandwidth they are as fast as any kernel can be, generous to
# bitsandbytes. The model has no launch overhead, which favours their many small launches too.

BNB_FUSED_MAX_M = 1536  # gemm_4bit on CUDA: above it, always dequantize + F.linear
BNB_FUSED_MIN_M = 4  # and at or below it, always its fused kernel (_GEMM_4BIT_CUSTOM_FLOOR_M)
BNB_NESTED_BLOCKSIZE = 256  # the nested absmax's blocksize (the only one gemm_4bit takes)


def bnb_fused_gemm(m, k, n, multiprocessors, blocksize=BLOCKSIZE):
    """Whether bitsandbytes' gemm_4bit (bf16 x, NF4 weight N x K) runs its fused kernel at ``m``
    rows on a GPU with ``multiprocessors`` SMs (sm_80 to sm_90), else dequantize + F.linear.
    Between the two bounds its per-architecture heuristic (``_gemm_4bit_use_custom_cuda``)
    decides; read here only where it is the same on sm_80, 86, 89 and 90: up to 16 rows with a
    weight of at least 4 Mi elements whose 64-row blocks of W fill the SMs (each of them keeps the
    kernel to 32 rows or more there). Other shapes in between are refused, not guessed."""
    if m > BNB_FUSED_MAX_M or k % blocksize:  # a ragged K falls back too (with a warning)
        return False
    if m <= BNB_FUSED_MIN_M or (m <= 16 and n * k >= 4 * 1024 * 1024
                                and -(-n // 64) >= multiprocessors):
        return True
    raise ValueError(f"bitsandbytes' gemm_4bit route at {m} x {k} x {n} on {multiprocessors} SMs "
                     "depends on its per-architecture heuristic, which is not modelled here")


def bnb_peft_ops(m, k, n, kind, multiprocessors, backward, rank=RANK):
    """PEFT's LoRA over a bitsandbytes NF4 ``Linear4bit`` (``kind`` "nf4" or "nf4-nested"), bf16 x
    and adapters, no bias, lora_dropout 0, no autocast: [(op, flops, bytes)] of one forward, and
    with ``backward`` of its backward (gradients of x, A and B), in launch order:

    - bitsandbytes' Linear4bit: x is already in its compute dtype (no cast), ``matmul_4bit``'s
      ``gemm_4bit``: its fused kernel (``bnb_fused_gemm``), or its fallback: a nested absmax
      decoded first (``dequantize_blockwise`` into fp32, then ``+ offset``), ``dequantize_4bit``
      into a new bf16 W, ``F.linear(x, W)``;
    - PEFT: ``result.clone()`` ("defensively", its comment says), ``lora_dropout`` is
      ``nn.Identity`` at p = 0 (nothing runs), ``lora_A(x)`` and ``lora_B(S)`` (F.linear, one GEMM
      each), ``* scaling``, ``result + output``; x and the output are in the adapters' dtype
      already, so ``_cast_input_dtype`` and ``.to(expected_dtype)`` copy nothing;
    - backward (autograd, reverse order): the add and the clone pass dY on; ``* scaling`` again
      on dY, then lora_B's and lora_A's mm pairs (dS = dP B, dB = dP^T S, dS A, dA = dS^T x);
      MatMul4Bit.backward dequantizes W again (``F.dequantize_4bit``: for a nested absmax the
      same absmax decode, its ``+= offset`` in place), then dY W (its ``.to(dY.dtype)``: no copy,
      W is bf16); autograd sums x's two gradients.

    Bytes count each operand read and each output written once (bf16 tensors, fp32 absmax)."""
    nested = kind == "nf4-nested"
    blocks = -(-n * k // BLOCKSIZE)
    x, y, w, s = 2 * m * k, 2 * m * n, 2 * n * k, 2 * m * rank
    a, b, packed = 2 * rank * k, 2 * n * rank, (n * k + 1) // 2
    nested_blocks = -(-blocks // BNB_NESTED_BLOCKSIZE)
    code_and_absmax = blocks + 4 * nested_blocks + 4 * 256  # uint8 absmax, its code and absmax
    stored_absmax = code_and_absmax + 4 if nested else 4 * blocks  # (+ the fp32 offset)
    absmax_decode = [("dequantize_blockwise absmax", 0, code_and_absmax + 4 * blocks),
                     ("absmax + offset", 0, 8 * blocks + 4)] if nested else []
    dequantize = [*absmax_decode, ("dequantize_4bit W", 0, packed + 4 * blocks + w)]
    if bnb_fused_gemm(m, k, n, multiprocessors):
        ops = [("gemm_4bit x W^T (fused)", 2 * m * n * k, packed + stored_absmax + x + y)]
    else:
        ops = [*dequantize, ("F.linear x W^T", 2 * m * n * k, x + w + y)]
    ops += [("result.clone()", 0, 2 * y), ("lora_A: S = x A^T", 2 * m * rank * k, x + a + s),
            ("lora_B: S B^T", 2 * m * n * rank, s + b + y), ("* scaling", 0, 2 * y),
            ("result + output", 0, 3 * y)]
    if backward:
        ops += [("dY * scaling", 0, 2 * y), ("dS = dP B", 2 * m * rank * n, y + b + s),
                ("dB = dP^T S", 2 * n * rank * m, y + s + b), ("dS A", 2 * m * k * rank, s + a + x),
                ("dA = dS^T x", 2 * rank * k * m, s + x + a), *dequantize,
                ("dY W", 2 * m * k * n, y + w + x), ("dX + dS A (autograd's sum)", 0, 3 * x)]
    return ops


def bnb_peft_call(m, k, n, kind, backward):
    """bitsandbytes + PEFT's forward (and backward) as modelled torch ops (``bnb_peft_ops``), for
    the GPU a ``capture`` configures for (its SM count decides gemm_4bit's route)."""
    def bnb_peft():
        multiprocessors = _common.target(torch.device("cpu")).multiprocessors  # the captured GPU's
        for op, flops, nbytes in bnb_peft_ops(m, k, n, kind, multiprocessors, backward):
            torch_op(flops, nbytes, op)
    return bnb_peft


def bnb_peft_cases(m, k, n):
    """{case: (fn, ideal)}: bitsandbytes + PEFT beside the LoRA linear's bench cases, named as
    them with ``bnb_peft_`` for ``lora_linear_`` (``model.versus`` pairs them), with the same
    ideals so the ratios compare: forward and forward + backward at M = ``m``, the decode rows."""
    cases = {}
    for kind in ("nf4", "nf4-nested"):
        cases[f"bnb_peft_forward {kind} {m}x{k}x{n}"] = (
            bnb_peft_call(m, k, n, kind, False), ("gemm", 2 * m * n * k + 2 * m * RANK * (k + n)))
        cases[f"bnb_peft_train {kind} {m}x{k}x{n}"] = (bnb_peft_call(m, k, n, kind, True),
                                                       ("gemm", 4 * m * n * k))
        for rows in DECODE_ROWS:
            cases[f"bnb_peft_decode {kind} {rows}x{k}x{n}"] = (
                bnb_peft_call(rows, k, n, kind, False),
                ("copy", weight_bytes(kind, n, k) + 2 * rows * (k + n)))
    return cases


# gpt-oss-20b's MoE layer (issue 27), beside Qwen3-30B-A3B's in ``bench_cases``: 4096 tokens x
# top-4 rows over 32 experts, hidden and intermediate sizes 2880. Its experts (transformers'
# ``GptOssExperts``) are stored transposed, E x in x out, and have biases, added after each
# projection: lowrank's ``experts_forward`` adds them in the grouped GEMM's epilogue (the E x N
# table read by each output tile), and so does the baseline, the same grouped GEMM without LoRA;
# transformers' grouped_mm forward (the one PEFT's ``ParamWrapper`` runs) gathers
# ``bias[expert_ids]`` (rows x N) and adds it as torch ops. The biases are frozen, so the backward
# has no bias op. Its own gate (clamped, ``_apply_gate``) lies between the projections, as Qwen's
# activation does, in no row.
GPT_OSS_PROJECTIONS = {"gate_up": (2880, 2 * 2880), "down": (2880, 2880)}  # (K, N)
GPT_OSS_TOP_K, GPT_OSS_EXPERTS = 4, 32
GPT_OSS_ROWS = 4096 * GPT_OSS_TOP_K


def expert_bias_add(rows, n, itemsize=2):
    """The expert biases after a projection, as torch runs them (modelled, ``torch_op``): the
    gather ``bias[expert_ids]`` (the rows' int64 expert ids read, rows x N written; the E x N
    table stays in L2) and the add (the projection's output and the gathered rows read, the sum
    written)."""
    torch_op(0, 8 * rows + itemsize * rows * n, "bias[expert_ids]")
    torch_op(0, 3 * itemsize * rows * n, "+ bias")


def with_expert_bias(call, rows, n):
    """``call``, then ``expert_bias_add``; with ``call``'s model_ints."""
    def biased():
        call()
        expert_bias_add(rows, n)
    biased.model_ints = getattr(call, "model_ints", None)
    return biased


def moe_layer_cases(rows, experts, projections, top_k, transposed=False, biases=False):
    """{case: (fn, ideal)}: one MoE layer's expert projections (``projections``: name -> (K, N)),
    ``rows`` = tokens x ``top_k`` spread evenly over ``experts`` (the backward's dA / dB
    reductions loop over each expert's rows: the model reads them from the calls' model_ints).
    Per projection: lowrank's grouped LoRA forward, backward (dY W_e, dS A_e and dS^T x, as the
    dense one) and both; the same grouped GEMM without LoRA and PEFT's ``ParamWrapper``, fwd+bwd,
    each against the flops without LoRA, so the three rows' times and ratios compare (issue 27's
    targets: <= 1.15x the first, >= 2x faster than the second). ``transposed``: the experts stored
    E x in x out; ``biases``: every forward adds the expert biases, lowrank's and the grouped
    GEMM without LoRA in the GEMM's epilogue, PEFT's as torch ops (``with_expert_bias``)."""
    bf16, cases = torch.bfloat16, {}
    for projection, (k, n) in projections.items():
        def biased(call):
            return with_expert_bias(call, rows, n) if biases else call
        # gate_up gathers its rows from the tokens in the kernels (experts_forward's first
        # projection); down reads the activations, already in sorted order.
        grouped = lora_grouped_calls(rows, k, n, experts, bf16, transposed,
                                     top_k=top_k if projection == "gate_up" else None,
                                     bias=biases)
        shape = f"{rows}x{k}x{n} E={experts} {projection}"
        cases[f"lora_grouped_forward dense {shape}"] = (
            grouped["forward"], ("gemm", 2 * rows * n * k + 2 * rows * RANK * (k + n)))
        cases[f"lora_grouped_backward dense {shape}"] = (
            grouped["backward"], ("gemm", 2 * rows * n * k + 4 * rows * k * RANK))
        cases[f"lora_grouped_train dense {shape}"] = (train_call(grouped),
                                                       ("gemm", 4 * rows * n * k))
        cases[f"grouped_gemm_train dense {shape} rank=0"] = (
            grouped_gemm_call(rows, k, n, experts, bf16, transposed, bias=biases),
            ("gemm", 4 * rows * n * k))
        cases[f"peft_param_wrapper_train dense {shape}"] = (
            biased(peft_param_wrapper_call(rows, k, n, experts)), ("gemm", 4 * rows * n * k))
    return cases
