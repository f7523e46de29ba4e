"""The memory ledger: ``python -m bench.memory [--quick]``, on a CPU or a GPU.

What autograd saves for backward does not depend on the device, so this is the one performance
figure measured exactly on a CPU. For one training step (forward, then the gradients of the
trainable parameters), it adds up the bytes of the unique storages autograd saves, parameters,
buffers and bitsandbytes quant states excluded, split by the block that saved them: the module
running when a tensor is saved (``CATEGORIES``). Four ways run each configuration: PEFT +
bitsandbytes, the same PeftModel after ``lowrank.patch_peft_model`` (with its block fusions, as
``lowrank`` below), a base patched by
``lowrank.load_adapter`` carrying the same adapter (loaded from PEFT's save) with its block
fusions (``lowrank``: the gated MLPs through the fused LoRA MLP, whose saves count as the MLP
block's, ``mlp_activation``, and attention's q, k and v through the fused q/k/v op, whose saves
count as the attention's), and the same patched base without them (``lowrank_unfused``: every
layer on its own, as ``fuse_blocks=False``).

Configurations (``MODELS``): a tiny 4-bit Llama (real tensors: the three losses must agree) and one
4-bit Llama-3-8B decoder layer at seq 2048 (in bf16 as QLoRA runs it, and in fp32; a toy vocabulary
around it), each with and without gradient checkpointing, LoRA dropout 0 and 0.05. On a CPU lowrank's Triton kernels are what is measured, not its reference ops (which keep
a dense copy of the weight): TRITON_INTERPRET is set, and the 8B layer runs under torch's
FakeTensorMode, where every op, lowrank's and bitsandbytes' custom ops included, runs only its
shape function. Autograd above the fake tensors saves exactly what it saves for real tensors.

Gradient checkpointing: a checkpointed layer's own saves during forward are placeholders, but
torch keeps its inputs (counted as ``checkpoint_inputs``); its backward recomputes the layer, and
what the recompute saves is kept until that layer's backward uses it. ``saved`` counts every unique
storage saved across the step, forward and all recomputes; ``held_at_once`` the forward's plus the
largest single recompute's, what is held when backward reaches that layer.

Mixture-of-experts blocks (``--moe``, ``MOE_MODELS``): a tiny Qwen3-MoE (real tensors) and one
Qwen3-30B-A3B decoder layer (fake tensors), LoRA on the experts only, as PEFT's
``target_parameters``; three ways (no unfused one: the experts are one op either way).

Writes bench/results/memory-<commit>.json (``--moe``: memory-moe-<commit>.json; ``--output DIR``:
in DIR); ``python -m bench.report`` puts it in BENCHMARKS.md.
"""

import os

import torch

if not torch.cuda.is_available():  # before lowrank imports Triton: measure the kernels' saves
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from bench.harness import RESULTS_DIR, _commit, _version  # noqa: E402

SCHEMA_VERSION = 1
PREFIX, DORA_PREFIX = "memory-", "memory-dora-"  # the results' file names: bench/report.py reads them
RANK = 16
DROPOUTS = (0.0, 0.05)
WAYS = ("peft", "lowrank_patch_peft_model", "lowrank_unfused", "lowrank")
CATEGORIES = ("lora_linears", "mlp_activation", "attention", "norms", "loss_head",
              "checkpoint_inputs", "other")
# A decoder layer's own categories: what "saved bytes per layer" counts (not the embeddings, the
# final norm, the head and the loss, which the 8B case shrinks to a toy vocabulary).
LAYER_CATEGORIES = ("lora_linears", "mlp_activation", "attention", "norms", "checkpoint_inputs")
# name -> Llama config, tokens (batch, sequence), compute dtype, and whether tensors are fake.
MODELS = {
    "tiny-llama-nf4": {
        "config": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=128),
        "tokens": (4, 128), "dtype": "float32", "fake": False},
    "llama3-8b-layer-nf4": {
        "config": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=1,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=1024,
                       rope_theta=500000.0, max_position_embeddings=2048),
        "tokens": (1, 2048), "dtype": "bfloat16", "fake": True},
}
# The same layer in fp32, the tiny model's dtype: in bf16 PEFT also keeps an fp32 copy of each
# linear's input (it casts x to the fp32 adapters' dtype), which lowrank never makes.
MODELS["llama3-8b-layer-nf4-fp32"] = {**MODELS["llama3-8b-layer-nf4"], "dtype": "float32"}
# DoRA (issue 19: peak memory <= PEFT DoRA's): the tiny model and the bf16 8B layer with
# use_dora=True, by ``--dora`` into their own result (the LoRA ledger's run stays as it was).
DORA_MODELS = ("tiny-llama-nf4-dora", "llama3-8b-layer-nf4-dora")
for _name in DORA_MODELS:
    MODELS[_name] = {**MODELS[_name.removesuffix("-dora")], "use_dora": True}
