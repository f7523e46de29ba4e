"""A tiny Llama and its tokenizer, built locally (no hub), for the trainer integration runs.

    python tests/integration/tiny_model.py DIR

writes a Hugging Face model directory (fp32 weights, a byte-level BPE tokenizer trained on
examples/data/alpaca_tiny.jsonl) that Axolotl's ``base_model:`` and LLaMA-Factory's
``model_name_or_path:`` load like any other. Byte-level, so every prompt template tokenizes without
unknown tokens. Seeded: the same directory on every machine.
"""

import json
import os
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "examples", "data", "alpaca_tiny.jsonl")
SPECIALS = ["<pad>", "<s>", "</s>"]


def build_tokenizer():
    with open(DATA) as f:
        texts = [" ".join(json.loads(line).values()) for line in f if line.strip()]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIALS, initial_alphabet=alphabet))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def build(directory):
    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: python {sys.argv[0]} DIR")
    print(build(sys.argv[1]))
