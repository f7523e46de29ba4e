"""Plain-PyTorch versions of every lowrank op, written to be read.

They are the CPU fallback, the oracle of the tests and the baseline of the benchmarks, so each one
gives the same results as its kernels (bit for bit where the op is exact, like NF4).
"""

import torch
import torch.nn.functional as F

from lowrank._lora_args import (check_bias, check_dora_args, check_ia3_args, check_ia3_vector,
                                check_lora_args, check_lora_factors, check_lora_mixed_args,
                                check_merge_args, check_weight)
from lowrank._quant_state import (FLOAT_DTYPES, NESTED_BLOCKSIZE, build_quant_state, check_quant_state,
                                  check_quantize_args, code_books, read_nf4)
from lowrank.lora_projection import check_activation, check_lora_mlp_args, check_lora_qkv_args


def _scale_blockwise(x, blocksize):
    """Split flat fp32 ``x`` into blocks; return (x / absmax of its block, absmax per block).

    bitsandbytes multiplies full blocks by the rounded reciprocal of absmax but divides the ragged
    last block by it; the two can differ in the last bit, and that bit can change a code. It also
    stores the ragged block's absmax clamped to 1e-38 (seen only when that block is all zeros).
    """
    full = x.numel() - x.numel() % blocksize
    blocks = x[:full].view(-1, blocksize)
    tail = x[full:]
    absmax = blocks.abs().amax(dim=1)
    safe = absmax.clamp(min=1e-38)  # an all-zero block scales to 0, not NaN
    scaled = (blocks * (1.0 / safe[:, None])).reshape(-1)
    if tail.numel():
        tail_absmax = tail.abs().amax().clamp(min=1e-38).reshape(1)
        absmax = torch.cat([absmax, tail_absmax])
        scaled = torch.cat([scaled, tail / tail_absmax])
    return scaled, absmax


def nf4_quantize(w, blocksize=64, double_quant=True, quant_storage=torch.uint8):
    """Same contract as ``lowrank.nf4.quantize``."""
    check_quantize_args(w, blocksize, quant_storage)
    _, nf4_bounds, _, nested_bounds = code_books(w.device)
    scaled, absmax = _scale_blockwise(w.reshape(-1).float(), blocksize)
    # An odd count leaves the last low nibble empty: it holds the code of 0.0.
    scaled = F.pad(scaled, (0, scaled.numel() % 2))
    codes = torch.bucketize(scaled, nf4_bounds).to(torch.uint8)  # index of the nearest NF4 value
    packed = (codes[0::2] << 4) | codes[1::2]
    packed = packed.view(quant_storage).unsqueeze(1)

    if not double_quant:
        return packed, build_quant_state(w.shape, w.dtype, blocksize, absmax)
    offset = absmax.mean()
    nested_scaled, nested_absmax = _scale_blockwise(absmax - offset, NESTED_BLOCKSIZE)
    absmax_codes = torch.bucketize(nested_scaled, nested_bounds).to(torch.uint8)
    return packed, build_quant_state(w.shape, w.dtype, blocksize, absmax_codes,
                                     nested=(offset, nested_absmax))


def nf4_absmax(quant_state):
    """fp32 absmax per block, decoding double quantization (two roundings, as bitsandbytes)."""
    if not quant_state.nested:
        return quant_state.absmax.float()
    state2 = quant_state.state2
    nested_scale = state2.absmax.repeat_interleave(state2.blocksize)[: quant_state.absmax.numel()]
    return state2.code[quant_state.absmax.long()] * nested_scale + quant_state.offset


def nf4_dequantize(packed, quant_state, dtype=None):
    """Same contract as ``lowrank.nf4.dequantize`` (without ``out``)."""
    packed, quant_state = read_nf4(packed, quant_state)
    packed_bytes = check_quant_state(packed, quant_state)
    nf4_code = code_books(packed_bytes.device)[0]
    n = quant_state.shape.numel()
    # Element 2i is the high nibble of byte i, element 2i + 1 the low nibble.
    codes = torch.stack([packed_bytes >> 4, packed_bytes & 0xF], dim=1).reshape(-1)[:n]
    scale = nf4_absmax(quant_state).repeat_interleave(quant_state.blocksize)[:n]
    values = nf4_code[codes.long()] * scale
    return values.to(dtype or quant_state.dtype).reshape(quant_state.shape)


