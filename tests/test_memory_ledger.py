"""The memory ledger (bench/memory.py) in CI: the tiny 4-bit Llama (all-linear LoRA r=16, 4 x 128
tokens, fp32, no gradient checkpointing) on the CPU, lowrank's kernels' saves (Triton interpreter).

The ratios come from fake tensors (seconds, not minutes in the interpreter); one real run shows
they count exactly what real tensors count, with equal losses for the three ways.
"""

import pytest

import lowrank
from bench import memory

MODEL = "tiny-llama-nf4"
# Ceilings on the saved bytes over PEFT's, by LoRA dropout, so that a change saving more fails here:
# the layers one by one (patch_model's with fuse_blocks=False) at their ratios (1.0000 and 0.6306)
# plus a small margin; patch_model and patch_peft_model with their block fusions (the fused LoRA
# MLP) at their ratios (0.7768 and 0.4898, equal) plus a small margin, which meet issue 18's
# targets (TARGETS).
CEILINGS = {"lowrank_patch_peft_model": {0.0: 0.78, 0.05: 0.495},
            "lowrank_unfused": {0.0: 1.005, 0.05: 0.635},
            "lowrank": {0.0: 0.78, 0.05: 0.495}}
TARGETS = {0.0: 0.80, 0.05: 0.55}


def measure(**kwargs):
    """{dropout: case} of the tiny model without checkpointing."""
    cases = memory.run([MODEL], checkpointing=(False,), **kwargs)
    return {case["dropout"]: case for case in cases}


def over_ceiling(cases):
    """{(dropout, way): ratio} of every lowrank way whose saved bytes exceed its ceiling."""
    return {(dropout, way): case["ratios_to_peft"][way]["total"]
            for dropout, case in cases.items() for way, ceilings in CEILINGS.items()
            if case["ratios_to_peft"][way]["total"] > ceilings[dropout]}


@pytest.fixture(scope="module")
def fake_cases():
    return measure(fake=True)


def test_saved_bytes_stay_under_the_ceilings(fake_cases):
    assert set(fake_cases) == set(TARGETS)
    assert not over_ceiling(fake_cases), over_ceiling(fake_cases)


@pytest.mark.parametrize("way", ["lowrank", "lowrank_patch_peft_model"])
@pytest.mark.parametrize("dropout", sorted(TARGETS))
def test_patch_model_and_patch_peft_model_meet_the_issue_targets(fake_cases, dropout, way):
    assert fake_cases[dropout]["ratios_to_peft"][way]["total"] <= TARGETS[dropout]


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
    """Each lowrank LoRA layer (run one by one: lowrank_unfused) also keeps a copy of its input:
    the ledger finds exactly those bytes in the LoRA linears, and the ceiling check fails."""
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
    before = fake_cases[0.0]["ways"]["lowrank_unfused"]["saved"]
    after = leaked[0.0]["ways"]["lowrank_unfused"]["saved"]
    assert after["lora_linears"] - before["lora_linears"] == copies
    assert {c: after[c] for c in memory.CATEGORIES if c != "lora_linears"} == \
        {c: before[c] for c in memory.CATEGORIES if c != "lora_linears"}
    assert (0.0, "lowrank_unfused") in over_ceiling(leaked)
    assert (0.0, "lowrank_patch_peft_model") not in over_ceiling(leaked)  # PEFT's layers: no leak


# Mixture-of-experts blocks (issue 27): the tiny Qwen3-MoE, LoRA r=16 on the experts only. Its
# MoE blocks' saves over PEFT's ParamWrapper (measured 0.7577 for both lowrank ways, the tokens'
# rows gathered in the kernels) plus a small margin. Issue 27's <= 0.5 target is for the
# Qwen3-30B-A3B layer, where PEFT's extra saves (which grow with the experts' weights, not the
# tokens) weigh more: 0.31 there (python -m bench.memory --moe, BENCHMARKS.md); at the tiny sizes
# the activations, equal in both, dominate.
MOE_MODEL = "tiny-qwen3-moe"
MOE_CEILING = 0.76


