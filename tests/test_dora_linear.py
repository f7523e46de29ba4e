"""lowrank.ops.dora_linear, dora_norm and kernels/dora_norm.py against the fp64 reference, and
against PEFT's DoRA layer on the same weights.

Shapes are odd and not multiples of any block (M = 37 over leading dims 37 x 1, K = 97, N = 83,
ranks 5 and 19: one rank chunk of 16 partly filled, and two). The magnitude is the norm scaled by
a random factor per row, so g = m / ||W + s B A|| is not 1 (at 1, the terms that g scales would
go untested). Tolerances, relative to the largest reference value, per dtype, as for LoRA.
"""

import pytest
import torch
from helpers import K, M, N, TOLERANCE, assert_op_close, make_lora_case, poisoned, relative_error

from lowrank import ops, reference, routes
from lowrank.kernels import dora_grad_scale as dora_grad_scale_kernel
from lowrank.kernels import dora_norm as dora_norm_kernel
from lowrank.kernels import lora_linear as lora_kernels

SCALING = 1.5
KINDS = ("dense", "nf4-64", "nf4-nested-128")


def make_case(dtype, kind, rank, device, seed=0, m=M):
    """(x, weight as the op takes it, quant_state, its dense fp32 values, A, B, m, bias): LoRA's
    case with a magnitude m of 0.7 to 1.3 times the norm, so that g is not 1."""
    x, weight, state, dense, lora_a, lora_b, bias = make_lora_case(dtype, kind, rank, device,
                                                                   seed=seed, m=m)
    gen = torch.Generator().manual_seed(seed + 1)
    norm = reference.dora_norm(dense, lora_a, lora_b, SCALING)
    magnitude = (norm * (1 + 0.3 * torch.randn(N, generator=gen).to(device))).float()
    return x, weight, state, dense, lora_a, lora_b, magnitude, bias


def fp64_reference(x, dense, lora_a, lora_b, magnitude, bias, grad_y, dropout=0.0, mask=None):
    leaves = [t.detach().double().requires_grad_() for t in (x, lora_a, lora_b, magnitude)]
    y = reference.dora_linear(leaves[0], dense.double(), leaves[1], leaves[2], leaves[3], SCALING,
                              None if bias is None else bias.double(), dropout, dropout_mask=mask)
    y.backward(grad_y.double())
    return y.detach(), *(leaf.grad for leaf in leaves)


def run_ours(x, weight, state, lora_a, lora_b, magnitude, bias, grad_y, dropout=0.0):
    leaves = [t.detach().requires_grad_() for t in (x, lora_a, lora_b, magnitude)]
    y = ops.dora_linear(leaves[0], weight, leaves[1], leaves[2], leaves[3], SCALING, bias=bias,
                        dropout=dropout, quant_state=state)
    y.backward(grad_y)
    return y.detach(), *(leaf.grad for leaf in leaves)


# Rank 19 covers two rank chunks of 16, the second partly filled.
# (Plain NF4's norm is checked through dora_linear below.)
@pytest.mark.parametrize("kind,rank", [("dense", 5), ("dense-transposed", 19),
                                       ("nf4-nested-128", 19)])
def test_norm_kernel_against_fp64(kind, rank, device):
    """The launcher into a NaN-poisoned buffer: every row written, and equal to the fp64 norm."""
    x, weight, state, dense, lora_a, lora_b, magnitude, bias = make_case(
        torch.float32, kind.removesuffix("-transposed"), rank, device)
    if kind == "dense-transposed":  # a Conv1D-style view: strides (1, N)
        weight = weight.t().contiguous().t()
    frozen = ops.FrozenWeight.of(weight, state)
    norm = poisoned((N,), torch.float32, device)
    dora_norm_kernel.dora_norm(frozen.tensor, lora_a, lora_b, SCALING, norm, frozen.nf4)
    expected = (dense.double() + SCALING * lora_b.double() @ lora_a.double()).norm(dim=1)
    assert_op_close(norm, expected, torch.float32, "norm", 1e-6)
    assert torch.equal(ops.dora_norm(weight, lora_a, lora_b, SCALING, quant_state=state), norm)


# Every weight kind in fp32, every dtype on a dense weight; the dropout test below runs NF4 in
# fp16 and bf16.
@pytest.mark.parametrize("kind,dtype", [(kind, torch.float32) for kind in KINDS]
                         + [("dense", torch.float16), ("dense", torch.bfloat16)],
                         ids=[f"{kind}-fp32" for kind in KINDS] + ["dense-fp16", "dense-bf16"])
