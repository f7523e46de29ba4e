"""QLoRA fine-tuning with lowrank, end to end: a causal LM in 4-bit, LoRA through the fused kernels,
transformers' Trainer, a PEFT-format adapter, a 16-bit merge and greedy generation.

1. Load the model in 4-bit (bitsandbytes NF4, double quant) and ``lowrank.patch_model(model, rank=16)``.
2. Fine-tune it with ``transformers.Trainer`` on an Alpaca-format JSONL (instruction / input /
   output; the loss counts the response tokens only). Progress bars and a loss log; the loss curve is
   written to ``<output>/loss.csv`` and ``<output>/loss.png``.
3. Save the adapter (PEFT's format) and load it onto a freshly loaded 4-bit base: the logits must be
   identical.
4. Merge it into 16-bit dense layers (``lowrank.merge_and_unload``): the logits must match the
   4-bit + adapter model's within bf16 rounding. Then generate greedily with the merged model.

Defaults run on a CPU in a minute or two with no network: a small Llama built from a config, with a
word-level tokenizer trained on the dataset at start (``tokenizers``), on the instructions in
``examples/data/alpaca_tiny.jsonl``. That base is random, so what it learns is the dataset by heart:
the prompts it is asked afterwards come from the training set. With ``--model`` it loads a real
Hugging Face model directory (weights and tokenizer) instead, e.g. on a GPU:

    python examples/qlora_finetune.py                                 # CPU defaults
    python examples/qlora_finetune.py --model ~/models/Llama-3.2-1B --data my.jsonl --steps 500 \\
        --batch-size 8 --max-length 512 --output runs/llama

On CUDA the ops run as Triton kernels; on a CPU as lowrank's reference ops (plain PyTorch), or as
the same Triton kernels in Triton's interpreter with TRITON_INTERPRET=1, which is far slower (tens
of seconds a step even for --smoke): there, run a few steps to see the kernels work end to end,

    TRITON_INTERPRET=1 python examples/qlora_finetune.py --smoke --steps 3 --batch-size 4
"""

import argparse
import csv
import json
import os
import tempfile
import time

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, LlamaConfig,
                          LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments)

