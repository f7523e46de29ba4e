"""The demo of lowrank's main job, as far as it has been built.

Now: a small Llama loaded in 4-bit (bitsandbytes NF4, double quant) exactly as users load one;
lowrank reads every packed NF4 weight in place and dequantizes it, and quantizes the result again,
checking both against bitsandbytes bit for bit. Patching with LoRA, training, saving and merging
join this demo as those features land.

    ./run demo                      # or: python examples/demo.py
"""

import tempfile
import time

import bitsandbytes.functional as F
import torch
from bitsandbytes.nn import Linear4bit
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import lowrank
from lowrank._dispatch import backend_name


def load_small_4bit_llama(directory, device):
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, vocab_size=1000)
    LlamaForCausalLM(config).save_pretrained(directory)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization,
                                                device_map=device)


def main():
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"lowrank {lowrank.__version__}: ops on {device} run as {backend_name(device)}")
    with tempfile.TemporaryDirectory() as directory:
        model = load_small_4bit_llama(directory, device)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Linear4bit)}
    print(f"{len(layers)} NF4 linear layers; checking each against bitsandbytes")
    print(f"{'layer':<34}{'shape':>12}{'dequantize':>12}{'requantize':>12}")
    started = time.perf_counter()
    for name, layer in layers.items():
        packed, state = layer.weight, layer.weight.quant_state
        weight = lowrank.nf4.dequantize(packed, state)  # reads the Params4bit in place
        exact = torch.equal(weight, F.dequantize_4bit(packed.data, state, quant_type="nf4"))
        again, _ = lowrank.nf4.quantize(weight, blocksize=state.blocksize, double_quant=False)
        stable = torch.equal(again.view(torch.uint8), packed.data.view(torch.uint8))
        shape = "x".join(map(str, state.shape))
        print(f"{name:<34}{shape:>12}{'bit-exact' if exact else 'DIFFERS':>12}"
              f"{'same bytes' if stable else 'DIFFERS':>12}")
        if not (exact and stable):
            raise SystemExit(f"{name}: lowrank disagrees with bitsandbytes")
    print(f"all {len(layers)} layers match bitsandbytes ({time.perf_counter() - started:.2f} s)")


if __name__ == "__main__":
    main()