def _weight_values(weight):
    """A FrozenWeight's values: the dense tensor itself (autograd reaches it), or NF4 in fp32."""
    if weight.quant_state is None:
        return weight.tensor
    return nf4_dequantize(weight.stored, weight.quant_state, torch.float32)


def branch_dtype(x_dtype, *adapters):
    """The dtype the LoRA branch (dropout(x) A^T B^T, and its gradients) computes in: fp32 where x
    is 16-bit and an adapter is fp32 (PEFT then computes the branch in fp32, and so does lowrank:
    the kernels near-fp32, see ``branch_dot`` in kernels/lora_linear.py), otherwise x's dtype."""
    if x_dtype.itemsize == 2 and any(a.dtype == torch.float32 for a in adapters):
        return torch.float32
    return x_dtype


def lora_linear(x, weight, lora_A, lora_B, scaling, bias=None, dropout=0.0, quant_state=None,
                dropout_mask=None):
    """Y = x W^T + b + scaling * dropout(x) A^T B^T: the base in x's dtype, the branch in
    ``branch_dtype`` (fp32 for fp32 adapters, as PEFT's), their sum rounded to x's dtype.

    ``weight``: dense (N x K), or packed NF4 with its ``quant_state`` (a Params4bit carries its
    own), or a ``FrozenWeight``. ``dropout_mask``: the keep mask (shape of x) to use instead of
    drawing one, so that a test can give the reference the mask the kernels drew
    (``lowrank.ops.lora_dropout_mask``).
    """
    weight = _weight_values(check_lora_args(x, weight, lora_A, lora_B, scaling, bias, dropout,
                                            quant_state, dtypes=FLOAT_DTYPES + (torch.float64,)))
    branch = branch_dtype(x.dtype, lora_A, lora_B)
    x_d = x.to(branch)
    if dropout > 0:
        if dropout_mask is None:
            dropout_mask = torch.rand(x.shape, device=x.device) >= dropout
        x_d = x_d * dropout_mask / (1 - dropout)
    bias = None if bias is None else bias.to(x.dtype)
    base = F.linear(x, weight.to(x.dtype), bias)
    lora = scaling * F.linear(F.linear(x_d, lora_A.to(branch)), lora_B.to(branch))
    return (base + lora).to(x.dtype)


def dora_norm(weight, lora_A, lora_B, scaling, quant_state=None):
    """Same contract as ``lowrank.ops.dora_norm``: ||W + s B A|| per row, without gradient, in
    fp32 (fp64 when the weight or a factor is fp64: the tests' oracle)."""
    weight = check_weight("dora_norm", weight, quant_state, FLOAT_DTYPES + (torch.float64,))
    check_lora_factors("dora_norm", lora_A, lora_B, scaling, *weight.shape,
                       FLOAT_DTYPES + (torch.float64,))
    values = _weight_values(weight).detach()
    dtype = torch.promote_types(torch.promote_types(values.dtype, lora_A.dtype),
                                torch.promote_types(lora_B.dtype, torch.float32))
    delta = lora_B.detach().to(dtype) @ lora_A.detach().to(dtype)
    return (values.to(dtype) + scaling * delta).norm(dim=1)


def dora_linear(x, weight, lora_A, lora_B, magnitude, scaling, bias=None, dropout=0.0,
                quant_state=None, dropout_mask=None, weight_norm=None):
    """DoRA as PEFT computes it: ``x W^T + b + (g - 1) x_d W^T + g s x_d A^T B^T`` with
    g = m / ||W + s B A||, the norm detached. The GEMMs run in x's dtype, g and the sums in fp32
    (fp64 for an fp64 x). ``dropout_mask``: as for ``lora_linear``; ``weight_norm``: as for
    ``lowrank.ops.dora_linear``."""
    weight = check_dora_args(x, weight, lora_A, lora_B, magnitude, scaling, bias, dropout,
                             quant_state, dtypes=FLOAT_DTYPES + (torch.float64,))
    if weight_norm is None:
        weight_norm = dora_norm(weight, lora_A, lora_B, scaling)
    w = _weight_values(weight).to(x.dtype)
    x_d = x
    if dropout > 0:
        if dropout_mask is None:
            dropout_mask = torch.rand(x.shape, device=x.device) >= dropout
        x_d = x * dropout_mask / (1 - dropout)
    dtype = torch.promote_types(x.dtype, torch.float32)
    g = magnitude.to(dtype) / weight_norm.detach().to(dtype)
    base = F.linear(x, w)
    base_dropped = base if dropout == 0 else F.linear(x_d, w)
    lora = F.linear(F.linear(x_d, lora_A.to(x.dtype)), lora_B.to(x.dtype))
    y = base.to(dtype) + (g - 1) * base_dropped.to(dtype) + g * scaling * lora.to(dtype)
    if bias is not None:
        y = y + bias.to(dtype)
    return y.to(x.dtype)