QUICK_MODELS = ("tiny-llama-nf4",)
LOSS_RTOL = 1e-5  # fp32: the three ways compute one loss


def _category_of_modules(model):
    """{module: category}, from the module's own kind and the blocks it sits in."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers.modeling_layers import GradientCheckpointingLayer

    from lowrank.modules import AdapterLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    categories = {}
    for path, module in model.named_modules():
        parts = path.split(".")
        above = [model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts) + 1)]
        if any(isinstance(m, (BaseTunerLayer, AdapterLayer)) for m in above):
            category = "lora_linears"
        elif "Norm" in type(module).__name__:
            category = "norms"
        elif any("mlp" in part for part in parts):
            category = "mlp_activation"
        elif any("attn" in part or "attention" in part for part in parts):
            category = "attention"
        elif module is head or module is base:  # the loss is computed in the CausalLM's forward
            category = "loss_head"
        elif isinstance(module, GradientCheckpointingLayer):
            # A decoder layer saves nothing itself (its residual adds save nothing): what is saved
            # while it runs outside its blocks is checkpoint's copy of its inputs.
            category = "checkpoint_inputs"
        else:
            category = "other"
        categories[module] = category
    return categories


def _state_storages(model, fake_mode=None):
    """Storages of everything the model holds for itself: parameters, buffers, quant states. Under
    ``fake_mode`` an op given a real tensor works on its fake twin (one per real tensor, made
    once), and a view of that (``weight.t()`` in a linear) has the twin's storage: those too.
    {storage key: tensor}: holding the tensors keeps their keys from being reused."""
    tensors = [*model.parameters(), *model.buffers()]
    for parameter in model.parameters():
        state = getattr(parameter, "quant_state", None)
        while state is not None:
            tensors += [t for t in vars(state).values() if isinstance(t, torch.Tensor)]
            state = getattr(state, "state2", None)
    if fake_mode is not None:
        tensors += [fake_mode.from_tensor(t) for t in tensors]
    return {t.untyped_storage()._cdata: t for t in tensors}


class Ledger:
    """Bytes of the unique storages autograd saves while it is entered, by phase and category."""

    def __init__(self, model, fake_mode=None):
        self.categories = _category_of_modules(model)
        self.excluded = _state_storages(model, fake_mode)
        self.running = []  # the modules whose forward is running, innermost last
        self.kept = {}  # storage key -> storage: holding it keeps the key from being reused
        self.saved = {phase: dict.fromkeys(CATEGORIES, 0) for phase in ("forward", "recompute")}
        self.largest_recompute = 0

    def record(self, tensor, phase):
        """Count ``tensor``'s storage once, in the category of the innermost running module;
        return the bytes it added."""
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.excluded or key in self.kept:
            return 0
        self.kept[key] = storage
        category = self.categories.get(self.running[-1], "other") if self.running else "other"
        self.saved[phase][category] += storage.nbytes()
        return storage.nbytes()

    def _pack(self, tensor):
        self.record(tensor, "forward")
        return tensor

    def _checkpointing(self, checkpoint):
        """A layer's checkpoint function whose recompute the ledger sees. Checkpoint's own hooks
        take over inside the layer, so on the recompute ours wrap them (they keep what is packed
        until backward uses it)."""
        def checkpointed(function, *args):
            calls = 0

            def run(*inputs):
                nonlocal calls
                calls += 1
                if calls == 1:  # the forward: checkpoint's hooks keep placeholders only
                    return function(*inputs)
                pack, unpack = torch._C._autograd._top_saved_tensors_default_hooks(False)
                added = 0

                def counted(tensor):
                    nonlocal added
                    added += self.record(tensor, "recompute")
                    return pack(tensor)

                try:
                    with torch.autograd.graph.saved_tensors_hooks(counted, unpack):
                        return function(*inputs)
                finally:  # checkpoint stops the recompute early by raising
                    self.largest_recompute = max(self.largest_recompute, added)

            return checkpoint(run, *args)
        return checkpointed

    @contextlib.contextmanager
    def __call__(self):
        def entered(module, args):
            if module in self.categories:
                self.running.append(module)

        def left(module, args, output):  # returns None: the output stays as it is
            if module in self.categories:
                self.running.pop()

        # Global hooks, not hooks on each module: a fused block forward runs its projections'
        # computation without calling them, and declines (runs them one by one) where a module
        # has hooks of its own, which the fused computation would skip.
        handles = [torch.nn.modules.module.register_module_forward_pre_hook(entered),
                   torch.nn.modules.module.register_module_forward_hook(left, always_call=True)]
        layers = [m for m in self.categories if getattr(m, "gradient_checkpointing", False)]
        originals = [m._gradient_checkpointing_func for m in layers]
        for layer, checkpoint in zip(layers, originals):
            layer._gradient_checkpointing_func = self._checkpointing(checkpoint)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
                yield self
        finally:
            for handle in handles:
                handle.remove()
            for layer, checkpoint in zip(layers, originals):
                layer._gradient_checkpointing_func = checkpoint

    def summary(self):
        """{"saved": bytes by category over the step, "held_at_once": bytes}."""
        saved = {c: self.saved["forward"][c] + self.saved["recompute"][c] for c in CATEGORIES}
        return {"saved": {**saved, "total": sum(saved.values())},
                "held_at_once": sum(self.saved["forward"].values()) + self.largest_recompute}


@contextlib.contextmanager
def unfused(model):
    """Inside the block, ``model``'s fused blocks run their own forward (``fuse_blocks=False``)."""
    from lowrank import blocks

    state = model.lowrank_state
    blocks.uninstall(model, state)
    try:
        yield
    finally:
        blocks.install(model, state)


