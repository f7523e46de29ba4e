"""Helpers shared by the test files (and the distributed workers, which import this module
directly): oracles, tiny models, op cases and comparisons. Test files import from here, never from
each other; conftest.py keeps pytest's hooks and fixtures.

TRITON_INTERPRET must be set before triton (and so lowrank) is imported: on a machine without CUDA
it is set here, first, as in conftest.py, because a worker subprocess imports this module without
pytest."""

import math
import os
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from lowrank import nf4, ops, reference  # noqa: E402


def poisoned(shape, dtype, device):
    """An output buffer full of NaN: any element a kernel fails to write stays NaN."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def load_tiny_4bit_llama(directory, compute_dtype, double_quant=True, cpu_repack=False,
                         **from_pretrained_kwargs):
    """A one-layer Llama saved to ``directory`` and loaded back in 4-bit (NF4, double quant unless
    ``double_quant=False``) on CPU, exactly as users load one: every linear becomes a bitsandbytes
    Linear4bit with a Params4bit. The same arguments give the same weights.

    bitsandbytes picks by the CPU whether a Linear4bit in eval mode without grad repacks its
    weight for its AVX512-BF16 kernel (``support_avx512bf16_for_cpu``); here ``cpu_repack`` picks,
    so that a test takes the same branch on every machine. Off by default: oracles stay on the
    standard layout (the repack crashes for this model's down_proj, in_features 96)."""
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    LlamaForCausalLM(config).save_pretrained(directory)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=double_quant,
                                      bnb_4bit_compute_dtype=compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization,
                                                 device_map="cpu", **from_pretrained_kwargs)
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = cpu_repack
    return model


def decode_nf4(packed, quant_state, absmax_dtype=torch.float32):
    """The fp32 weight that NF4 bytes in bitsandbytes' standard layout stand for, decoded from the
    format itself, independently of lowrank and of bitsandbytes' kernels: code[nibble] x the
    absmax of its block; a nested absmax is dynamic_map[its code] x the scale of its nested block
    + offset. Element 2i is the high nibble of byte i. ``absmax_dtype=torch.bfloat16``: each
    absmax rounded to bf16 first, as bitsandbytes' CPU repacking stores it and computes with it."""
    import bitsandbytes.functional as F

    absmax = quant_state.absmax.float()
    if quant_state.nested:
        state2 = quant_state.state2
        scale = state2.absmax.float().repeat_interleave(state2.blocksize)[: absmax.numel()]
        absmax = F.create_dynamic_map()[quant_state.absmax.long()] * scale + quant_state.offset
    absmax = absmax.to(absmax_dtype).float()
    n = quant_state.shape.numel()
    packed = packed.detach().view(torch.uint8).reshape(-1)
    nibbles = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n].long()
    values = F.get_4bit_type("nf4", device="cpu")[nibbles]
    return (values * absmax.repeat_interleave(quant_state.blocksize)[:n]).reshape(quant_state.shape)


def randomize_adapters(model, seed=3):
    """Random adapter weights (LoRA's B is zero after patching; IA3's l around 1), so that an
    adapter changes the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
            elif "ia3_l" in name:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=gen))


TINY_ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma", "gpt2", "bert")


def tiny_model(architecture, blocks=2, seed=0):
    """A model of ``architecture`` with hidden size 32 and ``blocks`` blocks, built from its config
    (no hub), with a head that returns ``.logits``; in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    decoder = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=blocks,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    model = {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**decoder)),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**decoder)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**decoder)),
        "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**decoder, head_dim=8)),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
            n_embd=32, n_layer=blocks, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0,
            eos_token_id=0)),
        "bert": lambda: tf.BertForMaskedLM(tf.BertConfig(
            hidden_size=32, num_hidden_layers=blocks, num_attention_heads=4, intermediate_size=48,
            vocab_size=64, max_position_embeddings=32)),
    }[architecture]()
    return model.eval()


def token_ids(batch=2, length=7, vocab_size=64, seed=1):
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def with_nan_after(tensor, spare=256):
    """``tensor`` (contiguous) copied into the start of a buffer whose rest is NaN (255 for
    integer dtypes: packed bytes): a kernel that reads past its end reads those."""
    fill = float("nan") if tensor.is_floating_point() else 255
    buffer = torch.full((tensor.numel() + spare,), fill, dtype=tensor.dtype, device=tensor.device)
    buffer[:tensor.numel()] = tensor.reshape(-1)
    return buffer[:tensor.numel()].view(tensor.shape)


