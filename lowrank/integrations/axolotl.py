"""An Axolotl plugin that puts the PEFT LoRA / QLoRA layers of a run on lowrank's fused ops.

In the run's YAML::

    plugins:
      - lowrank.integrations.axolotl.LowrankPlugin

Axolotl builds the model and wraps it with PEFT as usual; the plugin calls
``lowrank.patch_peft_model`` on the ``PeftModel`` in ``post_model_load`` and logs one line saying
what it accelerated and what it left on PEFT's forward. Losses, gradients and the saved adapter are
PEFT's (bit-identical on the reference ops).

Axolotl's own fused LoRA kernels (``lora_mlp_kernel``, ``lora_qkv_kernel``, ``lora_o_kernel``,
``lora_embedding_kernel``), which it turns on by itself for ``adapter: lora|qlora``, replace the
attention and MLP forwards so that neither PEFT's layer forwards nor ours would run: the plugin
turns them off, and refuses a config that sets one of them to true.
"""

import logging

from pydantic import BaseModel

from axolotl.integrations.base import BasePlugin

import lowrank

# Under "axolotl", whose handlers Axolotl configures: the one line lands in the run's log.
LOG = logging.getLogger("axolotl.integrations.lowrank")
AXOLOTL_LORA_KERNELS = (
    "lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")


class LowrankArgs(BaseModel):
    """The plugin's keys in the run's YAML (validated by Axolotl with its own)."""

    lowrank_patch: bool = True
    """Run PEFT's LoRA layers on lowrank's ops; false runs as if the plugin were not listed."""
    lowrank_strict: bool = False
    """Fail when some adapter layer or adapter has to stay on PEFT's forward (aLoRA, LoRA on an
    embedding, an 8-bit base, ...) instead of logging it."""


class LowrankPlugin(BasePlugin):
    """``plugins: [lowrank.integrations.axolotl.LowrankPlugin]``."""

    def get_input_args(self):
        return "lowrank.integrations.axolotl.LowrankArgs"

    def register(self, cfg):
        """Runs on the raw config before Axolotl validates it (and before it would enable its own
        LoRA kernels): those would make our layers never run, so they are set off here."""
        if not cfg.get("lowrank_patch", True):
            return
        forced = [key for key in AXOLOTL_LORA_KERNELS if cfg.get(key)]
        if forced:
            raise ValueError(
                f"lowrank.integrations.axolotl: {', '.join(forced)}: true turns on Axolotl's own "
                "fused LoRA kernels, which replace whole blocks' forwards so lowrank's layers "
                "would never run; remove the key(s), or the lowrank plugin (use one or the "
                "other)")
        for key in AXOLOTL_LORA_KERNELS:
            cfg[key] = False

    def post_model_load(self, cfg, model):
        if not cfg.lowrank_patch:
            LOG.info("lowrank: lowrank_patch is false, the run goes as without the plugin")
            return
        if not cfg.adapter:
            raise ValueError("lowrank.integrations.axolotl: the run has no `adapter:` (lora or "
                             "qlora); lowrank accelerates PEFT adapter layers only")
        report = lowrank.patch_peft_model(model)
        left = {**report.not_accelerated, **report.adapters_not_served}
        if cfg.lowrank_strict and left:
            raise ValueError("lowrank.integrations.axolotl: lowrank_strict is set and these stay "
                             f"on PEFT's forward: {left}")
        kinds = sorted(set(report.accelerated.values()))
        LOG.info("lowrank: %d adapter layers on lowrank's ops (%s), %d left to PEFT%s",
                 len(report.accelerated), "; ".join(kinds) or "none", len(left),
                 "".join(f"; {path}: {why}" for path, why in left.items()))
