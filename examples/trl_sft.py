"""TRL's SFTTrainer on lowrank's kernels, both ways, each a one-line change to a TRL script:

1. ``lowrank.patch_model(model, rank=16)``, then ``SFTTrainer(model=model, ...)`` with no
   ``peft_config``: the trainer trains the patched model's adapters.
2. An existing PEFT pipeline: ``SFTTrainer(model=model, peft_config=LoraConfig(...))`` makes the
   model a PeftModel; ``lowrank.patch_peft_model(trainer.model)`` before ``trainer.train()`` runs its
   LoRA layers on our kernels. Everything else (saving, adapter switching) stays PEFT's.

A tiny Llama built from a config and a word-level tokenizer built in memory stand in for a
pretrained model, so the example runs offline in seconds:

    python examples/trl_sft.py          # needs `pip install trl`

On CUDA the ops run as Triton kernels; on a CPU as lowrank's reference (plain PyTorch), or in
Triton's interpreter with TRITON_INTERPRET=1 (slow).
"""

import sys
import tempfile

import torch
from datasets import Dataset
from peft import LoraConfig
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

import lowrank

SENTENCES = [
    "low rank adapters train a few weights of a frozen model",
    "the frozen model keeps its weights packed in four bits",
    "fused kernels read the packed weights in place",
    "a trainer calls the model and the adapters learn",
    "the adapter is saved apart from the model",
    "many adapters can share one frozen model",
]


def word_tokenizer():
    """A word-level tokenizer over SENTENCES' words, with pad / eos / unk tokens."""
    words = sorted({word for sentence in SENTENCES for word in sentence.split()})
    vocab = {token: i for i, token in enumerate(["<pad>", "</s>", "<unk>", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny_llama(vocab_size):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        vocab_size=vocab_size))


def train(way, output_dir, steps=3):
    """Train a tiny Llama with SFTTrainer, patched ``way`` ("patch_model" or "patch_peft_model");
    return the trainer after ``steps`` steps."""
    tokenizer = word_tokenizer()
    model = tiny_llama(len(tokenizer))
    args = SFTConfig(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=2,
                     learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no",
                     max_length=16, use_cpu=not torch.cuda.is_available())
    dataset = Dataset.from_dict({"text": SENTENCES})
    if way == "patch_model":
        lowrank.patch_model(model, rank=8)                                      # the one line
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset,
                             processing_class=tokenizer)
    else:
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset,
                             processing_class=tokenizer,
                             peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                    target_modules="all-linear"))
        print(lowrank.patch_peft_model(trainer.model))                          # the one line
    trainer.train()
    return trainer


def main():
    for way in ("patch_model", "patch_peft_model"):
        with tempfile.TemporaryDirectory() as directory:
            trainer = train(way, directory, steps=10)
            losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
            print(f"{way}: losses {[round(loss, 3) for loss in losses]}")
            trainer.save_model(directory)  # the adapter, in PEFT's format
    return 0


if __name__ == "__main__":
    sys.exit(main())