def assert_same_bits(actual, expected):
    """Equal bit for bit (compared as bytes)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    mismatched = (actual.reshape(-1).view(torch.uint8) != expected.reshape(-1).view(torch.uint8)).sum()
    assert mismatched.item() == 0, f"{mismatched.item()} bytes differ"


def bnb_quantize(w, blocksize, double_quant, quant_storage=torch.uint8):
    """bitsandbytes' (packed, absmax, (offset, nested_absmax) or None) for ``w``.

    On CPU, bitsandbytes' C++ library double-quantizes absmax with an approximate search (about 3%
    of codes are not the nearest); its CUDA kernel and portable backend pick the nearest, as we
    do, so on CPU the nested oracle is the portable backend, called directly."""
    import bitsandbytes.functional as F

    with torch.compiler.set_stance("force_eager"):  # bitsandbytes compiles its CPU ops otherwise
        if w.is_cuda:
            packed, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                            quant_type="nf4", quant_storage=quant_storage)
            nested = (state.offset, state.state2.absmax) if double_quant else None
            return packed, state.absmax, nested
        packed, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=False,
                                        quant_type="nf4", quant_storage=quant_storage)
        if not double_quant:
            return packed, state.absmax, None
        offset = state.absmax.mean()
        portable = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
        codes, nested_absmax = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
            portable, state.absmax - offset, F.create_dynamic_map(), 256)
        return packed, codes, (offset, nested_absmax)


def dense_llama_twin(directory, weights):
    """The dense model ``load_tiny_4bit_llama`` saved to ``directory``, in fp32, with the weights
    of its linear layers replaced by ``weights`` ({module path: (out, in) tensor}): what a 4-bit
    model computes, computed by torch alone. In eval mode."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        for path, weight in weights.items():
            model.get_submodule(path).weight.copy_(weight)
    return model.eval()


def linear4bit_layers(model):
    """{module path: bitsandbytes Linear4bit} of a model, paths as in the unpatched model (the
    same inside patched layers and PEFT models)."""
    from bitsandbytes.nn import Linear4bit

    return {n.removeprefix("base_model.model.").removesuffix(".base_layer"): m
            for n, m in model.named_modules() if isinstance(m, Linear4bit)}


def repacked_for_cpu(layer):
    """True when bitsandbytes has repacked this Linear4bit's weight for its CPU kernel."""
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


def run_bitsandbytes_in_eval(model, ids, cpu_repack):
    """Run the unpatched tiny 4-bit Llama in eval mode without grad, as users do for a baseline
    before fine-tuning; return the paths of the layers bitsandbytes repacked for its CPU kernel.
    With the repack on (``support_avx512bf16_for_cpu``), it repacks every weight it runs and
    crashes on down_proj (in_features 96 is no multiple of blocksize 64), after decoding its
    nested absmax in place: the state a user is left with."""
    model.eval()
    with torch.no_grad():
        if cpu_repack:
            with pytest.raises(RuntimeError, match="is invalid for input of size 96"):
                model(ids)
        else:
            model(ids)
    return {n for n, m in linear4bit_layers(model).items() if repacked_for_cpu(m)}


def as_loaded(model):
    """{path: (packed bytes, quant state)} copies of a 4-bit model's Linear4bit weights."""
    import copy

    return {n: (m.weight.data.clone(), copy.deepcopy(m.weight.quant_state))
            for n, m in linear4bit_layers(model).items()}


def as_held(model):
    """{path: (packed bytes, absmax, repacked or not)} of a 4-bit model's Linear4bit weights, to
    check later that nothing rewrote them."""
    return {n: (m.weight.data.clone(), m.weight.quant_state.absmax.clone(), repacked_for_cpu(m))
            for n, m in linear4bit_layers(model).items()}


def assert_held(model, held):
    now = as_held(model)
    assert now.keys() == held.keys()
    for name, (data, absmax, repacked) in held.items():
        assert torch.equal(now[name][0], data) and torch.equal(now[name][1], absmax), name
        assert now[name][2] == repacked, name


