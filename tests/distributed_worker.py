"""One rank of a distributed training run, started by tests/test_distributed.py under torchrun (CPU,
gloo, 2 processes): trains a tiny patched Llama under DDP or FSDP2 on its half of a global batch and
writes what it saw (losses, adapter gradients and weights, DDP's gradient buckets, FSDP's shards,
what is refused on a sharded model, the adapter restored into it) to ``<out>/rank<r>.pt``, and under
FSDP2 the adapter saved by three routes to folders of ``<out>``. The test imports ``build`` and
``train`` from here for the single-process run on the whole batch.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py \\
        ENGINE BASE CHECKPOINT OUT

ENGINE: ddp | fsdp2. BASE: dense | nf4-<quant storage dtype> (nf4-uint8, nf4-bfloat16, ...),
loaded from the dense CHECKPOINT (a tiny Llama saved by ``save_checkpoint``).
"""

import argparse
import datetime
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import tiny_model  # noqa: E402  (sets TRITON_INTERPRET before lowrank is imported)

import lowrank  # noqa: E402

STEPS, LR, GLOBAL_BATCH, LENGTH, VOCAB = 3, 0.05, 4, 6, 64


def save_checkpoint(directory):
    """The dense tiny Llama (hidden 32, one block, fp32) every run starts from."""
    tiny_model("llama", blocks=1).save_pretrained(directory)


def base_storage(base):
    """The dtype the base's weights are stored in: fp32 (dense) or the 4-bit quant storage."""
    return torch.float32 if base == "dense" else getattr(torch, base.removeprefix("nf4-"))


def load_base(base, checkpoint, device_map="cpu"):
    """The model of ``base`` loaded from ``checkpoint``, not patched. ``device_map`` None for a
    4-bit base under DeepSpeed ZeRO-3, which partitions it while loading and refuses a map."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if base == "dense":
        return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32,
                                      bnb_4bit_quant_storage=base_storage(base))
    return AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=quantization,
                                                dtype=torch.float32, device_map=device_map)


def build(base, checkpoint, device_map="cpu"):
    """``load_base``, patched (rank 4 LoRA on every linear layer), adapters seeded and nonzero so
    that every gradient counts from the first step."""
    model = load_base(base, checkpoint, device_map)
    lowrank.patch_model(model, rank=4)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.train()


def global_batch():
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, LENGTH), generator=torch.Generator().manual_seed(1))


def train(model, ids, adapter_parameters, full=lambda t: t, mean_loss=lambda loss: loss):
    """SGD steps on ``ids``: (losses, adapter gradients of the last step, adapter weights after
    it). ``adapter_parameters``: {name: parameter} to report; ``full`` turns a rank's tensor into
    the whole one (FSDP's shards), ``mean_loss`` the rank's loss into the global batch's."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(mean_loss(loss.detach()).item())
        grads = {n: full(p.grad).clone() for n, p in adapter_parameters.items()}
        optimizer.step()
    weights = {n: full(p.detach()).clone() for n, p in adapter_parameters.items()}
    return losses, grads, weights


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def run_ddp(model, ids):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    names = {id(p): n for n, p in model.named_parameters()}
    adapters = trainable(model)
    ddp = DistributedDataParallel(model)
    bucketed = set()

    def record_and_allreduce(state, bucket):
        bucketed.update(names[id(p)] for p in bucket.parameters())
        return default_hooks.allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, record_and_allreduce)

    losses, grads, weights = train(ddp, ids, adapters, mean_loss=mean_over_ranks)
    return {"losses": losses, "grads": grads, "weights": weights, "bucketed": sorted(bucketed),
            "trainable": sorted(adapters)}


def fully_shard_blocks(model, mixed_precision=None):
    """fully_shard each decoder block, then the whole model, over all ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=mixed_precision)
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def mean_over_ranks(loss):
    dist.all_reduce(loss)
    return loss / dist.get_world_size()


def run_fsdp2(model, ids, out):
    fully_shard_blocks(model)
    q_proj = model.model.layers[0].self_attn.q_proj.base_layer.weight
    shards = {"q_proj_local": q_proj.to_local().numel(), "q_proj_full": q_proj.numel(),
              "q_proj_dtype": str(q_proj.dtype)}
    losses, grads, weights = train(model, ids, trainable(model), full=lambda t: t.full_tensor(),
                                   mean_loss=mean_over_ranks)
    save_routes(model, out)
    restored = restore_route(model, out)
    refusals = {}
    attempts = {"merge": lambda: lowrank.merge(model),
                "load_adapter": lambda: lowrank.load_adapter(model, f"{out}/collective", "other")}
    for what, call in attempts.items():
        try:
            call()
        except ValueError as error:
            refusals[what] = str(error)
    return {"losses": losses, "grads": grads, "weights": weights, "refusals": refusals,
            "restored": restored, **shards}


def save_routes(model, out):
    """The sharded adapter saved three ways, each into its own folder of ``out``: save_adapter on
    every rank (it gathers the adapter); a full state dict gathered as Trainer gathers it under
    FSDP (FULL_STATE_DICT), handed to save_pretrained on rank 0; every FSDP module unsharded,
    save_adapter on rank 0 alone, resharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    rank = dist.get_rank()
    lowrank.save_adapter(model, f"{out}/collective")
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
    state_dict = get_model_state_dict(model, options=options)  # the whole model on rank 0 only
    model.save_pretrained(f"{out}/state_dict", state_dict=state_dict, is_main_process=rank == 0)
    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in fsdp_modules:
        module.unshard()
    if rank == 0:
        lowrank.save_adapter(model, f"{out}/unshard")
    dist.barrier()
    for module in fsdp_modules:
        module.reshard()


def restore_route(model, out):
    """Resuming a sharded adapter: zeroed, then restored from the saved file (each rank keeps its
    shard); the whole weights after it."""
    from lowrank.adapters import restore_adapter_weights

    adapters = trainable(model)
    with torch.no_grad():
        for param in adapters.values():
            param.zero_()
    restore_adapter_weights(model, f"{out}/collective", "default")
    return {n: p.full_tensor() for n, p in adapters.items()}


def cast_refusal(base, checkpoint, ids):
    """The error of a forward pass under MixedPrecisionPolicy(param_dtype=fp32), which converts
    packed bytes stored as bf16 / fp16 values as numbers."""
    model = build(base, checkpoint)
    fully_shard_blocks(model, mixed_precision=torch.float32)
    try:
        model(input_ids=ids)
    except RuntimeError as error:
        return str(error)
    return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("engine", choices=["ddp", "fsdp2"])
    parser.add_argument("base")
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        model = build(args.base, args.checkpoint)
        ids = global_batch().chunk(world)[rank]
        if args.engine == "ddp":
            result = run_ddp(model, ids)
        else:
            result = run_fsdp2(model, ids, args.out)
            if base_storage(args.base).is_floating_point and args.base != "dense":
                result["cast_refusal"] = cast_refusal(args.base, args.checkpoint, ids)
        torch.save(result, os.path.join(args.out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