def test_forward_and_gradients_against_fp64(dtype, kind, device):
    x, weight, state, dense, lora_a, lora_b, magnitude, bias = make_case(dtype, kind, 5, device)
    grad_y = torch.randn(M, 1, N, generator=torch.Generator().manual_seed(9)).to(device, dtype)
    ours = run_ours(x, weight, state, lora_a, lora_b, magnitude, bias, grad_y)
    expected = fp64_reference(x, dense, lora_a, lora_b, magnitude, bias, grad_y)
    for name, got, want, got_dtype in zip(("y", "dx", "dA", "dB", "dm"), ours, expected,
                                          (dtype, dtype) + (torch.float32,) * 3):
        assert_op_close(got, want, got_dtype, name, TOLERANCE[dtype])


@pytest.mark.parametrize("kind,dtype", [("dense", torch.float32), ("nf4-nested-128", torch.float16),
                                        ("nf4-64", torch.bfloat16)], ids=["dense-fp32",
                                                                         "nested-fp16", "nf4-bf16"])
def test_dropout_as_peft_applies_it(kind, dtype, device):
    """x W^T + b + (g - 1) x_d W^T + g s x_d A^T B^T with the kernels' mask, gradients included."""
    p = 0.25
    rank = 19 if dtype == torch.float32 else 5
    x, weight, state, dense, lora_a, lora_b, magnitude, bias = make_case(dtype, kind, rank, device)
    grad_y = torch.randn(M, 1, N, generator=torch.Generator().manual_seed(5)).to(device, dtype)
    torch.manual_seed(1234)
    mask = ops.lora_dropout_mask(ops.dropout_seed(device), (M, K), p).reshape(M, 1, K)
    assert 0 < mask.sum() < mask.numel()
    torch.manual_seed(1234)  # dora_linear draws the same seed
    ours = run_ours(x, weight, state, lora_a, lora_b, magnitude, bias, grad_y, dropout=p)
    expected = fp64_reference(x, dense, lora_a, lora_b, magnitude, bias, grad_y, p, mask)
    for name, got, want, got_dtype in zip(("y", "dx", "dA", "dB", "dm"), ours, expected,
                                          (dtype, dtype) + (torch.float32,) * 3):
        assert_op_close(got, want, got_dtype, name, TOLERANCE[dtype])
    without = fp64_reference(x, dense, lora_a, lora_b, magnitude, bias, grad_y)
    assert relative_error(ours[1], without[1]) > 10 * TOLERANCE[dtype]  # the mask made a difference


@pytest.mark.parametrize("kind,dtype", [("dense", torch.float32),
                                        ("nf4-nested-128", torch.bfloat16)],
                         ids=["dense-fp32", "nested-bf16"])
@pytest.mark.parametrize("with_undropped", [False, True], ids=["g-q", "P+(g-1)q"])
def test_epilogue_kernel_against_fp64(kind, dtype, with_undropped, device):
    """The forward kernel's DoRA epilogue into NaN-poisoned Y and product buffers: Y = g q + b, or
    P + (g - 1) q + b with the undropped P, and the product q = x W^T + s S B^T, every element
    written."""
    x, weight, state, dense, lora_a, lora_b, magnitude, bias = make_case(dtype, kind, 19, device)
    x = x.reshape(M, K)
    frozen = ops.FrozenWeight.of(weight, state)
    gen = torch.Generator().manual_seed(3)
    s = (x.float() @ lora_a.t()).to(dtype)
    b = lora_b.to(dtype)
    scale = (torch.rand(N, generator=gen) + 0.5).to(device)  # g, not 1
    undropped = torch.randn(M, N, generator=gen).to(device, dtype) if with_undropped else None
    y, product = poisoned((M, N), dtype, device), poisoned((M, N), dtype, device)
    lora_kernels.lora_forward(x, frozen.tensor, s, b, bias, y, SCALING, frozen.nf4,
                              column_scale=scale, undropped=undropped, product=product)
    q = x.double() @ dense.double().t() + SCALING * s.double() @ b.double().t()
    g = scale.double()
    expected = (undropped.double() + (g - 1) * q if with_undropped else g * q) + bias.double()
    assert_op_close(y, expected, dtype, "y")
    assert_op_close(product, q, dtype, "product")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shifted", [False, True], ids=["no-dropout", "dropout"])