def weights_bitsandbytes_computes_with(loaded, repacked):
    """{path: fp32 weight} a 4-bit model computes with: decoded from the bytes and states it was
    loaded with; where bitsandbytes repacked a weight, with each absmax rounded to bf16 as the
    repack stores it."""
    return {n: decode_nf4(packed, state, torch.bfloat16 if n in repacked else torch.float32)
            for n, (packed, state) in loaded.items()}


# The lowrank.ops.lora_linear cases: odd shapes, not multiples of any block (M = 37 over leading
# dims 37 x 1, K = 97, N = 83). TOLERANCE is an op's, relative to the largest reference value, per
# dtype (the products run in x's dtype with fp32 accumulation).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}
M, K, N = 37, 97, 83


def assert_op_close(actual, expected, dtype, what, tolerance=None):
    assert actual.dtype == dtype and actual.shape == expected.shape, what
    assert not actual.isnan().any(), f"{what}: NaN (an element left unwritten?)"
    tolerance = tolerance or TOLERANCE[dtype]
    error = ((actual.double() - expected).abs().max() / expected.abs().max()).item()
    assert error <= tolerance, f"{what}: relative error {error:.2e} > {tolerance}"


def make_weight(kind, dtype, device, gen, k=K):
    """(weight as the op takes it, quant_state, the dense fp32 values it stands for)."""
    w = (torch.randn(N, k, generator=gen) * 0.05).to(device)
    if kind == "dense":
        return w.to(dtype), None, w.to(dtype).float()
    blocksize, nested = {"nf4-64": (64, False), "nf4-nested-128": (128, True)}[kind]
    packed, state = nf4.quantize(w.to(dtype), blocksize=blocksize, double_quant=nested)
    return packed, state, nf4.dequantize(packed, state, dtype=torch.float32)


def make_lora_case(dtype, kind, rank, device, seed=0, adapter_dtype=torch.float32, m=M, k=K):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 1, k, generator=gen).to(device, dtype)
    weight, state, dense = make_weight(kind, dtype, device, gen, k)
    lora_a = (torch.randn(rank, k, generator=gen) / math.sqrt(k)).to(device, adapter_dtype)
    lora_b = (torch.randn(N, rank, generator=gen) * 0.1).to(device, adapter_dtype)
    bias = torch.randn(N, generator=gen).to(device, dtype)
    return x, weight, state, dense, lora_a, lora_b, bias


def lora_linear_fp64(x, dense, lora_a, lora_b, scaling, bias, grad_y, dropout=0.0, mask=None):
    leaves = [t.detach().double().requires_grad_() for t in (x, lora_a, lora_b)]
    y = reference.lora_linear(leaves[0], dense.double(), leaves[1], leaves[2], scaling,
                              None if bias is None else bias.double(), dropout,
                              dropout_mask=mask)
    y.backward(grad_y.double())
    return y.detach(), *(leaf.grad for leaf in leaves)


def run_lora_linear(x, weight, state, lora_a, lora_b, scaling, bias, grad_y, dropout=0.0):
    x, lora_a, lora_b = (t.detach().requires_grad_() for t in (x, lora_a, lora_b))
    y = ops.lora_linear(x, weight, lora_a, lora_b, scaling, bias=bias, dropout=dropout,
                        quant_state=state)
    y.backward(grad_y)
    return y.detach(), x.grad, lora_a.grad, lora_b.grad


def check_lora_linear_against_fp64(dtype, kind, rank, with_bias, device,
                                   adapter_dtype=torch.float32, m=M, k=K):
    x, weight, state, dense, lora_a, lora_b, bias = make_lora_case(
        dtype, kind, rank, device, adapter_dtype=adapter_dtype, m=m, k=k)
    bias = bias if with_bias else None
    grad_y = torch.randn(m, 1, N, generator=torch.Generator().manual_seed(9)).to(device, dtype)
    ours = run_lora_linear(x, weight, state, lora_a, lora_b, 1.5, bias, grad_y)
    expected = lora_linear_fp64(x, dense, lora_a, lora_b, 1.5, bias, grad_y)
    for name, got, want, got_dtype in zip(("y", "dx", "dA", "dB"), ours, expected,
                                          (dtype, dtype, adapter_dtype, adapter_dtype)):
        # Adapter gradients come back in the adapter's dtype, rounded to it.
        tolerance = max(TOLERANCE[dtype], TOLERANCE[got_dtype])
        assert_op_close(got, want, got_dtype, name, tolerance)