import lowrank
from lowrank._dispatch import backend_name

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "data", "alpaca_tiny.jsonl")
IGNORE = -100  # label of the tokens the loss does not count (prompt, padding)
# Merged vs 4-bit + adapter logits, relative to the largest one, by the dtype the merged model runs
# in: its rounding through the whole model (bf16: 2.5e-2 measured with the CPU defaults, whose
# logits are large).
MERGE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a Hugging Face causal LM directory with its tokenizer "
                        "(default: a small Llama built from a config, random weights)")
    parser.add_argument("--data", default=DEFAULT_DATA, help="Alpaca-format JSONL (default: %(default)s)")
    parser.add_argument("--output", help="where the adapter, loss log and plot go (default: a "
                        "temporary directory, removed at the end)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, help="LoRA alpha (default: 2 * rank)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: 1e-2 for the small "
                        "random Llama, 2e-4 with --model)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64, help="tokens per example, longer ones cut")
    parser.add_argument("--compute-dtype", choices=("bfloat16", "float16", "float32"),
                        help="the 4-bit layers' compute dtype (default: bfloat16 on CUDA, float32 "
                        "on a CPU), which is also the dtype of the merged model")
    parser.add_argument("--prompts", type=int, help="training examples whose greedy answers are "
                        "checked against the dataset (default: all of them)")
    parser.add_argument("--show", type=int, default=3, help="answers to print (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a quick check of the whole pipeline: "
                        "a smaller model (hidden 64), at most 30 steps (what tests/test_examples.py runs)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps = min(args.steps, 30)
    if args.lr is None:
        args.lr = 2e-4 if args.model else 1e-2
    return args


# Data --------------------------------------------------------------------------------------------

def read_alpaca(path):
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for i, row in enumerate(rows):
        missing = {"instruction", "output"} - set(row)
        if missing:
            raise SystemExit(f"{path}: line {i + 1} lacks {sorted(missing)} (Alpaca format: "
                             "instruction, optional input, output)")
    return rows


def prompt_of(row):
    """The Alpaca prompt; the model learns to continue it with the row's output."""
    if row.get("input"):
        return (f"### Instruction:\n{row['instruction']}\n\n### Input:\n{row['input']}\n\n"
                "### Response:\n")
    return f"### Instruction:\n{row['instruction']}\n\n### Response:\n"


def build_word_tokenizer(rows):
    """A word-level tokenizer trained on the dataset (no download): every word and punctuation mark
    of the prompts and answers is one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([prompt_of(r) + r["output"] for r in rows],
                                  trainers.WordLevelTrainer(special_tokens=specials))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def encode(rows, tokenizer, max_length):
    """input_ids = prompt + output + eos; labels the same with the prompt masked out."""
    examples = []
    for row in rows:
        prompt = tokenizer(prompt_of(row))["input_ids"]
        answer = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + answer)[:max_length]
        labels = ([IGNORE] * len(prompt) + answer)[:max_length]
        if any(label != IGNORE for label in labels):
            examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        raise SystemExit(f"no example keeps an answer token within --max-length {max_length}")
    return examples


def collate(pad_id):
    def pad(batch):
        width = max(len(e["input_ids"]) for e in batch)
        rows = [(e["input_ids"], e["labels"], width - len(e["input_ids"])) for e in batch]
        return {"input_ids": torch.tensor([ids + [pad_id] * n for ids, _, n in rows]),
                "labels": torch.tensor([labels + [IGNORE] * n for _, labels, n in rows]),
                "attention_mask": torch.tensor([[1] * len(ids) + [0] * n for ids, _, n in rows])}
    return pad


# Model -------------------------------------------------------------------------------------------

def save_small_llama(directory, tokenizer, smoke, seed):
    """A small Llama with random weights, sized for a CPU, saved with its tokenizer.

    Its weights are drawn 10x wider than transformers' default (initializer_range 0.2, not 0.02):
    the frozen output head and norms of a random model otherwise keep every logit near zero, and
    no adapter on the linear layers could make a prediction confident (the loss would stall near
    the vocabulary's entropy)."""
    torch.manual_seed(seed)
    size = dict(hidden_size=64, intermediate_size=128) if smoke else dict(hidden_size=128,
                                                                          intermediate_size=256)
    config = LlamaConfig(**size, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=len(tokenizer), max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, initializer_range=0.2)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def load_4bit(directory, compute_dtype, device):
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=compute_dtype)
    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization,
                                                dtype=compute_dtype, device_map=device)


@torch.no_grad()
def generate(model, tokenizer, rows, device, max_new_tokens=24, batch_size=32):
    """Greedy answers to the rows' prompts, a batch of left-padded prompts at a time."""
    tokenizer.padding_side = "left"  # generation continues every prompt from its last token
    answers = []
    for start in range(0, len(rows), batch_size):
        batch = tokenizer([prompt_of(r) for r in rows[start:start + batch_size]], return_tensors="pt",
                          padding=True).to(device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        width = batch["input_ids"].shape[1]
        answers += [tokenizer.decode(o[width:], skip_special_tokens=True).strip() for o in out]
    return answers


def normalized(text):
    """Text compared word by word (the word-level tokenizer decodes with spaces around punctuation)."""
    return " ".join(text.replace(".", " .").replace(",", " ,").replace("!", " !").split())


def exact_matches(answers, rows):
    return sum(normalized(a) == normalized(r["output"]) for a, r in zip(answers, rows))


# Loss log ----------------------------------------------------------------------------------------

def write_loss_curve(history, directory):
    """``loss.csv`` (step, loss) and ``loss.png``; returns the png's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(directory, "loss.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss"])
        writer.writerows(history)
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(*zip(*history), marker=".")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("training loss (response tokens)")
    axes.set_title("QLoRA fine-tuning with lowrank")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    path = os.path.join(directory, "loss.png")
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# Main --------------------------------------------------------------------------------------------

def run(args, output):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    compute_dtype = getattr(torch, args.compute_dtype or ("bfloat16" if device == "cuda" else "float32"))
    # The merge is lossless into the dtype the 4-bit layers compute in, so the merged model runs
    # the same numbers as the 4-bit + adapter model, up to that dtype's rounding.
    merged_dtype = compute_dtype
    print(f"lowrank {lowrank.__version__}: ops on {device} run as {backend_name(device)}; "
          f"4-bit compute dtype {str(compute_dtype).removeprefix('torch.')}")
    started = time.perf_counter()
    rows = read_alpaca(args.data)

    if args.model:
        base_dir = args.model
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        base_dir = os.path.join(output, "base")
        tokenizer = build_word_tokenizer(rows)
        save_small_llama(base_dir, tokenizer, args.smoke, args.seed)
    examples = encode(rows, tokenizer, args.max_length)

    model = load_4bit(base_dir, compute_dtype, device)
    lowrank.patch_model(model, rank=args.rank, alpha=args.alpha)
    print("1. loaded in 4-bit (NF4, double quant) and patched:", end=" ")
    lowrank.print_trainable_parameters(model)
    prompts = rows[:args.prompts]
    model.eval()
    correct_before = exact_matches(generate(model, tokenizer, prompts, device), prompts)
    print(f"   before training: {correct_before}/{len(prompts)} greedy answers as in the dataset")

    training = TrainingArguments(
        output_dir=os.path.join(output, "trainer"), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
        lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 20), weight_decay=0.0,
        logging_steps=max(1, args.steps // 30), save_strategy="no", report_to=[], seed=args.seed,
        use_cpu=device == "cpu", dataloader_num_workers=0)
    trainer = Trainer(model=model, args=training, train_dataset=examples,
                      data_collator=collate(tokenizer.pad_token_id))
    trained = time.perf_counter()
    trainer.train()
    trained = time.perf_counter() - trained
    history = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    plot = write_loss_curve(history, output)
    first, last = history[0][1], history[-1][1]
    print(f"2. trained {args.steps} steps of {args.batch_size} examples ({len(examples)} in the "
          f"dataset) in {trained:.1f} s: loss {first:.3f} -> {last:.3f}; curve in {plot}")

    model.eval()
    adapter_dir = os.path.join(output, "adapter")
    lowrank.save_adapter(model, adapter_dir)
    size = os.path.getsize(os.path.join(adapter_dir, "adapter_model.safetensors"))
    reloaded = lowrank.load_adapter(load_4bit(base_dir, compute_dtype, device), adapter_dir).eval()
    batch = collate(tokenizer.pad_token_id)(examples[:8])
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        identical = torch.equal(model(**inputs).logits, reloaded(**inputs).logits)
    print(f"3. saved the adapter in PEFT's format ({size / 1e6:.2f} MB, {adapter_dir}); reloaded onto a "
          f"fresh 4-bit base: {'identical' if identical else 'DIFFERENT'} logits")
    if not identical:
        raise SystemExit("the reloaded adapter computes something else")
    del model

    adapted = generate(reloaded, tokenizer, prompts, device)
    correct = exact_matches(adapted, prompts)
    print(f"4. greedy answers of the 4-bit + adapter model: {correct}/{len(prompts)} as in the dataset "
          f"(before training: {correct_before}/{len(prompts)}), for example:")
    for row, answer in list(zip(prompts, adapted))[:args.show]:
        question = row["instruction"] + (f" [{row['input']}]" if row.get("input") else "")
        print(f"   {question}\n     -> {answer!r}   (dataset: {row['output']!r})")

    with torch.no_grad():
        adapter_logits = reloaded(**inputs).logits.float()
    # NF4 layers become nn.Linear in merged_dtype; the rest of the model follows (it was loaded in
    # the compute dtype, which merged_dtype is).
    merged = lowrank.merge_and_unload(reloaded, dtype=merged_dtype).to(merged_dtype)
    with torch.no_grad():
        merged_logits = merged(**inputs).logits.float()
    merge_error = ((merged_logits - adapter_logits).abs().max() / adapter_logits.abs().max()).item()
    tolerance = MERGE_TOLERANCE[merged_dtype]
    merged_answers = generate(merged, tokenizer, prompts, device)
    same = sum(a == b for a, b in zip(merged_answers, adapted))
    linears = sorted({type(m).__name__ for m in merged.modules() if isinstance(m, torch.nn.Linear)})
    print(f"5. merged and unloaded to {str(merged_dtype).removeprefix('torch.')} ({linears}, "
          f"quantized={merged.is_quantized}): logits vs the 4-bit + adapter model differ by "
          f"{merge_error:.1e} relative (tolerance {tolerance:.0e}); {same}/{len(prompts)} greedy "
          "answers the same as before the merge")
    if not merge_error <= tolerance or merged.is_quantized:
        raise SystemExit("the merged model computes something else")
    elapsed = time.perf_counter() - started
    print(f"\nsummary: {backend_name(device)} on {device}, {elapsed:.1f} s in all "
          f"({trained:.1f} s training)\n  loss {first:.3f} -> {last:.3f} in {args.steps} steps; "
          f"answers as in the dataset: {correct_before}/{len(prompts)} before training, "
          f"{correct}/{len(prompts)} after; reloaded adapter: identical logits; merged model: logits "
          f"within {merge_error:.1e}, {same}/{len(prompts)} answers as before the merge")
    return {"first_loss": first, "last_loss": last, "merge_error": merge_error,
            "correct_before": correct_before, "correct": correct, "same_as_unmerged": same,
            "prompts": len(prompts), "seconds": elapsed}


def main(argv=None):
    args = parse_args(argv)
    if args.output:
        os.makedirs(args.output, exist_ok=True)
        result = run(args, args.output)
    else:
        with tempfile.TemporaryDirectory() as output:
            result = run(args, output)
    if result["last_loss"] >= result["first_loss"]:
        raise SystemExit("the loss did not go down")
    return result


if __name__ == "__main__":
    main()
