"""Test set-up. On a machine without CUDA the kernels run in Triton's interpreter: TRITON_INTERPRET
must be set before triton (and so lowrank) is imported, which is why it is set here, first. bf16 in
the interpreter is lowrank's own business (kernels/_interpreter.py): nothing here patches Triton."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """Where kernels run in this session: the GPU if there is one, else the CPU (interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def poisoned(shape, dtype, device):
    """An output buffer full of NaN: any element a kernel fails to write stays NaN."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def load_tiny_4bit_llama(directory, compute_dtype, double_quant=True, **from_pretrained_kwargs):
    """A one-layer Llama saved to ``directory`` and loaded back in 4-bit (NF4, double quant unless
    ``double_quant=False``) on CPU, exactly as users load one: every linear becomes a bitsandbytes
    Linear4bit with a Params4bit. The same arguments give the same weights."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    LlamaForCausalLM(config).save_pretrained(directory)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=double_quant,
                                      bnb_4bit_compute_dtype=compute_dtype)
    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization,
                                                device_map="cpu", **from_pretrained_kwargs)


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
