"""A test-only Axolotl plugin: seed torch right before PEFT adds the LoRA layers, so that two runs
start from the same adapter weights (with Axolotl's own seeding they differ from run to run)."""

import torch
from axolotl.integrations.base import BasePlugin


class SeedPlugin(BasePlugin):
    def pre_lora_load(self, cfg, model):
        torch.manual_seed(cfg.seed)