def measure_step(model, tokens, fake_mode=None):
    """(loss, the ledger's summary) of one training step of ``model`` on ``tokens`` (fake tensors
    of ``fake_mode``, or real ones)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    ledger = Ledger(model, fake_mode)
    with ledger():
        loss = model(input_ids=tokens, labels=tokens).loss
        # autograd.grad, not backward: under FakeTensorMode no fake gradient lands on a real .grad
        torch.autograd.grad(loss, trainable)
    return loss, ledger.summary()


def _load_4bit(directory, dtype):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization,
                                                 dtype=dtype, device_map=_device())
    return model.train()


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def _unpacked_sequences(fake_mode):
    """Without a cache (as under checkpointing) transformers reads the position ids' values to see
    whether rows pack several sequences, and assumes they do when it cannot read them (fake
    tensors): it would then build a dense mask that the real run does not. Ours never pack."""
    if fake_mode is None:
        yield
        return
    from unittest import mock

    from transformers import masking_utils

    with mock.patch.object(masking_utils, "find_packed_sequence_indices",
                           lambda position_ids: None):
        yield


def _save_trained_looking(peft_model, directory):
    """Give ``peft_model``'s adapter a trained look (B not zero, seeded), so the ways' losses say
    something when compared, and save it in PEFT's format into ``directory``."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter_name, parameter in peft_model.named_parameters():
            if "lora_B" in parameter_name:
                parameter.normal_(0, 0.02)
    peft_model.save_pretrained(directory)


def _fake_mode(spec, fake):
    """The FakeTensorMode a case runs under (``fake`` None: the model's own setting), or None."""
    fake = spec["fake"] if fake is None else fake
    return torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True) if fake else None


