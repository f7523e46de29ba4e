"""One rank of a Trainer run under DeepSpeed, started by tests/test_distributed.py under torchrun
(CPU, gloo, 2 processes, DS_ACCELERATOR=cpu): for ZeRO-2 then ZeRO-3, trains a tiny patched Llama
with ``Trainer(deepspeed=...)`` for 2 steps with a checkpoint at each, saves the final adapter with
``trainer.save_model`` and with a collective ``lowrank.save_adapter``, records the trained model's
logits, resumes a fresh model from the first checkpoint and saves it again. What each rank saw
(losses, whether the adapter was partitioned, the errors of what must be refused) goes to
``<out>/zero<stage>/rank<r>.pt``; the adapters to the folders beside it.

    DS_ACCELERATOR=cpu python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/deepspeed_worker.py BASE CHECKPOINT OUT

BASE: dense | nf4-<quant storage dtype>, loaded from the dense CHECKPOINT (``save_checkpoint``).
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from distributed_worker import build  # noqa: E402  (helpers sets TRITON_INTERPRET first)

import lowrank  # noqa: E402
from lowrank.adapters import adapter_is_partitioned, restore_adapter_weights  # noqa: E402

STEPS, LR, BATCH, LENGTH, VOCAB = 2, 0.05, 2, 6, 64


def deepspeed_config(stage):
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "zero_allow_untested_optimizer": True,  # the client SGD below
        "zero_optimization": {
            "stage": stage,
            # Without it Trainer hands save_pretrained an empty state dict under ZeRO-3.
            "stage3_gather_16bit_weights_on_model_save": True,
            # Partition even these tiny weights (small ones stay whole by default).
            "stage3_param_persistence_threshold": 0,
            "stage3_model_persistence_threshold": 0,
        },
    }


def data():
    ids = torch.randint(0, VOCAB, (STEPS * BATCH * 2, LENGTH),
                        generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row} for row in ids]


def probe():
    return torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(5))


def trainer(stage, base, checkpoint, out, save):
    from transformers import Trainer, TrainingArguments

    # Before the model: under ZeRO-3 the arguments make from_pretrained partition it as it loads.
    args = TrainingArguments(output_dir=out, max_steps=STEPS, learning_rate=LR,
                             per_device_train_batch_size=BATCH, logging_steps=1, report_to=[],
                             save_strategy="steps" if save else "no", save_steps=1, use_cpu=True,
                             lr_scheduler_type="constant", ddp_backend="gloo",
                             deepspeed=deepspeed_config(stage))
    model = build(base, checkpoint, device_map=None if stage == 3 else "cpu")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    return Trainer(model=model, args=args, train_dataset=data(), optimizers=(optimizer, None))


def refusals(model, out):
    """The errors of the saves and loads that cannot work on a ZeRO-3-partitioned adapter."""
    attempts = {
        # Trainer's fallback without stage3_gather_16bit_weights_on_model_save.
        "empty_state_dict": lambda: lowrank.save_adapter(model, f"{out}/no", state_dict={}),
        # The partitions themselves (empty tensors), as one rank alone sees them.
        "partitions": lambda: lowrank.save_adapter(model, f"{out}/no",
                                                   state_dict=dict(model.named_parameters())),
        "restore": lambda: restore_adapter_weights(model, f"{out}/final", "default"),
        "load": lambda: lowrank.load_adapter(model, f"{out}/final", "other"),
    }
    errors = {}
    for what, attempt in attempts.items():
        try:
            attempt()
        except ValueError as error:
            errors[what] = str(error)
    return errors


def run(stage, base, checkpoint, out):
    rank = dist.get_rank()
    first = trainer(stage, base, checkpoint, out, save=True)
    first.train()
    engine = first.model_wrapped
    model = engine.module
    result = {"partitioned": adapter_is_partitioned(model, "default"),
              "losses": [e["loss"] for e in first.state.log_history if "loss" in e]}
    first.save_model(f"{out}/final")
    lowrank.save_adapter(model, f"{out}/collective")  # every rank: gathered, rank 0 writes
    if stage == 3:  # before the forward below, which leaves the weights gathered
        result["partitioned_at_refusals"] = adapter_is_partitioned(model, "default")
        result["refusals"] = refusals(model, out)
    with torch.no_grad():
        result["logits"] = engine(input_ids=probe()).logits
    resumed = trainer(stage, base, checkpoint, f"{out}/resumed", save=False)
    resumed.train(resume_from_checkpoint=f"{out}/checkpoint-1")
    resumed.save_model(f"{out}/resumed-final")
    torch.save(result, f"{out}/rank{rank}.pt")


def main():
    base, checkpoint, out = sys.argv[1:]
    dist.init_process_group("gloo")
    try:
        for stage in (2, 3):
            run(stage, base, checkpoint, os.path.join(out, f"zero{stage}"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
