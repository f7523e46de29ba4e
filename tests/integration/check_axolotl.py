"""Axolotl with ``plugins: [lowrank.integrations.axolotl.LowrankPlugin]`` trains exactly as Axolotl
with plain PEFT: LoRA and QLoRA (NF4) on a tiny local Llama, fp32, on the CPU.

Run by ``./run integration`` in .venv-axolotl (Axolotl's pinned transformers / peft / trl)."""

import pytest
from common import DATA, assert_same_training, train
from tiny_model import build

PLUGIN = "lowrank.integrations.axolotl.LowrankPlugin"
SEED_PLUGIN = "axolotl_seed.SeedPlugin"  # the same LoRA initial weights in both runs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build(str(tmp_path_factory.mktemp("tiny-llama")))


def config(model_dir, adapter, output_dir, plugins):
    return {
        "base_model": model_dir, "adapter": adapter, "load_in_4bit": adapter == "qlora",
        "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "lora_target_linear": True,
        "plugins": plugins,
        "datasets": [{"path": DATA, "ds_type": "json", "type": "alpaca"}], "val_set_size": 0,
        "dataset_prepared_path": f"{output_dir}-prepared", "output_dir": str(output_dir),
        "sequence_len": 128, "sample_packing": False, "micro_batch_size": 4,
        "gradient_accumulation_steps": 1, "max_steps": 4, "optimizer": "adamw_torch",
        "learning_rate": 1e-3, "lr_scheduler": "constant", "bf16": False, "fp16": False,
        "tf32": False, "logging_steps": 1, "save_strategy": "no", "seed": 0,
        # The baseline must run PEFT's layer forwards too, not Axolotl's fused LoRA kernels.
        **({} if PLUGIN in plugins else {key: False for key in (
            "lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")}),
    }


@pytest.mark.parametrize("adapter", ["lora", "qlora"])
def test_axolotl_plugin_trains_as_peft(model_dir, adapter, tmp_path):
    peft = train(tmp_path, "peft", config(model_dir, adapter, tmp_path / "peft", [SEED_PLUGIN]),
                 "axolotl.cli.train")
    ours = train(tmp_path, "lowrank",
                 config(model_dir, adapter, tmp_path / "lowrank", [SEED_PLUGIN, PLUGIN]),
                 "axolotl.cli.train")
    assert "adapter layers on lowrank's ops" in ours[2], "the plugin's summary line is missing"
    assert_same_training(peft, ours, f"axolotl {adapter}")


def test_axolotl_plugin_refuses_axolotls_own_lora_kernels(model_dir, tmp_path):
    cfg = dict(config(model_dir, "lora", tmp_path / "out", [PLUGIN]), lora_qkv_kernel=True)
    with pytest.raises(AssertionError, match="lora_qkv_kernel: true turns on Axolotl's own"):
        train(tmp_path, "forced", cfg, "axolotl.cli.train")