def test_backward_scale_kernel_against_fp64(dtype, shifted, device):
    """g dY (bit-equal to torch's fp32 product rounded once), (g - 1) dY and the column sums of
    dY * Q by row block, into NaN-poisoned buffers: M = 101 spans two row blocks, the second
    partly filled; N = 83 two column blocks."""
    m = 101
    gen = torch.Generator().manual_seed(4)
    grad_y, q = (torch.randn(m, N, generator=gen).to(device, dtype) for _ in range(2))
    g = (torch.rand(N, generator=gen) + 0.5).to(device)
    rows = dora_grad_scale_kernel.partial_rows(m)
    scaled, partial = poisoned((m, N), dtype, device), poisoned((rows, N), torch.float32, device)
    shifted_out = poisoned((m, N), dtype, device) if shifted else None
    dora_grad_scale_kernel.dora_grad_scale(grad_y, g, scaled, shifted_out, q, partial)
    assert torch.equal(scaled, (grad_y.float() * g).to(dtype))
    if shifted:
        assert torch.equal(shifted_out, (grad_y.float() * (g - 1)).to(dtype))
    assert rows == 2
    assert_op_close(partial.sum(0), (grad_y.double() * q.double()).sum(0), torch.float32,
                    "column sums")


@pytest.mark.parametrize("route", ["fused", "cublas", "decode"])
@pytest.mark.parametrize("kind,dtype", [("nf4-64", torch.float32), ("dense", torch.bfloat16)],
                         ids=["nf4-fp32", "dense-bf16"])
def test_every_route_gives_the_same_numbers(route, kind, dtype, device):
    """Each route (the epilogue on the fused one, one elementwise pass after cuBLAS's or the decode
    kernel's product) against the fp64 reference, with and without dropout and bias, 5 rows (a
    decode route exists); and an inference call (m without grad: no product kept) returns the
    same Y."""
    x, weight, state, dense, lora_a, lora_b, magnitude, with_bias = make_case(dtype, kind, 5,
                                                                              device, m=5)
    grad_y = torch.randn(5, 1, N, generator=torch.Generator().manual_seed(6)).to(device, dtype)
    for dropout, bias in ((0.0, None), (0.0, with_bias), (0.25, with_bias)):
        torch.manual_seed(11)
        mask = ops.lora_dropout_mask(ops.dropout_seed(device), (5, K), dropout).reshape(5, 1, K)
        with routes.forced(route):
            torch.manual_seed(11)  # dora_linear draws the same seed
            ours = run_ours(x, weight, state, lora_a, lora_b, magnitude, bias, grad_y, dropout)
            torch.manual_seed(11)
            with torch.no_grad():
                inference = ops.dora_linear(x, weight, lora_a, lora_b, magnitude, SCALING,
                                            bias=bias, dropout=dropout, quant_state=state)
        expected = fp64_reference(x, dense, lora_a, lora_b, magnitude, bias, grad_y, dropout,
                                  mask if dropout > 0 else None)
        for name, got, want, got_dtype in zip(("y", "dx", "dA", "dB", "dm"), ours, expected,
                                              (dtype, dtype) + (torch.float32,) * 3):
            assert_op_close(got, want, got_dtype,
                            f"{route} {name} (dropout {dropout}, bias {bias is not None})",
                            TOLERANCE[dtype])
        assert torch.equal(inference, ours[0])


def test_decode_rows_and_a_trainable_dense_weight_and_bias(device):
    """Few rows (the split-K forward), and the gradients of a dense weight and a bias left
    trainable, with and without dropout, against the reference's autograd."""
    x, weight, state, dense, lora_a, lora_b, magnitude, bias = make_case(torch.float32, "dense", 5,
                                                                         device, m=3)
    grad_y = torch.randn(3, 1, N, generator=torch.Generator().manual_seed(2)).to(device)
    for dropout in (0.0, 0.3):
        results = []
        for op in (ops.dora_linear, reference.dora_linear):
            leaves = [t.detach().requires_grad_() for t in (x, weight, lora_a, lora_b, magnitude,
                                                            bias)]
            torch.manual_seed(7)
            seed = ops.dropout_seed(device)
            extra = {} if op is ops.dora_linear or dropout == 0 else {
                "dropout_mask": ops.lora_dropout_mask(seed, (3, K), dropout).reshape(3, 1, K)}
            torch.manual_seed(7)
            y = op(*leaves[:5], SCALING, bias=leaves[5], dropout=dropout, **extra)
            y.backward(grad_y)
            results.append([y.detach()] + [leaf.grad for leaf in leaves])
        for name, got, want in zip(("y", "dx", "dW", "dA", "dB", "dm", "dbias"), *results):
            assert_op_close(got, want, torch.float32, f"{name} (dropout {dropout})")