def measure_model(name, directory, dropout, checkpointing=(False, True), fake=None):
    """{checkpointing: {way: {"loss", "saved", "held_at_once"}}} for model ``name`` (its base
    saved in ``directory``/base) with LoRA ``dropout`` (DoRA where the model says ``use_dora``);
    ``fake``: run under FakeTensorMode (default: the model's setting)."""
    from peft import LoraConfig, get_peft_model

    import lowrank

    spec = MODELS[name]
    dtype = getattr(torch, spec["dtype"])
    peft_model = get_peft_model(_load_4bit(f"{directory}/base", dtype),
                                LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=dropout,
                                           target_modules="all-linear",
                                           use_dora=spec.get("use_dora", False)))
    _save_trained_looking(peft_model, f"{directory}/adapter")
    patched = lowrank.load_adapter(_load_4bit(f"{directory}/base", dtype), f"{directory}/adapter")
    batch, sequence = spec["tokens"]
    fake = _fake_mode(spec, fake)
    results = {}
    with fake or contextlib.nullcontext(), _unpacked_sequences(fake):
        torch.manual_seed(0)
        tokens = torch.randint(0, spec["config"]["vocab_size"], (batch, sequence),
                               device=_device())
        for checkpoint in checkpointing:
            for model in (peft_model.get_base_model(), patched):
                if checkpoint:
                    model.gradient_checkpointing_enable(
                        gradient_checkpointing_kwargs={"use_reentrant": False})
                else:
                    model.gradient_checkpointing_disable()
            results[checkpoint] = {}
            for way in WAYS:
                if way == "lowrank_patch_peft_model":
                    lowrank.patch_peft_model(peft_model)
                stepped = peft_model if way in ("peft", "lowrank_patch_peft_model") else patched
                with unfused(stepped) if way == "lowrank_unfused" else contextlib.nullcontext():
                    loss, ledger = measure_step(stepped, tokens, fake)
                results[checkpoint][way] = {"loss": None if fake else loss.item(), **ledger}
            lowrank.unpatch_peft_model(peft_model)
    return results


def check_losses(name, dropout, results):
    """The comparison is fair only if the ways compute one loss (without dropout: with it,
    each way draws its own mask)."""
    losses = {way: r["loss"] for way, r in results.items()}
    if dropout or None in losses.values():
        return
    worst = max(abs(loss - losses["peft"]) for loss in losses.values())
    if worst > LOSS_RTOL * abs(losses["peft"]):
        raise AssertionError(f"bench.memory {name}: losses differ beyond {LOSS_RTOL} relative: "
                             f"{losses}")


def ratios(results):
    """{way: {"total", "layer", "held_at_once"}}: each way's bytes over PEFT's."""
    def layer(r):
        return sum(r["saved"][c] for c in LAYER_CATEGORIES)

    peft = results["peft"]
    return {way: {"total": r["saved"]["total"] / peft["saved"]["total"],
                  "layer": layer(r) / layer(peft),
                  "held_at_once": r["held_at_once"] / peft["held_at_once"]}
            for way, r in results.items()}


def _save_base(name, directory):
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = MODELS[name]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**spec["config"])).to(getattr(torch, spec["dtype"]))
    model.save_pretrained(f"{directory}/base")


def run(models, dropouts=DROPOUTS, checkpointing=(False, True), fake=None):
    """The ledger's cases: one per model, dropout and checkpointing (``fake``: see
    ``measure_model``)."""
    cases = []
    for name in models:
        spec = MODELS[name]
        with tempfile.TemporaryDirectory() as directory:
            _save_base(name, directory)
            for dropout in dropouts:
                started = time.perf_counter()
                measured = measure_model(name, directory, dropout, checkpointing, fake)
                seconds = (time.perf_counter() - started) / len(measured)
                for checkpoint, results in measured.items():
                    check_losses(name, dropout, results)
                    cases.append(ledger_case(name, spec, fake, dropout, checkpoint, results,
                                             ratios(results), seconds))
    return cases


def ledger_case(name, spec, fake, dropout, checkpointing, results, ratios_to_peft, seconds):
    """One case of a ledger's results file: model ``name`` (``spec``: its MODELS or MOE_MODELS
    entry; ``fake`` None: the model's own setting), ``results`` by way and their ratios to PEFT."""
    return {"model": name, "tokens": list(spec["tokens"]), "dtype": spec["dtype"],
            "fake": spec["fake"] if fake is None else fake, "dropout": dropout,
            "gradient_checkpointing": checkpointing, "ways": results,
            "ratios_to_peft": ratios_to_peft, "seconds": seconds}


# Mixture-of-experts configurations (issue 27): a Qwen3-MoE model with LoRA on its experts only,
# PEFT's ``target_parameters`` (one ``ParamWrapper`` per projection), in the compute dtype (4-bit
# loading leaves 3-D experts unquantized). Ways: PEFT, the PeftModel after patch_peft_model, and a
# base patched by ``lowrank.load_adapter`` with PEFT's save (the experts as ``LoraExperts``).
# "Qwen3-30B-A3B layer": one decoder layer at the real sizes (E=128, top-8, H=2048, I=768),
# 4096 tokens, bf16, fake tensors, a toy vocabulary around it.
MOE_MODELS = {
    "tiny-qwen3-moe": {
        "config": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
                       num_experts=8, num_experts_per_tok=2, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       vocab_size=128),
        "tokens": (4, 64), "dtype": "float32", "fake": False},
    "qwen3-30b-a3b-moe-layer": {
        "config": dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                       num_experts=128, num_experts_per_tok=8, num_hidden_layers=1,
                       num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                       vocab_size=1024, max_position_embeddings=4096),
        "tokens": (1, 4096), "dtype": "bfloat16", "fake": True},
}
QUICK_MOE_MODELS = ("tiny-qwen3-moe",)
MOE_PREFIX = "memory-moe-"  # its own results file: bench.report renders it in its own table
MOE_WAYS = ("peft", "lowrank_patch_peft_model", "lowrank")
MOE_TARGET_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# What the MoE block saves: its experts (the adapted ones: ``lora_linears``) and its router and
# combine (``mlp_activation``); attention, norms and the head carry no adapter here.
MOE_BLOCK_CATEGORIES = ("lora_linears", "mlp_activation")


def _moe_base(name):
    """The MoE model ``name`` with seeded weights, in its dtype, in training mode."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    spec = MOE_MODELS[name]
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**spec["config"]))
    return model.to(getattr(torch, spec["dtype"])).train()


def measure_moe(name, directory, fake=None):
    """{way: {"loss", "saved", "held_at_once"}} for MoE model ``name``, no checkpointing, LoRA
    r=16 on every experts module's two projections (PEFT's save in ``directory``); ``fake``: run
    under FakeTensorMode (default: the model's setting)."""
    import copy

    from peft import LoraConfig, get_peft_model

    import lowrank

    spec = MOE_MODELS[name]
    base = _moe_base(name)
    peft_model = get_peft_model(copy.deepcopy(base),
                                LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=[],
                                           target_parameters=MOE_TARGET_PARAMETERS))
    _save_trained_looking(peft_model, directory)
    patched = lowrank.load_adapter(base, directory)
    batch, sequence = spec["tokens"]
    fake = _fake_mode(spec, fake)
    results = {}
    with fake or contextlib.nullcontext(), _unpacked_sequences(fake):
        torch.manual_seed(0)
        tokens = torch.randint(0, spec["config"]["vocab_size"], (batch, sequence))
        if fake:  # PEFT's ParamWrapper registers a parametrization (set_), never on a real tensor
            _make_parameters_fake(peft_model, fake)
        for way in MOE_WAYS:
            if way == "lowrank_patch_peft_model":
                lowrank.patch_peft_model(peft_model)
            stepped = patched if way == "lowrank" else peft_model
            loss, ledger = measure_step(stepped, tokens, fake)
            results[way] = {"loss": None if fake else loss.item(), **ledger}
    lowrank.unpatch_peft_model(peft_model)
    return results


def _make_parameters_fake(model, fake_mode):
    """Replace every parameter of ``model`` by its fake twin (same shape, dtype, requires_grad)."""
    for module in model.modules():
        for name, parameter in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(fake_mode.from_tensor(parameter),
                                                     requires_grad=parameter.requires_grad))


def moe_ratios(results):
    """{way: {"total", "moe_block"}}: each way's saved bytes over PEFT's, in all and in the MoE
    blocks (``MOE_BLOCK_CATEGORIES``)."""
    def block(r):
        return sum(r["saved"][c] for c in MOE_BLOCK_CATEGORIES)

    peft = results["peft"]
    return {way: {"total": r["saved"]["total"] / peft["saved"]["total"],
                  "moe_block": block(r) / block(peft)}
            for way, r in results.items()}


