"""The demo of lowrank's main job: QLoRA fine-tuning of a 4-bit model with fused kernels.

1. A small Llama loaded in 4-bit (bitsandbytes NF4, double quant) exactly as users load one;
   lowrank reads every packed NF4 weight in place and checks it against bitsandbytes bit for bit.
2. ``lowrank.patch_model(model, rank=16)``: every linear layer but the head gets a LoRA adapter.
3. A few training steps with a plain torch loop on one small batch: the loss goes down.
4. ``lowrank.save_adapter`` writes a PEFT-format adapter; loaded onto a freshly loaded base it
   gives the same outputs.
5. ``lowrank.merge_and_unload`` merges the adapter into dense 16-bit weights (from the packed NF4
   weights, losslessly up to the bf16 rounding): plain ``nn.Linear`` layers, no 4-bit left, the
   same outputs as the adapter model within bf16 tolerance.

    ./run demo                      # or: python examples/demo.py

On CUDA the ops run as Triton kernels; on a CPU as lowrank's reference (plain PyTorch), or as the
same Triton kernels in Triton's interpreter with TRITON_INTERPRET=1 (much slower).
"""

import os
import tempfile
import time

import bitsandbytes.functional as F
import torch
from bitsandbytes.nn import Linear4bit
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import lowrank
from lowrank._dispatch import backend_name

VOCAB = 1000
MERGE_TOLERANCE = 2e-2  # relative to the largest logit: bf16 weights and bf16 compute


def save_small_llama(directory):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, vocab_size=VOCAB)
    LlamaForCausalLM(config).save_pretrained(directory)


def load_4bit(directory, device):
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization,
                                                device_map=device, dtype=torch.bfloat16)


def check_nf4_against_bitsandbytes(model):
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Linear4bit)}
    started = time.perf_counter()
    for name, layer in layers.items():
        packed, state = layer.weight, layer.weight.quant_state
        weight = lowrank.nf4.dequantize(packed, state)  # reads the Params4bit in place
        exact = torch.equal(weight, F.dequantize_4bit(packed.data, state, quant_type="nf4"))
        again, _ = lowrank.nf4.quantize(weight, blocksize=state.blocksize, double_quant=False)
        if not (exact and torch.equal(again.view(torch.uint8), packed.data.view(torch.uint8))):
            raise SystemExit(f"{name}: lowrank disagrees with bitsandbytes")
    print(f"1. {len(layers)} NF4 layers: dequantized bit-exact with bitsandbytes, requantized to the "
          f"same bytes ({time.perf_counter() - started:.2f} s)")


def train(model, batch, steps=8):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(steps):
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"lowrank {lowrank.__version__}: ops on {device} run as {backend_name(device)}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        base_dir, adapter_dir = os.path.join(directory, "base"), os.path.join(directory, "adapter")
        save_small_llama(base_dir)
        model = load_4bit(base_dir, device)
        check_nf4_against_bitsandbytes(model)

        lowrank.patch_model(model, rank=16)
        print("2. patched:", end=" ")
        lowrank.print_trainable_parameters(model)

        # One small batch of 4 sequences of 32 tokens, learned by heart.
        batch = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1)).to(device)
        losses = train(model, batch)
        print(f"3. trained {len(losses)} steps: loss {' '.join(f'{x:.3f}' for x in losses)}")
        if not losses[-1] < losses[0]:
            raise SystemExit("the loss did not go down")

        lowrank.save_adapter(model, adapter_dir)
        size = os.path.getsize(os.path.join(adapter_dir, "adapter_model.safetensors"))
        reloaded = lowrank.load_adapter(load_4bit(base_dir, device), adapter_dir)
        with torch.no_grad():
            logits = model(batch).logits
            same = torch.equal(reloaded(batch).logits, logits)
        print(f"4. saved a PEFT-format adapter ({sorted(os.listdir(adapter_dir))}, {size / 1e6:.1f} MB); "
              f"reloaded onto a fresh 4-bit base: {'identical logits' if same else 'DIFFERENT logits'}")
        if not same:
            raise SystemExit("the reloaded adapter computes something else")

        merged = lowrank.merge_and_unload(model)
        with torch.no_grad():
            merged_logits = merged(batch).logits
        error = ((merged_logits.float() - logits.float()).abs().max() / logits.float().abs().max()).item()
        kinds = sorted({type(m).__name__ for m in merged.model.layers.modules()
                        if isinstance(m, torch.nn.Linear)})
        print(f"5. merged and unloaded to {merged.model.layers[0].self_attn.q_proj.weight.dtype}: "
              f"layers {kinds}, quantized={merged.is_quantized}; logits vs the adapter model: "
              f"relative difference {error:.1e} (tolerance {MERGE_TOLERANCE:.0e})")
        if not error <= MERGE_TOLERANCE or merged.is_quantized:
            raise SystemExit("the merged model computes something else")
    print(f"done in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