@pytest.fixture(scope="module")
def moe_real_case():
    (case,) = memory.run_moe([MOE_MODEL], fake=False)  # checks that the three losses agree
    return case


@pytest.mark.parametrize("way", ["lowrank", "lowrank_patch_peft_model"])
def test_moe_block_saves_stay_under_the_ceiling(moe_real_case, way):
    assert moe_real_case["ratios_to_peft"][way]["moe_block"] <= MOE_CEILING


def test_moe_fake_tensors_count_what_real_tensors_count(monkeypatch):
    """The 30B-A3B layer runs on fake tensors, PEFT's parameters made fake: on the tiny model
    that counts exactly what a real run counts. In bf16, as that layer runs: torch's fake
    grouped_mm (transformers' experts path under PEFT) takes bf16 only."""
    bf16 = {**memory.MOE_MODELS[MOE_MODEL], "dtype": "bfloat16"}
    monkeypatch.setitem(memory.MOE_MODELS, MOE_MODEL, bf16)
    (real,) = memory.run_moe([MOE_MODEL], fake=False)
    (fake,) = memory.run_moe([MOE_MODEL], fake=True)
    assert real["ratios_to_peft"]["lowrank"]["moe_block"] < 1  # PEFT's extra saves are there
    for way, result in real["ways"].items():
        assert fake["ways"][way]["saved"] == result["saved"], way
        assert fake["ways"][way]["held_at_once"] == result["held_at_once"], way


# DoRA (issue 19's "peak memory <= PEFT DoRA's"): patch_model's and patch_peft_model's saved bytes
# over PEFT DoRA's on the tiny model with use_dora=True, by dropout, measured at 0.7313 and 0.5523
# (equal for both ways: the magnitude's product is the one M x N tensor DoRA adds, and dropout's
# mask is regenerated from a seed, where PEFT keeps dropout(x)), plus a small margin.
DORA_CEILINGS = {0.0: 0.735, 0.05: 0.555}


def test_dora_saves_less_than_peft_dora():
    cases = memory.run(["tiny-llama-nf4-dora"], checkpointing=(False,), fake=True)
    ratios = {(case["dropout"], way): case["ratios_to_peft"][way]["total"]
              for case in cases for way in ("lowrank", "lowrank_patch_peft_model")}
    assert {dropout for dropout, _ in ratios} == set(DORA_CEILINGS)
    assert all(ratio <= DORA_CEILINGS[dropout] for (dropout, _), ratio in ratios.items()), ratios


def test_report_keeps_the_lora_and_dora_ledgers_apart(tmp_path):
    """BENCHMARKS.md's LoRA ledger section reads memory-<commit>.json, never a newer
    memory-dora-<commit>.json, which gets its own section."""
    import json

    from bench import report

    def result(model, date):
        ways = {"peft": {"saved": {"lora_linears": 2**20, "total": 2**20}, "held_at_once": 1}}
        ratios = {"peft": {"total": 1.0, "layer": 1.0, "held_at_once": 1.0}}
        return {"date": date, "commit": "0" * 40, "device": {"name": "cpu", "ops": "triton"},
                "versions": {"torch": "", "transformers": "", "peft": "", "bitsandbytes": ""},
                "cases": [{"model": model, "tokens": [1, 2], "dtype": "float32", "fake": False,
                           "dropout": 0.0, "gradient_checkpointing": False, "ways": ways,
                           "ratios_to_peft": ratios}]}

    (tmp_path / "memory-a.json").write_text(json.dumps(result("lora-model", "2026-01-01")))
    (tmp_path / "memory-dora-b.json").write_text(json.dumps(result("dora-model", "2026-01-02")))
    lora = report.memory_section(tmp_path)
    dora = report.memory_section(tmp_path, report.MEMORY_DORA_PREFIX)
    assert "lora-model" in lora and "dora-model" not in lora
    assert "dora-model" in dora and "lora-model" not in dora and "DoRA" in dora
