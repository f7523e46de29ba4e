"""The memory ledger (bench/memory.py) in CI: the tiny 4-bit Llama (all-linear LoRA r=16, 4 x 128
tokens, fp32, no gradient checkpointing) on the CPU, lowrank's kernels' saves (Triton interpreter).

The ratios come from fake tensors (seconds, not minutes in the interpreter); one real run shows
they count exactly what real tensors count, with equal losses for the three ways.
"""

import pytest

import lowrank
from bench import memory

MODEL = "tiny-llama-nf4"
# Ceilings on lowrank's saved bytes over PEFT's, by LoRA dropout: today's ratios (1.0000 and 0.6306)
# plus a small margin, so that a change saving more fails here. Issue 18's targets are lower
# (TARGETS); its fused MLP, attention and norm blocks are to reach them, and these come down then.
CEILINGS = {0.0: 1.005, 0.05: 0.635}
TARGETS = {0.0: 0.80, 0.05: 0.55}
LOWRANK_WAYS = ("lowrank_patch_peft_model", "lowrank")
# The patched model with its MLPs through the fused LoRA MLP (bench.memory.fused_mlps), until the
# block-fusion stage makes it lowrank's own: today's ratios (0.7768 and 0.4898) plus a small margin.
FUSED_WAY = "lowrank_fused_mlp"
FUSED_CEILINGS = {0.0: 0.78, 0.05: 0.495}


def measure(**kwargs):
    """{dropout: case} of the tiny model without checkpointing."""
    cases = memory.run([MODEL], checkpointing=(False,), **kwargs)
    return {case["dropout"]: case for case in cases}


def over_ceiling(cases):
    """{(dropout, way): ratio} of every lowrank way whose saved bytes exceed its ceiling."""
    return {(dropout, way): case["ratios_to_peft"][way]["total"]
            for dropout, case in cases.items() for way in LOWRANK_WAYS
            if case["ratios_to_peft"][way]["total"] > CEILINGS[dropout]}


@pytest.fixture(scope="module")
def fake_cases():
    return measure(fake=True)


def test_saved_bytes_stay_under_the_ceilings(fake_cases):
    assert set(fake_cases) == set(CEILINGS)
    assert not over_ceiling(fake_cases), over_ceiling(fake_cases)


@pytest.mark.parametrize("dropout", sorted(TARGETS))
@pytest.mark.xfail(strict=True, reason="issue 18's targets need the fused MLP in patch_model and "
                                       "patch_peft_model (the block-fusion stage, part 4); the "
                                       "fused MLP itself meets them (lowrank_fused_mlp, below)")
def test_saved_bytes_meet_the_issue_targets(fake_cases, dropout):
    for way in LOWRANK_WAYS:
        assert fake_cases[dropout]["ratios_to_peft"][way]["total"] <= TARGETS[dropout]


def test_the_fused_mlp_stays_under_its_ceilings_and_meets_the_issue_targets(fake_cases):
    ratios = {dropout: case["ratios_to_peft"][FUSED_WAY]["total"]
              for dropout, case in fake_cases.items()}
    assert all(ratios[dropout] <= FUSED_CEILINGS[dropout] for dropout in ratios), ratios
    assert all(ratios[dropout] <= TARGETS[dropout] for dropout in ratios), ratios


def test_fake_tensors_count_what_real_tensors_count_and_the_losses_agree(fake_cases):
    # memory.run checks that the losses of every way agree (fp32, 1e-5 relative) in a real run.
    real = measure(dropouts=(0.0,), fake=False)[0.0]
    losses = {way: result["loss"] for way, result in real["ways"].items()}
    assert all(loss is not None and loss > 0 for loss in losses.values()), losses
    for way, result in real["ways"].items():
        fake = fake_cases[0.0]["ways"][way]
        assert result["saved"] == fake["saved"], way
        assert result["held_at_once"] == fake["held_at_once"], way


def test_a_layer_that_saves_an_extra_copy_is_caught(fake_cases, monkeypatch):
    """Each lowrank LoRA layer also keeps a copy of its input: the ledger finds exactly those bytes
    in the LoRA linears, and the ceiling check fails."""
    forward = lowrank.modules.LoraLinear.forward

    def leaky(self, x):
        return forward(self, x) + (x.clone() * x).sum() * 0  # the mul saves the clone

    monkeypatch.setattr(lowrank.modules.LoraLinear, "forward", leaky)
    leaked = measure(dropouts=(0.0,), fake=True)
    batch, sequence = memory.MODELS[MODEL]["tokens"]
    config = memory.MODELS[MODEL]["config"]
    # One fp32 copy per linear: q, k, v, o, gate and up read hidden_size features, down the MLP's;
    # but not in the first layer's q, k and v, whose input (the frozen embeddings through a frozen
    # norm) needs no gradient: there the product has no reason to save either operand.
    features = (6 * config["hidden_size"] + config["intermediate_size"]) * \
        config["num_hidden_layers"] - 3 * config["hidden_size"]
    copies = batch * sequence * features * 4
    before = fake_cases[0.0]["ways"]["lowrank"]["saved"]
    after = leaked[0.0]["ways"]["lowrank"]["saved"]
    assert after["lora_linears"] - before["lora_linears"] == copies
    assert {c: after[c] for c in memory.CATEGORIES if c != "lora_linears"} == \
        {c: before[c] for c in memory.CATEGORIES if c != "lora_linears"}
    assert (0.0, "lowrank") in over_ceiling(leaked)
    assert (0.0, "lowrank_patch_peft_model") not in over_ceiling(leaked)  # PEFT's layers: no leak