def gated_activation(gate, up, activation):
    """act(gate) * up, as a gated MLP computes it unfused: act(gate) rounded to gate's dtype, then
    the product. ``activation``: "silu" (Llama, Mistral, Qwen2) or "gelu_tanh" (Gemma)."""
    check_activation("gated_activation", activation)
    act = F.silu(gate) if activation == "silu" else F.gelu(gate, approximate="tanh")
    return act * up


def lora_mlp(x, gate, up, down, activation, dropout_masks=(None, None, None)):
    """Same contract as ``lowrank.ops.lora_mlp``: down(act(gate(x)) * up(x)), each projection a
    ``lora_linear``. ``dropout_masks``: the keep masks of gate, up and down (see
    ``lora_linear``)."""
    gate, up, down = check_lora_mlp_args(x, gate, up, down, activation,
                                         dtypes=FLOAT_DTYPES + (torch.float64,))
    g, u = (lora_linear(x, p.weight, p.lora_A, p.lora_B, p.scaling, p.bias, p.dropout,
                        dropout_mask=mask)
            for p, mask in zip((gate, up), dropout_masks[:2]))
    return lora_linear(gated_activation(g, u, activation), down.weight, down.lora_A, down.lora_B,
                       down.scaling, down.bias, down.dropout, dropout_mask=dropout_masks[2])


def lora_qkv(x, q, k, v, dropout_masks=(None, None, None)):
    """Same contract as ``lowrank.ops.lora_qkv``: (q(x), k(x), v(x)), each a ``lora_linear``."""
    projections = check_lora_qkv_args(x, q, k, v, dtypes=FLOAT_DTYPES + (torch.float64,))
    return tuple(lora_linear(x, p.weight, p.lora_A, p.lora_B, p.scaling, p.bias, p.dropout,
                             dropout_mask=mask) for p, mask in zip(projections, dropout_masks))


