"""lowrank.ops.ia3_linear and its kernels against the fp64 reference and PEFT's IA3 layers.

Shapes are odd and not multiples of any block (M = 37 over leading dims 37 x 1, K = 97, N = 83;
blocks are 32/64). Tolerances, relative to the largest reference value, per dtype: the GEMMs run in
x's dtype with fp32 accumulation and l is applied in fp32, so the error is the dtype's rounding of
the operands (and, for dl, of the M-term sums).
"""

import pytest
import torch
from helpers import (EMPTY, IA3_FORMS, TOLERANCE, K, M, N, assert_op_close, assert_same_bits,
                     check_empty, check_ia3_linear_against_fp64, decode_nf4, ia3_linear_fp64,
                     load_tiny_4bit_llama, make_ia3_case, poisoned, run_ia3_linear)

from lowrank import nf4, ops
from lowrank.kernels import ia3_linear as ia3_kernels
from lowrank.kernels._common import target

@pytest.mark.parametrize("form", IA3_FORMS)
@pytest.mark.parametrize("kind", ["dense", "nf4-64", "nf4-nested-128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_forward_and_backward_match_fp64_reference(dtype, kind, form, device):
    check_ia3_linear_against_fp64(dtype, kind, form, True, device)


@pytest.mark.parametrize("form", IA3_FORMS)
@pytest.mark.parametrize("kind", ["dense", "nf4-nested-128"])
def test_without_bias(kind, form, device):
    check_ia3_linear_against_fp64(torch.bfloat16, kind, form, False, device)


@pytest.mark.parametrize("form", IA3_FORMS)
@pytest.mark.parametrize("shape", EMPTY.values(), ids=EMPTY)
def test_empty_dimensions_give_the_reference_results_and_gradients(shape, form, device):
    """M, N or K = 0 is no error (K = 0 crashed the launcher): y is empty, or the
    bias alone (times l in the output form) when K = 0; dl and dbias come back in their shapes."""
    m, k, n = shape
    feedforward = IA3_FORMS[form]
    gen = torch.Generator().manual_seed(0)
    ia3 = (1 + 0.5 * torch.randn((1, k) if feedforward else (n, 1), generator=gen)).to(device)
    bias = torch.randn(n, generator=gen).to(device)
    y = check_empty(lambda module, weight, x, ia3, bias: module.ia3_linear(
        x, weight, ia3, bias=bias, feedforward=feedforward), shape, {"ia3": ia3, "bias": bias},
        device)
    if k == 0:
        expected = bias if feedforward else bias * ia3.reshape(-1)
        assert torch.equal(y, expected.expand(m, 2, n))


@pytest.mark.parametrize("form", IA3_FORMS)
def test_flat_and_16_bit_ia3_vectors(form, device):
    """l given flat ((N,) / (K,)) and in bf16: same results; dl comes back flat and in bf16."""
    feedforward = IA3_FORMS[form]
    x, weight, state, dense, ia3, bias = make_ia3_case(torch.float16, "dense", feedforward, device,
                                                   ia3_dtype=torch.bfloat16)
    grad_y = torch.randn(M, 1, N, generator=torch.Generator().manual_seed(3)).to(device, x.dtype)
    flat = ia3.reshape(-1)
    ours = run_ia3_linear(x, weight, state, flat, bias, feedforward, grad_y)
    expected = ia3_linear_fp64(x, dense, flat, bias, feedforward, grad_y)
    assert ours[2].shape == flat.shape
    for name, got, want, got_dtype in zip(("y", "dx", "dl"), ours, expected,
                                          (x.dtype, x.dtype, torch.bfloat16)):
        assert_op_close(got, want, got_dtype, name, TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("form", IA3_FORMS)
def test_grad_of_l_over_many_token_blocks_is_deterministic(form, device):
    """151 tokens: three blocks of BLOCK_M = 64, the last ragged, whose partial sums are added."""
    feedforward, tokens = IA3_FORMS[form], 151
    x, weight, state, dense, ia3, bias = make_ia3_case(torch.float32, "nf4-nested-128", feedforward,
                                                   device, tokens=tokens)
    grad_y = torch.randn(tokens, 1, N, generator=torch.Generator().manual_seed(1)).to(device)
    first, second = (run_ia3_linear(x, weight, state, ia3, bias, feedforward, grad_y)[2] for _ in range(2))
    assert torch.equal(first, second)
    expected = ia3_linear_fp64(x, dense, ia3, bias, feedforward, grad_y)[2]
    assert_op_close(first, expected, torch.float32, "dl")


# 151 tokens: three tile rows of BLOCK_M = 64, two groups of the grouped tile order in Triton's
# interpreter (GROUP_M = 2), the last one ragged; N = 83 and K = 97 give two ragged tile columns.
@pytest.mark.parametrize("tokens", [M, 151], ids=["one-group", "grouped"])
@pytest.mark.parametrize("form", IA3_FORMS)
def test_kernels_write_every_output_element(form, tokens, device):
    """The launchers, called with NaN-poisoned outputs, against fp64 products (dl's partial sums
    in the rows of their token blocks)."""
    feedforward = IA3_FORMS[form]
    dtype = torch.bfloat16
    x, weight, state, dense, ia3, bias = make_ia3_case(dtype, "nf4-nested-128", feedforward, device,
                                                       tokens=tokens)
    x = x.reshape(tokens, K)
    frozen = ops.FrozenWeight.of(weight, state)
    weight, nf4_args = frozen.tensor, frozen.nf4
    scale = ia3.reshape(-1).float()
    x64, w64, l64, b64 = x.double(), dense.double(), scale.double(), bias.double()
    y = poisoned((tokens, N), dtype, device)
    if feedforward:  # as the op runs them: x * l in a pass of its own, then the GEMM
        scaled_x = poisoned((tokens, K), dtype, device)
        ia3_kernels.scale_columns(x, scale, scaled_x)
        assert_op_close(scaled_x, x64 * l64, dtype, "x * l")
        ia3_kernels.ia3_forward(scaled_x, weight, bias, y, nf4=nf4_args)
    else:
        ia3_kernels.ia3_forward(x, weight, bias, y, scale, nf4_args)
    z = x64 @ w64.t() + b64
    expected = (x64 * l64) @ w64.t() + b64 if feedforward else z * l64
    assert_op_close(y, expected, dtype, "Y")
    grad_y = torch.randn(tokens, N, generator=torch.Generator().manual_seed(4)).to(device, dtype)
    dy64 = grad_y.double()
    grad_x = poisoned((tokens, K), dtype, device)
    partials = poisoned((ia3_kernels.partial_rows(tokens, feedforward), K if feedforward else N),
                        torch.float32, device)
    if feedforward:
        ia3_kernels.ia3_grad_input(grad_y, weight, grad_x, scale, x, partials, nf4_args)
    else:  # dY * l in a pass of its own, then the dX GEMM
        scaled_grad_y = poisoned((tokens, N), dtype, device)
        ia3_kernels.scale_columns(grad_y, scale, scaled_grad_y)
        ia3_kernels.ia3_grad_input(scaled_grad_y, weight, grad_x, nf4=nf4_args)
    expected = (dy64 @ w64) * l64 if feedforward else (dy64 * l64) @ w64
    assert_op_close(grad_x, expected, dtype, "dX")
    if not feedforward:
        ia3_kernels.ia3_grad_scale(x, weight, bias, grad_y, partials, nf4_args)
    per_token = (dy64 @ w64) * x64 if feedforward else dy64 * z
    for block, (got, tokens_here) in enumerate(zip(partials, per_token.split(
            ia3_kernels.PARTIAL_BLOCK_M))):
        assert_op_close(got, tokens_here.sum(0), torch.float32, f"dl of token block {block}",
                        TOLERANCE[dtype])


def transposed_forward(monkeypatch):
    """The forward launcher's configs with TRANSPOSED_TILE (x W^T summed as W x^T, so the decoded
    weight is the dot's first operand: sm_90's 256-row config), which the interpreter's one config
    leaves off. The output form's dl kernel takes its configs from these and must drop the flag:
    it does not take it (a GPU launch raises; the interpreter ignores the keyword)."""
    configs = ia3_kernels.forward_configs
    monkeypatch.setattr(ia3_kernels, "forward_configs", lambda *args: [
        {**config, "TRANSPOSED_TILE": True} for config in configs(*args)])
    assert all("TRANSPOSED_TILE" not in config for dtype in (torch.float32, torch.bfloat16)
               for config in ia3_kernels.grad_scale_configs(target(torch.device("cpu")), dtype))


@pytest.mark.parametrize("form", IA3_FORMS)
@pytest.mark.parametrize("kind", ["dense", "nf4-nested-128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_transposed_forward_tile_matches_fp64_reference(dtype, kind, form, device, monkeypatch):
    transposed_forward(monkeypatch)
    check_ia3_linear_against_fp64(dtype, kind, form, True, device)


def check_forward_decodes_nf4_bit_for_bit(form, k, device):
    """An identity x (fp32, IEEE products: 1 x w + 0 x the rest is exact) gives W^T, the weight
    decoded inside the GEMM bit for bit as the format says; the output form's l of ones scales
    the tile exactly (its columns are W's rows). k = 98: rows of W start on any even element;
    128: a multiple of every BLOCK_K, x loaded without a mask (EVEN_K)."""
    w = torch.randn(N, k, generator=torch.Generator().manual_seed(5)) * 0.05
    packed, state = nf4.quantize(w.to(device), blocksize=64, double_quant=True)
    frozen = ops.FrozenWeight.of(packed, state)
    y = poisoned((k, N), torch.float32, device)
    scale = None if IA3_FORMS[form] else torch.ones(N, device=device)
    ia3_kernels.ia3_forward(torch.eye(k, device=device), frozen.tensor, None, y, scale, frozen.nf4)
    assert_same_bits(y, decode_nf4(packed, state).reshape(N, k).t().contiguous())


@pytest.mark.parametrize("k", [98, 128], ids=["odd-tiles", "even-k"])
@pytest.mark.parametrize("form", IA3_FORMS)
def test_transposed_forward_tile_decodes_nf4_bit_for_bit(form, k, device, monkeypatch):
    """Through the transposed tile (sm_90's, its packed tile decoded in wgmma's register
    operand layout, x's columns read in that order), transposed back."""
    transposed_forward(monkeypatch)
    check_forward_decodes_nf4_bit_for_bit(form, k, device)


@pytest.mark.parametrize("form", IA3_FORMS)
def test_forward_decodes_nf4_bit_for_bit_at_even_k(form, device):
    check_forward_decodes_nf4_bit_for_bit(form, 128, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_scaled_operands_are_rounded_once_as_torch_rounds_them(dtype, device):
    """The feed-forward form's x * l and the output form's dY * l (each a pass before its GEMM,
    ``scale_columns``) are the fp32 products rounded once into the operand's dtype, bit for bit as
    torch's ``(t.float() * l).to(dtype)`` (PEFT's rounding), inf and NaN included; so the op with l
    gives what it gives with l = 1 on the operand torch scaled (Y, and dX of the output form)."""
    gen = torch.Generator().manual_seed(11)
    x, weight, state, dense, _, bias = make_ia3_case(dtype, "nf4-nested-128", True, device)
    x = x.reshape(M, K)
    special = x.clone()
    special[3, 5], special[4, 7], special[5, 9] = float("nan"), float("inf"), -float("inf")
    special[6, :] = 1e-30  # products below the dtype's normal range (subnormal, or 0 in fp16)
    for features in (K, N):  # x's columns, dY's
        scale = (1 + 0.5 * torch.randn(features, generator=gen)).to(device)
        t = special if features == K else torch.randn(M, N, generator=gen).to(device, dtype)
        scaled = poisoned(t.shape, dtype, device)
        ia3_kernels.scale_columns(t, scale, scaled)
        expected = (t.float() * scale).to(dtype)
        assert torch.equal(scaled.isnan(), expected.isnan())  # NaN's bits differ between them
        assert torch.equal(scaled.nan_to_num(0.0).view(torch.uint8),
                           expected.nan_to_num(0.0).view(torch.uint8))
    ones_k, ones_n = torch.ones(K, device=device), torch.ones(N, device=device)
    l_k = (1 + 0.5 * torch.randn(K, generator=gen)).to(device)
    y = ops.ia3_linear(x, weight, l_k, bias, feedforward=True, quant_state=state)
    y_torch_scaled = ops.ia3_linear((x.float() * l_k).to(dtype), weight, ones_k, bias,
                                    feedforward=True, quant_state=state)
    assert torch.equal(y, y_torch_scaled)
    l_n = (1 + 0.5 * torch.randn(N, generator=gen)).to(device)
    grad_y = torch.randn(M, N, generator=gen).to(device, dtype)
    grads = [torch.autograd.grad(ops.ia3_linear(x.requires_grad_(), weight, l, bias,
                                                quant_state=state), x, g)[0]
             for l, g in ((l_n, grad_y), (ones_n, (grad_y.float() * l_n).to(dtype)))]
    assert torch.equal(*grads)


PEFT_CASES = {"dense-fp32": (False, torch.float32), "dense-bf16": (False, torch.bfloat16),
              "nf4-nested-fp32": (True, torch.float32)}


@pytest.mark.parametrize("case", PEFT_CASES)
def test_matches_peft_ia3_layers(case, tmp_path):
    """PEFT's IA3 on a tiny Llama (q_proj: output form, down_proj: feed-forward form), dense or
    loaded in 4-bit: our op on the same weight and ia3_l gives PEFT's output and gradients."""
    from peft import IA3Config, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    quantized, dtype = PEFT_CASES[case]
    if quantized:
        model = load_tiny_4bit_llama(tmp_path, dtype, dtype=dtype)
    else:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96,
                                             num_hidden_layers=1, num_attention_heads=4,
                                             num_key_value_heads=2, vocab_size=128)).to(dtype)
    torch.manual_seed(1)
    config = IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"],
                       init_ia3_weights=False)  # random l rather than ones
    model = get_peft_model(model, config)
    mlp, attention = model.base_model.model.model.layers[0].mlp, \
        model.base_model.model.model.layers[0].self_attn
    for layer, feedforward in ((attention.q_proj, False), (mlp.down_proj, True)):
        assert layer.is_feedforward == feedforward
        base = layer.get_base_layer()
        ia3 = layer.ia3_l["default"]
        x = torch.randn(5, 3, base.in_features, dtype=dtype, requires_grad=True)
        grad_y = torch.randn(5, 3, base.out_features, dtype=dtype)
        with torch.compiler.set_stance("force_eager"):
            expected = layer(x)
        expected.backward(grad_y)
        expected_grads = x.grad.clone(), ia3.grad.clone()
        x.grad, ia3.grad = None, None
        ours = ops.ia3_linear(x, base.weight, ia3, bias=base.bias, feedforward=feedforward)
        ours.backward(grad_y)
        tolerance = 2 * TOLERANCE[dtype]
        assert_op_close(ours.detach(), expected.detach().double(), dtype, "y", tolerance)
        assert_op_close(x.grad, expected_grads[0].double(), dtype, "dx", tolerance)
        assert_op_close(ia3.grad, expected_grads[1].double(), torch.float32, "dl", tolerance)


def test_gradcheck_dense_weight_and_bias_get_gradients(device):
    gen = torch.Generator().manual_seed(7)
    for feedforward, scale_shape in ((False, (4, 1)), (True, (1, 5))):
        tensors = [torch.randn(shape, generator=gen).to(device) * 0.5
                   for shape in ((3, 5), (4, 5), scale_shape, (4,))]
        for t in tensors:
            t.requires_grad_()

        def fn(x, w, ia3, bias):
            return ops.ia3_linear(x, w, ia3, bias=bias, feedforward=feedforward)

        assert torch.autograd.gradcheck(fn, tensors, eps=1e-2, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("form", IA3_FORMS)
def test_compiles_with_torch_compile_without_graph_breaks(form, device):
    feedforward = IA3_FORMS[form]
    x, weight, state, dense, ia3, bias = make_ia3_case(torch.float32, "nf4-nested-128", feedforward,
                                                   device)
    ia3.requires_grad_()
    x.requires_grad_()

    def step(x, ia3):
        return ops.ia3_linear(x, weight, ia3, bias=bias, feedforward=feedforward,
                              quant_state=state).square().sum()

    eager = step(x, ia3)
    eager_grads = torch.autograd.grad(eager, (x, ia3))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x, ia3)
    grads = torch.autograd.grad(loss, (x, ia3))
    torch.testing.assert_close(loss, eager)
    for grad, eager_grad in zip(grads, eager_grads):
        torch.testing.assert_close(grad, eager_grad)


@pytest.mark.parametrize("form", IA3_FORMS)
def test_ia3_ops_pass_torch_library_checks(form, device):
    feedforward = IA3_FORMS[form]
    x, weight, state, dense, ia3, bias = make_ia3_case(torch.float32, "dense", feedforward, device)
    x = x.reshape(M, K)
    # The custom ops are launch primitives without autograd (IA3LinearFunction differentiates;
    # gradcheck and the torch.compile tests check it), so no input here requires grad.
    weight_args = ops.FrozenWeight.of(weight).flat()
    torch.library.opcheck(ops.ia3_forward, (x, *weight_args, ia3, bias, feedforward))
    grad_y = torch.randn(M, N, device=device)
    for need_x, need_l in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(ops.ia3_backward, (grad_y, x, *weight_args, ia3, bias, feedforward,
                                                 need_x, need_l))


def test_bad_arguments_are_named(device):
    x, weight, state, dense, ia3, bias = make_ia3_case(torch.float32, "dense", False, device)
    cases = [
        (dict(x=x[..., :-1]), ValueError, "x has 96 features but the weight expects 97"),
        (dict(ia3=ia3[:-1]), ValueError, r"ia3 must have shape \(83,\) or \(83, 1\) \(output form"),
        (dict(feedforward=True), ValueError, r"ia3 must have shape \(97,\) or \(1, 97\)"),
        (dict(ia3=ia3.to(torch.int64)), TypeError, "ia3 dtype torch.int64"),
        (dict(x=x.to(torch.int32), weight=weight.to(torch.int32)), TypeError, "x dtype torch.int32"),
        (dict(weight=weight.half()), TypeError, "dense weight dtype torch.float16 differs"),
        (dict(weight=weight[0]), ValueError, "weight must be 2-D"),
        (dict(bias=bias[:-1]), ValueError, r"bias must be \(83,\)"),
        (dict(ia3=ia3.to("meta")), ValueError, "must be on one device"),
    ]
    for change, error, message in cases:
        args = dict(x=x, weight=weight, ia3=ia3, bias=bias, feedforward=False)
        args.update(change)
        with pytest.raises(error, match=message):
            ops.ia3_linear(args["x"], args["weight"], args["ia3"], bias=args["bias"],
                           feedforward=args["feedforward"])


def test_fp4_and_trainable_nf4_weights_are_refused(device):
    import bitsandbytes.functional as F

    x = torch.randn(3, K, device=device)
    ia3 = torch.ones(N, device=device)
    with torch.compiler.set_stance("force_eager"):
        packed, fp4_state = F.quantize_4bit(torch.randn(N, K, device=device), quant_type="fp4")
    with pytest.raises(ValueError, match="'fp4'"):
        ops.ia3_linear(x, packed, ia3, quant_state=fp4_state)
    packed, state = nf4.quantize(torch.randn(N, K, device=device), quant_storage=torch.bfloat16)
    with pytest.raises(ValueError, match="NF4 weight cannot take a gradient"):
        ops.ia3_linear(x, packed.requires_grad_(), ia3, quant_state=state)
