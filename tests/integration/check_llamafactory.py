"""``python -m lowrank.integrations.llamafactory train cfg.yaml`` trains exactly as LLaMA-Factory's
own launcher on the same YAML with plain PEFT: LoRA and QLoRA (NF4) on a tiny local Llama, fp32,
on the CPU (gradient checkpointing on, LLaMA-Factory's default).

Run by ``./run integration`` in .venv-llamafactory (LLaMA-Factory's pinned transformers / peft /
trl)."""

import json

import pytest
from common import DATA, assert_same_training, train
from tiny_model import build


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    (folder / "dataset_info.json").write_text(json.dumps({"alpaca_tiny": {
        "file_name": DATA,
        "columns": {"prompt": "instruction", "query": "input", "response": "output"}}}))
    return str(folder)


def config(model_dir, dataset_dir, quantized, output_dir):
    return {
        "model_name_or_path": model_dir, **({"quantization_bit": 4, "quantization_method": "bnb"}
                                           if quantized else {}),
        "stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_target": "all",
        "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "dataset": "alpaca_tiny", "dataset_dir": dataset_dir, "template": "alpaca",
        "cutoff_len": 128, "max_samples": 64, "preprocessing_num_workers": 1,
        "overwrite_cache": True, "output_dir": str(output_dir), "overwrite_output_dir": True,
        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
        "learning_rate": 1e-3, "lr_scheduler_type": "constant", "max_steps": 4,
        "logging_steps": 1, "save_strategy": "no", "report_to": "none", "seed": 0,
    }


@pytest.mark.parametrize("adapter", ["lora", "qlora"])
def test_llamafactory_entry_point_trains_as_peft(model_dir, dataset_dir, adapter, tmp_path):
    quantized = adapter == "qlora"
    peft = train(tmp_path, "peft", config(model_dir, dataset_dir, quantized, tmp_path / "peft"),
                 "llamafactory.launcher")
    ours = train(tmp_path, "lowrank",
                 config(model_dir, dataset_dir, quantized, tmp_path / "lowrank"),
                 "lowrank.integrations.llamafactory", "train")
    assert "adapter layers on lowrank's ops" in ours[2], "the callback's summary line is missing"
    assert_same_training(peft, ours, f"llamafactory {adapter}")


def test_llamafactory_entry_point_refuses_unsloth(model_dir, dataset_dir, tmp_path):
    cfg = dict(config(model_dir, dataset_dir, False, tmp_path / "out"), use_unsloth=True)
    with pytest.raises(AssertionError, match="use_unsloth: true replaces"):
        train(tmp_path, "unsloth", cfg, "lowrank.integrations.llamafactory", "train")
