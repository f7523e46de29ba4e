"""QLoRA fine-tuning on several processes with the Hugging Face Trainer (DDP through Accelerate).

Every process loads the 4-bit model and patches it the same way; the Trainer wraps it in
DistributedDataParallel (only the adapter weights train, so only they are all-reduced), gives each
process its share of every batch, and ``trainer.save_model`` writes the adapter in PEFT's format
from the main process alone.

    torchrun --nproc_per_node 2 examples/distributed_finetune.py --output-dir out      # 2 GPUs
    accelerate launch --multi_gpu --num_processes 2 examples/distributed_finetune.py --output-dir out
    torchrun --nproc_per_node 2 examples/distributed_finetune.py --output-dir out --cpu  # CPU, gloo
    accelerate launch --multi_gpu --num_processes 2 examples/distributed_finetune.py --output-dir out --cpu

On a machine without GPUs accelerate starts one process unless told ``--multi_gpu`` (its
``--cpu`` cannot be combined with it); ``--cpu`` here makes the Trainer's Accelerator run on the
CPU with gloo (``use_cpu``, i.e. ``Accelerator(cpu=True)``), so the processes train together.

``--model`` takes a causal LM (a hub name or a folder); without it the script builds a small Llama
from a config (nothing to download) in the output folder. The data are random tokens: this shows
the mechanics, not a recipe.
"""

import argparse
import os

import torch
from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM,
                          Trainer, TrainingArguments)

import lowrank


def small_llama(directory):
    """A one-block Llama (hidden 32) saved once, by the first process to get here."""
    if not os.path.exists(os.path.join(directory, "config.json")):
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
        LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--model", help="causal LM to fine-tune (default: a small Llama)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2, help="per process")
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--cpu", action="store_true", help="train on CPU (gloo) even with GPUs")
    args = parser.parse_args()

    training = TrainingArguments(output_dir=args.output_dir, max_steps=args.steps,
                                 learning_rate=1e-2, per_device_train_batch_size=args.batch_size,
                                 logging_steps=1, report_to=[], save_strategy="no",
                                 use_cpu=args.cpu or not torch.cuda.is_available())
    model_path = args.model
    if model_path is None:
        with training.main_process_first(desc="building the small Llama"):
            model_path = small_llama(os.path.join(args.output_dir, "base"))
    # One process per GPU: each loads the whole 4-bit model onto its own device. bf16 on GPUs;
    # fp32 on CPU, the dtype the CPU runs of tests/test_distributed.py check.
    device = "cpu" if training.use_cpu else training.device
    dtype = torch.float32 if training.use_cpu else torch.bfloat16
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=quantization,
                                                 dtype=dtype, device_map={"": device})
    lowrank.patch_model(model, rank=args.rank)
    if training.process_index == 0:
        lowrank.print_trainable_parameters(model)

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.steps * args.batch_size * training.world_size, args.length),
                        generator=torch.Generator().manual_seed(0))
    trainer = Trainer(model=model, args=training,
                      train_dataset=[{"input_ids": row, "labels": row} for row in ids])
    trainer.train()
    trainer.save_model(os.path.join(args.output_dir, "adapter"))  # PEFT format, main process only
    trainer.save_state()  # trainer_state.json in the output folder: the logged losses
    if training.process_index == 0:
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        print(f"{training.world_size} processes, losses {losses}; adapter saved to "
              f"{os.path.join(args.output_dir, 'adapter')}")


if __name__ == "__main__":
    main()