def test_the_function_called_directly_is_dora_linear(device):
    x, weight, state, dense, lora_a, lora_b, magnitude, bias = make_case(torch.float32,
                                                                         "nf4-nested-128", 5,
                                                                         device)
    x = x.reshape(M, K)
    grad_y = torch.randn(M, N, generator=torch.Generator().manual_seed(2)).to(device)
    results = []
    for direct in (False, True):
        leaves = [t.detach().requires_grad_() for t in (x, lora_a, lora_b, magnitude)]
        if direct:
            frozen = ops.FrozenWeight.of(weight, state)
            norm = ops.dora_norm(frozen, lora_a, lora_b, SCALING)
            seed = torch.empty(1, dtype=torch.int64, device=device)
            y = ops.DoraLinearFunction.apply(leaves[0], frozen, frozen.tensor, *leaves[1:], norm,
                                             SCALING, bias, 0.0, seed)
        else:
            y = ops.dora_linear(leaves[0], weight, *leaves[1:], SCALING, bias=bias, quant_state=state)
        y.backward(grad_y)
        results.append([y.detach()] + [leaf.grad for leaf in leaves])
    for got, want in zip(*results):
        assert torch.equal(got, want)


# Without dropout (the dropout path's fake implementation is checked by opcheck below).
def test_compiles_with_torch_compile_without_graph_breaks(device):
    dropout = 0.0
    x, weight, state, dense, lora_a, lora_b, magnitude, bias = make_case(torch.float32,
                                                                         "nf4-nested-128", 5,
                                                                         device, m=5)
    magnitude.requires_grad_()

    def step(x, m):
        return ops.dora_linear(x, weight, lora_a, lora_b, m, SCALING, bias=bias, dropout=dropout,
                               quant_state=state).square().sum()

    torch.manual_seed(3)  # the same dropout seed drawn in both runs
    eager = step(x, magnitude)
    (eager_grad,) = torch.autograd.grad(eager, magnitude)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    loss = compiled(x, magnitude)
    (grad,) = torch.autograd.grad(loss, magnitude)
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(grad, eager_grad)


def test_dora_ops_pass_torch_library_checks(device):
    x, weight, state, dense, lora_a, lora_b, magnitude, bias = make_case(torch.float32, "nf4-64",
                                                                         5, device, m=5)
    x = x.reshape(5, K)
    flat = ops.FrozenWeight.of(weight, state).flat()
    seed = torch.zeros(1, dtype=torch.int64, device=device)
    torch.library.opcheck(ops.dora_norm_op, (*flat, lora_a, lora_b, SCALING))
    scale = torch.rand(N, device=device) + 0.5
    for dropout, keep_product in ((0.0, True), (0.1, False)):
        torch.library.opcheck(ops.dora_forward, (x, *flat, lora_a, lora_b, scale, SCALING, bias,
                                                 dropout, seed, keep_product))
    grad_y = torch.randn(5, N, device=device)
    grad_s = torch.randn(5, 5, device=device)
    torch.library.opcheck(ops.dora_grad_input, (grad_y, grad_y * 0.5, *flat, grad_s, lora_a, seed,
                                                0.1))
    for product, shifted in ((torch.randn(5, N, device=device), False),
                             (grad_y.new_empty(0, N), True)):
        torch.library.opcheck(ops.dora_grad_scale, (grad_y, scale, product, shifted))


def test_bad_arguments_are_named(device):
    x, weight, state, dense, lora_a, lora_b, magnitude, bias = make_case(torch.float32, "dense", 5,
                                                                         device)
    with pytest.raises(ValueError, match=r"magnitude must be \(83,\), one value per output"):
        ops.dora_linear(x, weight, lora_a, lora_b, magnitude[:-1], SCALING)
    with pytest.raises(TypeError, match="magnitude dtype torch.int64"):
        ops.dora_linear(x, weight, lora_a, lora_b, magnitude.long(), SCALING)
    with pytest.raises(ValueError, match=r"weight_norm must be \(83,\)"):
        ops.dora_linear(x, weight, lora_a, lora_b, magnitude, SCALING, weight_norm=magnitude[:5])
    with pytest.raises(ValueError, match=r"dora_norm: lora_B must be \(83, 5\)"):
        ops.dora_norm(weight, lora_a, lora_b[:, :3], SCALING)
    with pytest.raises(ValueError, match=r"dora_linear: dropout must be in \[0, 1\)"):
        ops.dora_linear(x, weight, lora_a, lora_b, magnitude, SCALING, dropout=1.0)