def ia3_linear(x, weight, ia3, bias=None, feedforward=False, quant_state=None):
    """Y = (x W^T + b) * l, or with ``feedforward`` (x * l) W^T + b, computed in x's dtype with l
    applied in fp32 (PEFT's IA3 layers do the same)."""
    weight = _weight_values(check_ia3_args(x, weight, ia3, bias, feedforward, quant_state,
                                           dtypes=FLOAT_DTYPES + (torch.float64,))).to(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    scale = ia3.reshape(-1)
    if feedforward:
        return F.linear((x * scale).to(x.dtype), weight, bias)
    return (F.linear(x, weight, bias) * scale).to(x.dtype)


def _merged(merged, weight, dtype):
    """The fp32 ``merged`` weight in the form ``lowrank.ops``' merges return for the FrozenWeight
    ``weight``."""
    quant_state = weight.quant_state
    if quant_state is None or dtype is not None:
        return merged.to(dtype or (weight.tensor.dtype if quant_state is None else quant_state.dtype))
    packed, state = nf4_quantize(merged, quant_state.blocksize, quant_state.nested,
                                 quant_storage=weight.stored.dtype)
    state.dtype = quant_state.dtype  # the merged weight stands for the original's compute dtype
    return packed.reshape(weight.stored.shape), state


def merge_lora(weight, lora_A, lora_B, scaling, quant_state=None, dtype=None):
    """Same contract as ``lowrank.ops.merge_lora``: W + s B A in fp32, then in the weight's form.

    B A is summed one rank at a time, each product rounded to fp32 before its add, as the kernel
    does, so that both give the same fp32 merged weight and hence the same NF4 bytes."""
    weight = check_merge_args("merge_lora", weight, quant_state, dtype)
    N, K = weight.shape
    check_lora_factors("merge_lora", lora_A, lora_B, scaling, N, K, FLOAT_DTYPES)
    a, b = lora_A.detach().float(), lora_B.detach().float()
    delta = torch.zeros(N, K, device=a.device)
    for r in range(a.shape[0]):
        delta += b[:, r, None] * a[None, r, :]
    return _merged(_weight_values(weight).detach().float() + scaling * delta, weight, dtype)


def ia3_scaled_weight(weight, ia3, feedforward, unmerge=False):
    """A dense weight times l (divided by l with ``unmerge``), in fp32, rounded to its dtype."""
    scale = ia3.detach().float().reshape((1, -1) if feedforward else (-1, 1))
    w = weight.detach().float()
    return (w / scale if unmerge else w * scale).to(weight.dtype)


def merge_ia3(weight, ia3, feedforward=False, bias=None, quant_state=None, dtype=None):
    """Same contract as ``lowrank.ops.merge_ia3``: (W * l in the weight's form, bias * l or bias)."""
    weight = check_merge_args("merge_ia3", weight, quant_state, dtype)
    N, K = weight.shape
    check_ia3_vector("merge_ia3", ia3, feedforward, N, K, FLOAT_DTYPES)
    check_bias("merge_ia3", bias, N, FLOAT_DTYPES)
    scale = ia3.detach().float().reshape((1, -1) if feedforward else (-1, 1))
    merged = _merged(_weight_values(weight).detach().float() * scale, weight, dtype)
    if bias is not None and not feedforward:
        bias = (bias.detach().float() * scale.reshape(-1)).to(bias.dtype)
    return merged, bias


def lora_mixed(x, weight, lora_A, lora_B, scalings, adapter_index, bias=None, quant_state=None):
    """Y[m] = x[m] W^T + b + scalings[i_m] x[m] A[i_m]^T B[i_m]^T, computed in x's dtype, per
    adapter over the rows that use it (i_m = -1: the base alone). Same contract as
    ``lowrank.ops.lora_mixed``."""
    weight, scalings = check_lora_mixed_args(x, weight, lora_A, lora_B, scalings, adapter_index,
                                             bias, quant_state,
                                             dtypes=FLOAT_DTYPES + (torch.float64,))
    weight = _weight_values(weight)
    bias = None if bias is None else bias.to(x.dtype)
    y = F.linear(x, weight.to(x.dtype), bias)
    for adapter in range(lora_A.shape[0]):
        rows = adapter_index == adapter
        shrunk = F.linear(x[rows], lora_A[adapter].to(x.dtype))
        y[rows] += scalings[adapter].item() * F.linear(shrunk, lora_B[adapter].to(x.dtype))
    return y


def lora_grouped(x, weight, lora_A, lora_B, scaling, offsets, transposed=False, bias=None):
    """Same contract as ``lowrank.ops.lora_grouped``: for rows sorted by expert (rows offsets[e] ..
    offsets[e + 1] of expert e), y = x W_e^T + scaling x A_e^T B_e^T (+ bias[e] if given, added
    after the projection as transformers' experts add it) in x's dtype; adapters in
    PEFT's target_parameters layout (A_e: rows e r .. e r + r of lora_A, B_e: columns e, e + E, ...
    of lora_B). One expert at a time: the plain form, not a fast one."""
    experts = weight.shape[0]
    rank = lora_A.shape[0] // experts
    a = lora_A.reshape(experts, rank, lora_A.shape[1])  # as PEFT's ParamWrapper reads them
    b = lora_B.reshape(lora_B.shape[0], rank, experts)
    out_features = weight.shape[2] if transposed else weight.shape[1]
    y = x.new_zeros(x.shape[0], out_features)
    for e, (first, end) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        if first == end:
            continue
        rows = x[first:end]
        w = weight[e].t() if transposed else weight[e]
        lora = F.linear(F.linear(rows, a[e].to(x.dtype)), b[:, :, e].to(x.dtype))
        projected = F.linear(rows, w.to(x.dtype)) + scaling * lora
        if bias is not None:
            projected = projected + bias[e]
        y = y.index_copy(0, torch.arange(first, end, device=x.device), projected)
    return y