IA3_FORMS = {"output": False, "feedforward": True}


# The lowrank.ops.ia3_linear cases: the same shapes as lora_linear's; l as PEFT stores it.
def make_ia3_case(dtype, kind, feedforward, device, seed=0, ia3_dtype=torch.float32, tokens=M):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 1, K, generator=gen).to(device, dtype)
    weight, state, dense = make_weight(kind, dtype, device, gen)
    # l as PEFT stores it: (1, K) for the feed-forward form, (N, 1) for the output form.
    shape = (1, K) if feedforward else (N, 1)
    ia3 = (1 + 0.5 * torch.randn(shape, generator=gen)).to(device, ia3_dtype)
    bias = torch.randn(N, generator=gen).to(device, dtype)
    return x, weight, state, dense, ia3, bias


def ia3_linear_fp64(x, dense, ia3, bias, feedforward, grad_y):
    leaves = [t.detach().double().requires_grad_() for t in (x, ia3)]
    y = reference.ia3_linear(leaves[0], dense.double(), leaves[1],
                             None if bias is None else bias.double(), feedforward)
    y.backward(grad_y.double())
    return y.detach(), *(leaf.grad for leaf in leaves)


def run_ia3_linear(x, weight, state, ia3, bias, feedforward, grad_y):
    x, ia3 = (t.detach().requires_grad_() for t in (x, ia3))
    y = ops.ia3_linear(x, weight, ia3, bias=bias, feedforward=feedforward, quant_state=state)
    y.backward(grad_y)
    return y.detach(), x.grad, ia3.grad


def check_ia3_linear_against_fp64(dtype, kind, form, with_bias, device):
    feedforward = IA3_FORMS[form]
    x, weight, state, dense, ia3, bias = make_ia3_case(dtype, kind, feedforward, device)
    bias = bias if with_bias else None
    grad_y = torch.randn(M, 1, N, generator=torch.Generator().manual_seed(9)).to(device, dtype)
    ours = run_ia3_linear(x, weight, state, ia3, bias, feedforward, grad_y)
    expected = ia3_linear_fp64(x, dense, ia3, bias, feedforward, grad_y)
    assert ours[2].shape == ia3.shape  # dl in l's own shape and dtype
    for name, got, want, got_dtype in zip(("y", "dx", "dl"), ours, expected,
                                          (dtype, dtype, torch.float32)):
        assert_op_close(got, want, got_dtype, name, TOLERANCE[dtype])


EMPTY = {"M=0": (0, 5, 7), "N=0": (3, 5, 0), "K=0": (3, 0, 7), "all=0": (0, 0, 0)}  # (M, K, N)


def check_empty(call, shape, inputs, device):
    """``call(module, weight, x=..., **inputs)`` with ``lowrank.ops`` and ``lowrank.reference``,
    for x (M x 2 x K), a dense (N x K) weight and ``inputs`` {name: tensor}, all requiring grad:
    the same output, and for each input a gradient of its shape with the reference's values
    (zeros where nothing flows). Returns the output."""
    m, k, n = shape
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(1)).to(device)
    inputs = {"x": torch.randn(m, 2, k).to(device), **inputs}
    results = []
    for module in (ops, reference):
        leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.items()}
        y = call(module, weight, **leaves)
        y.backward(torch.ones_like(y))
        results.append((y.detach(), {name: t.grad for name, t in leaves.items()}))
    (y, grads), (y_ref, grads_ref) = results
    assert y.shape == (m, 2, n) and torch.equal(y, y_ref)
    for name, t in inputs.items():
        assert grads[name] is not None and grads[name].shape == t.shape, name
        assert torch.equal(grads[name], grads_ref[name]), name
    return y


