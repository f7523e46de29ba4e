"""A whole QLoRA training step (forward + backward, gradient checkpointing on) of a Llama built from
a config and loaded in 4-bit (NF4, double quant, bf16 compute), rank 16 on every linear layer:
PEFT + bitsandbytes vs the same PeftModel after ``lowrank.patch_peft_model`` vs a base patched by
``lowrank.patch_model`` carrying the same adapter (loaded from PEFT's save), in one run.

Shape: (batch, sequence, hidden, layers, intermediate). The default is the ~1B-parameter model of
the issue (hidden 2048, 16 layers, intermediate 5632, sequence 2048, batch 4). Metrics: tokens/s
of each, speed-ups, and peak memory. The guard: the three losses on one batch agree.
"""

import tempfile

import torch

from bench.harness import IncorrectResult, headline_metrics

RANK = 16
SHAPES = [(4, 2048, 2048, 16, 5632)]
QUICK_SHAPES = [(4, 512, 2048, 16, 5632)]
VOCAB = 32000


def _load_4bit(directory, device):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization,
                                                 dtype=torch.bfloat16, device_map=device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _step(model):
    def call(tokens):
        for parameter in model.parameters():
            parameter.grad = None
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        return loss
    return call


def run(runner, floors, shapes):
    return [step_case(runner, floors, shape) for shape in shapes]


def step_case(runner, floors, shape, use_dora=False):
    """The case of one shape; ``use_dora``: the adapter is DoRA (``bench.dora_linear`` runs it)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import lowrank

    batch, sequence, hidden, layers, intermediate = shape
    vocab = min(VOCAB, 16 * hidden)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers,
                         intermediate_size=intermediate, num_attention_heads=max(1, hidden // 128),
                         vocab_size=vocab, max_position_embeddings=sequence)
    inputs = runner.rotating(
        lambda: (torch.randint(0, vocab, (batch, sequence), device=runner.device),), 0)
    with tempfile.TemporaryDirectory() as directory:
        torch.manual_seed(0)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(f"{directory}/base")
        peft_model = get_peft_model(_load_4bit(f"{directory}/base", runner.device),
                                    LoraConfig(r=RANK, lora_alpha=2 * RANK, use_dora=use_dora,
                                               target_modules="all-linear"))
        with torch.no_grad():  # a trained-looking adapter: B is not zero
            for name, parameter in peft_model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.02)
        peft_model.save_pretrained(f"{directory}/adapter")
        # The first adapter loaded is active and trainable, as after patch_model.
        patched = lowrank.load_adapter(_load_4bit(f"{directory}/base", runner.device),
                                       f"{directory}/adapter")

        tokens = next(inputs)
        losses = {"peft": _step(peft_model)(*tokens).item()}
        timings = {"peft": runner.time(_step(peft_model), inputs)}
        memory = {"peft": runner.peak_memory_bytes(_step(peft_model), inputs)}
        lowrank.patch_peft_model(peft_model)
        for name, model in (("lowrank_patch_peft_model", peft_model), ("lowrank", patched)):
            losses[name] = _step(model)(*tokens).item()
            timings[name] = runner.time(_step(model), inputs)
            memory[name] = runner.peak_memory_bytes(_step(model), inputs)
    op = "dora_train_step" if use_dora else "train_step"
    if max(losses.values()) - min(losses.values()) > 2e-2 * abs(losses["peft"]):
        raise IncorrectResult(f"{op}: losses disagree on one batch: {losses}")
    return {
        "op": op, "shape": [batch, sequence, hidden, layers, intermediate],
        "params": {"base": "nf4", "rank": RANK, "dtype": "bfloat16",
                   "gradient_checkpointing": True, "use_dora": use_dora},
        "timings_ms": timings, "peak_memory_bytes": memory,
        "metrics": {**headline_metrics(timings, floors),
                    **{f"tokens_per_s_{name}": batch * sequence / t["median"] * 1e3
                       for name, t in timings.items()}},
    }