# PEFT's DoRA layer (peft.tuners.lora with use_dora=True) on the same weights: its forward and
# gradients are what "DoRA" means to users of PEFT.

class OneLayer(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def peft_dora_layer(base, rank, alpha, dropout=0.0):
    """PEFT's DoRA Linear around ``base``, B randomized (PEFT starts it at zero) after m was
    initialized, so that g != 1."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, use_dora=True,
                        target_modules=["proj"])
    model = get_peft_model(OneLayer(base), config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(
            torch.randn(layer.lora_B["default"].weight.shape, generator=torch.Generator().manual_seed(4)) * 0.1)
    return layer


@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_equals_peft_dora_layer(kind, device):
    from bitsandbytes.nn import Linear4bit

    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(K, N, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(N, K, generator=gen) * 0.05)
        linear.bias.copy_(torch.randn(N, generator=gen))
    if kind == "nf4":
        base = Linear4bit(K, N, bias=True, compute_dtype=torch.float32, quant_type="nf4")
        base.load_state_dict(linear.state_dict())
        base = base.to(device)  # quantizes
    else:
        base = linear.to(device)
    layer = peft_dora_layer(base, 5, 10)
    x = torch.randn(M, K, generator=gen).to(device).requires_grad_()
    grad_y = torch.randn(M, N, generator=gen).to(device)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
              layer.lora_magnitude_vector["default"].weight]
    with torch.compiler.set_stance("force_eager"):
        expected_y = layer(x)
    expected = torch.autograd.grad(expected_y, [x, *params], grad_y)
    weight = base.weight
    ours_y = ops.dora_linear(x, weight, *params, layer.scaling["default"], bias=base.bias)
    ours = torch.autograd.grad(ours_y, [x, *params], grad_y)
    for name, got, want in zip(("y", "dx", "dA", "dB", "dm"), (ours_y, *ours),
                               (expected_y, *expected)):
        assert_op_close(got, want.detach(), torch.float32, name, 1e-5)


def test_bf16_stays_within_peft_bf16_distance_from_fp32(device):
    """A bf16 base: ours in bf16 is as close to PEFT's fp32 DoRA as PEFT's own bf16 run is (within
    twice its distance), outputs and the magnitude's gradient. Both PEFT layers hold the same
    adapter (fp32, as PEFT keeps it)."""
    import copy

    gen = torch.Generator().manual_seed(1)
    base = torch.nn.Linear(K, N, bias=True)
    with torch.no_grad():
        base.weight.copy_(torch.randn(N, K, generator=gen) * 0.05)
    x = torch.randn(M, K, generator=gen)
    grad_y = torch.randn(M, N, generator=gen)
    layers = {"fp32": peft_dora_layer(copy.deepcopy(base), 5, 10),
              "bf16": peft_dora_layer(copy.deepcopy(base).to(torch.bfloat16), 5, 10)}
    names = ("lora_A", "lora_B", "lora_magnitude_vector")
    adapter = {n: getattr(layers["fp32"], n)["default"].weight for n in names}
    with torch.no_grad():
        for n in names:
            getattr(layers["bf16"], n)["default"].weight.copy_(adapter[n])
    results = {}
    for name, layer in layers.items():
        dtype = layer.base_layer.weight.dtype
        magnitude = layer.lora_magnitude_vector["default"].weight
        with torch.compiler.set_stance("force_eager"):
            y = layer(x.to(dtype))
        results[name] = (y, *torch.autograd.grad(y, [magnitude], grad_y.to(dtype)))
    layer = layers["bf16"]
    params = [getattr(layer, n)["default"].weight for n in names]
    ours_y = ops.dora_linear(x.to(device, torch.bfloat16), layer.base_layer.weight.to(device),
                             *params, layer.scaling["default"], bias=layer.base_layer.bias.to(device))
    results["ours"] = (ours_y, *torch.autograd.grad(ours_y, [params[2]],
                                                    grad_y.to(device, torch.bfloat16)))
    for i, what in enumerate(("y", "dm")):
        ours = relative_error(results["ours"][i].cpu(), results["fp32"][i])
        peft = relative_error(results["bf16"][i], results["fp32"][i])
        assert 0 < peft and ours <= 2 * peft, \
            f"{what}: ours {ours:.2e}, PEFT's bf16 {peft:.2e} from fp32"