# Whole models: a patched model against PEFT on the same weights.
# fp32: patched vs PEFT is the same math in another order (fused kernels accumulating in fp32 vs
# torch's GEMMs), relative to the largest value.
FP32_TOLERANCE = 2e-5
# 16-bit: a whole model in bf16/fp16 is far from its fp32 self (PEFT's own logits ~2e-2 in bf16,
# gradients ~1e-1), so both are compared with PEFT run in fp32 on the same weights: ours may be at
# most RATIO times PEFT's error, plus the dtype's rounding. (The measured factor was up to ~2.5
# while our LoRA branch ran in the compute dtype; with fp32 adapters it now runs near-fp32, as
# PEFT's runs in fp32.)
RATIO, ROUNDING = 3.0, {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def assert_model_close(actual, expected, tolerance, what):
    assert actual.shape == expected.shape, what
    error = relative_error(actual, expected)
    assert error <= tolerance, f"{what}: relative error {error:.2e} > {tolerance}"


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def make_lora_projection(n, k, rank, dtype, kind, device, gen, scaling, with_bias=False,
                         dropout=0.0):
    """An ``ops.LoraProjection`` of a fused block's test: W (n x k) dense or NF4 ("nf4",
    "nf4-nested"), fp32 lora_A / lora_B (and the bias, when asked) as leaves that require grad."""
    w = (torch.randn(n, k, generator=gen) / math.sqrt(k)).to(device, dtype)
    state = None
    if kind != "dense":
        w, state = nf4.quantize(w, blocksize=64, double_quant=kind == "nf4-nested")
    lora_A = (torch.randn(rank, k, generator=gen) / math.sqrt(k)).to(device).requires_grad_()
    lora_B = (torch.randn(n, rank, generator=gen) * 0.3).to(device).requires_grad_()
    bias = (torch.randn(n, generator=gen) * 0.1).to(device, dtype).requires_grad_() \
        if with_bias else None
    return ops.LoraProjection(w, lora_A, lora_B, scaling, bias, dropout, state)


def projection_leaves(x, projections):
    """{name: leaf} of x and every projection's trainable tensors ({name: LoraProjection})."""
    return {"x": x, **{f"{name}.{part}": getattr(p, part) for name, p in projections.items()
                       for part in ("lora_A", "lora_B", "bias") if getattr(p, part) is not None}}


def projection_linear(x, p):
    """One projection as a patched layer runs it alone: ``ops.lora_linear``."""
    return ops.lora_linear(x, p.weight, p.lora_A, p.lora_B, p.scaling, bias=p.bias,
                           dropout=p.dropout, quant_state=p.quant_state)


def assert_fused_close(actual, expected, tolerance, what):
    """A fused block op's result against the layers run one by one: same dtype and shape, no NaN,
    and within ``tolerance`` relative to the largest expected value."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    assert not actual.isnan().any(), f"{what}: NaN"
    error = relative_error(actual, expected)
    assert error <= tolerance, f"{what}: relative error {error:.2e} > {tolerance}"


def with_peft(base, names, rank, alpha, use_rslora=False):
    """PEFT's LoRA on ``base`` over exactly the modules ``names``."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(names), lora_dropout=0.0,
                        use_rslora=use_rslora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out is switched on for GPT-2's Conv1D
        return get_peft_model(base, config)


def loss_and_grads(model, ids):
    model.zero_grad()
    logits = model(ids).logits
    logits.float().square().mean().backward()
    grads = {n.removeprefix("base_model.model."): p.grad for n, p in model.named_parameters()
             if p.requires_grad}
    return logits.detach(), grads


def compiled_recording_graphs(model, **options):
    """(``torch.compile(model, **options)`` on aot_eager, the list it appends each graph dynamo
    hands it to): dynamo's caches and counters are reset first, so an earlier test's compiles
    count neither as graphs nor as graph breaks here."""
    from torch._dynamo.utils import counters

    graphs = []

    def recording_backend(graph, example_inputs):
        graphs.append(graph)
        return torch._dynamo.lookup_backend("aot_eager")(graph, example_inputs)

    torch._dynamo.reset()
    counters.clear()
    return torch.compile(model, backend=recording_backend, **options), graphs


def train_losses(model, batches, optimizer, steps):
    """Losses of ``steps`` optimizer steps of causal-LM training, cycling through ``batches``."""
    losses = []
    for step in range(steps):
        ids = batches[step % len(batches)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses
