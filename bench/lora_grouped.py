"""LoRA on mixture-of-experts experts (bf16, rank 16 on both projections): one experts module's
forward + backward (the gradients of the hidden states and of the adapters), lowrank vs the ways
it is done today, measured in one run.

Shapes: (tokens, experts, top-k, hidden, intermediate) of Qwen3-30B-A3B's experts module
(``Qwen3MoeExperts``) and gpt-oss-20b's (``GptOssExperts``: weights E x in x out, biases, its own
gate), at 4096 tokens; each token routed to top-k distinct random experts with softmax weights.
Ways, each a module built by transformers with its default experts implementation (grouped_mm):
- ``lowrank``: the module patched by ``lowrank.patch_model`` (``LoraExperts``: each projection one
  ``lowrank.ops.lora_grouped``);
- ``peft``: PEFT's LoRA on the experts (``target_parameters``, its ``ParamWrapper``), the
  correctness guard's expected output (tested equal to lowrank's in tests/test_moe.py);
- ``grouped_mm_no_lora``: the module without LoRA (torch's grouped_mm, x's gradient only): the
  same grouped GEMMs without the adapters, the floor issue 27's <= 1.15x target is against.
"""

import copy

import torch

from bench.harness import check_all, timed_case

RANK, ALPHA = 16, 32
# The module family, told by (experts, top-k); other pairs (the dry run's) take Qwen3-MoE's.
FAMILIES = {(128, 8): "qwen3_moe", (32, 4): "gpt_oss"}
SHAPES = [(4096, 128, 8, 2048, 768), (4096, 32, 4, 2880, 2880)]
QUICK_SHAPES = SHAPES[:1]
TARGET_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]


class Block(torch.nn.Module):
    """An experts module under the name ``experts``, as in a decoder layer's MoE block."""

    def __init__(self, experts):
        super().__init__()
        self.experts = experts

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return self.experts(hidden_states, top_k_index, top_k_weights)


def family_of(shape):
    """The experts module family of a shape (tokens, experts, top-k, hidden, intermediate)."""
    return FAMILIES.get(tuple(shape[1:3]), "qwen3_moe")


def experts_module(family, experts, top_k, hidden, intermediate, device):
    """A bf16 experts module of ``family`` with seeded small random weights (and biases)."""
    from transformers import GptOssConfig, Qwen3MoeConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    torch.manual_seed(0)
    if family == "gpt_oss":
        config = GptOssConfig(hidden_size=hidden, intermediate_size=intermediate,
                              num_local_experts=experts, num_experts_per_tok=top_k)
    else:
        config = Qwen3MoeConfig(hidden_size=hidden, num_experts=experts,
                                moe_intermediate_size=intermediate, num_experts_per_tok=top_k)
    # What a model built by from_pretrained sets (a lone module would run the per-expert loop).
    config._experts_implementation = "grouped_mm"
    module = (GptOssExperts if family == "gpt_oss" else Qwen3MoeExperts)(config)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0, 0.02)
    return module.to(device=device, dtype=torch.bfloat16)


def ways(family, experts, top_k, hidden, intermediate, device):
    """name -> Block: PEFT's with a trained-looking adapter (B not zero), lowrank's loading PEFT's
    save of it (``lowrank.load_adapter``: the same adapter), and the plain one."""
    import tempfile

    from peft import LoraConfig, get_peft_model

    import lowrank

    plain = Block(experts_module(family, experts, top_k, hidden, intermediate, device))
    peft = get_peft_model(copy.deepcopy(plain),
                          LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=[],
                                     target_parameters=TARGET_PARAMETERS))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in peft.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    with tempfile.TemporaryDirectory() as directory:
        peft.save_pretrained(directory)
        ours = lowrank.load_adapter(copy.deepcopy(plain), directory)
    for parameter in plain.parameters():
        parameter.requires_grad_(False)
    return {"lowrank": ours, "peft": peft, "grouped_mm_no_lora": plain}


def make_inputs(device, tokens, experts, top_k, hidden):
    """Hidden states (with grad), top-k distinct experts per token, their softmax weights, dY."""
    x = (torch.randn(tokens, hidden, device=device) * 0.5).to(torch.bfloat16).requires_grad_()
    scores = torch.randn(tokens, experts, device=device)
    weights, index = scores.topk(top_k, dim=-1)
    grad_y = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
    return x, index, weights.softmax(-1).to(torch.bfloat16), grad_y


def with_backward(block):
    """Forward + backward: the gradients of x and of ``block``'s trainable parameters."""
    trainable = [p for p in block.parameters() if p.requires_grad]

    def fn(x, index, weights, grad_y):
        y = block(x, index, weights)
        return torch.autograd.grad(y, (x, *trainable), grad_y)
    return fn


def run(runner, floors, shapes):
    cases = []
    for shape in shapes:
        tokens, experts, top_k, hidden, intermediate = shape
        family = family_of(shape)
        blocks = ways(family, experts, top_k, hidden, intermediate, runner.device)
        # hidden states in and out, the expert weights read once
        bytes_read = 2 * (2 * tokens * hidden + 3 * experts * intermediate * hidden)
        inputs = runner.rotating(lambda: make_inputs(runner.device, tokens, experts, top_k,
                                                     hidden), bytes_read)
        x, index, weights, _ = next(inputs)
        with torch.no_grad():
            check_all(blocks, (x, index, weights), blocks["peft"](x, index, weights),
                      skip=("grouped_mm_no_lora",))
        calls = {name: with_backward(block) for name, block in blocks.items()}
        rows = tokens * top_k
        # Forward and dX of both projections (3 I x H per row), plus LoRA's products.
        flops = 4 * rows * 3 * intermediate * hidden + 6 * rows * RANK * 2 * (intermediate + hidden)
        params = {"family": family, "dtype": "bfloat16", "rank": RANK, "experts": experts,
                  "top_k": top_k}
        cases.append(timed_case(runner, "lora_grouped_experts_forward_backward", list(shape),
                                params, calls, inputs, floors, flops, backward=True))
    return cases
