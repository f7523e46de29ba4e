"""A test-only Axolotl plugin: seed torch right before PEFT adds the LoRA layers, so that two runs
start from the same adapter weights (Axolotl's own seeding leaves them different from run to run)."""

import torch
from axolotl.integrations.base import BasePlugin


class SeedPlugin(BasePlugin):
    def pre_lora_load(self, cfg, model):
        torch.manual_seed(cfg.seed)