def run_moe(models, fake=None):
    """The MoE ledger's cases: one per model (LoRA dropout 0: PEFT has none on experts;
    ``fake``: see ``measure_moe``)."""
    cases = []
    for name in models:
        spec = MOE_MODELS[name]
        with tempfile.TemporaryDirectory() as directory:
            started = time.perf_counter()
            results = measure_moe(name, directory, fake)
            if spec["dtype"] == "float32":  # LOSS_RTOL is fp32's
                check_losses(name, 0.0, results)
            cases.append(ledger_case(name, spec, fake, 0.0, False, results, moe_ratios(results),
                                     time.perf_counter() - started))
    return cases


def environment():
    """Device, versions, commit and date of a ledger run."""
    import datetime

    from lowrank import _dispatch

    device = _device()
    return {"device": {"name": torch.cuda.get_device_name() if device == "cuda"
                       else platform.processor() or platform.machine(),
                       "ops": _dispatch.backend_name(device)},
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": _version("transformers"), "peft": _version("peft"),
                         "triton": _version("triton"), "bitsandbytes": _version("bitsandbytes"),
                         "lowrank": _version("lowrank")},
            "commit": _commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def table(cases):
    """The summary printed at the end: each configuration's totals and ratios to PEFT."""
    lines = [f"{'model':<22}{'dropout':>8}{'ckpt':>6}  {'way':<26}{'saved MiB':>10}"
             f"{'x PEFT':>8}{'layer x':>9}{'held x':>8}"]
    for case in cases:
        for way, result in case["ways"].items():
            ratio = case["ratios_to_peft"][way]
            lines.append(f"{case['model']:<22}{case['dropout']:>8}"
                         f"{'on' if case['gradient_checkpointing'] else 'off':>6}  {way:<26}"
                         f"{result['saved']['total'] / 2**20:>10.2f}{ratio['total']:>8.2f}"
                         f"{ratio['layer']:>9.2f}{ratio['held_at_once']:>8.2f}")
    return "\n".join(lines)


def moe_table(cases):
    """The MoE summary printed at the end: each way's total and its ratios to PEFT."""
    lines = [f"{'model':<26}  {'way':<26}{'saved MiB':>10}{'x PEFT':>8}{'MoE x':>8}"]
    for case in cases:
        for way, result in case["ways"].items():
            ratio = case["ratios_to_peft"][way]
            lines.append(f"{case['model']:<26}  {way:<26}{result['saved']['total'] / 2**20:>10.2f}"
                         f"{ratio['total']:>8.2f}{ratio['moe_block']:>8.2f}")
    return "\n".join(lines)


def write_result(result, directory=RESULTS_DIR, prefix=PREFIX):
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{prefix}{(result['commit'] or 'unknown')[:10]}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"only {', '.join(QUICK_MODELS)} (what CI runs)")
    parser.add_argument("--moe", action="store_true",
                        help=f"the MoE configurations instead ({', '.join(MOE_MODELS)}), written "
                             f"to {MOE_PREFIX}<commit>.json")
    parser.add_argument("--dora", action="store_true",
                        help=f"only {', '.join(DORA_MODELS)}, into memory-dora-<commit>.json")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR,
                        help="the folder the JSON result is written to (default bench/results)")
    args = parser.parse_args(argv)
    from lowrank import _dispatch

    if _dispatch.backend_name(_device()) == "reference":
        raise SystemExit("python -m bench.memory: lowrank runs its reference ops here (was it "
                         "imported before TRITON_INTERPRET was set?); they save what the kernels "
                         "do not")
    if args.moe:
        result = {"schema": SCHEMA_VERSION, **environment(),
                  "cases": run_moe(QUICK_MOE_MODELS if args.quick else MOE_MODELS)}
        path = write_result(result, args.output, prefix=MOE_PREFIX)
        print(moe_table(result["cases"]))
        print(f"wrote {path}")
        return 0
    models = (QUICK_MODELS if args.quick else DORA_MODELS if args.dora
              else [name for name in MODELS if name not in DORA_MODELS])
    result = {"schema": SCHEMA_VERSION, **environment(), "cases": run(models)}
    path = write_result(result, args.output, prefix=DORA_PREFIX if args.dora else PREFIX)
    print(table(result["cases"]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
