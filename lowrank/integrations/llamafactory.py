"""LLaMA-Factory with lowrank: its LoRA / QLoRA runs execute PEFT's adapter layers on lowrank's ops.

LLaMA-Factory has no config key that loads outside code, so lowrank comes in through the
``callbacks`` argument of its ``run_exp``. Either run the same YAML as ``llamafactory-cli train``
with this entry point::

    python -m lowrank.integrations.llamafactory train cfg.yaml [key=value ...]

or, from Python, pass the callback yourself::

    from llamafactory.train.tuner import run_exp
    from lowrank.integrations.llamafactory import LowrankCallback
    run_exp(callbacks=[LowrankCallback()])   # reads the YAML path from sys.argv, as the CLI does

The callback calls ``lowrank.patch_peft_model`` on the trainer's model in ``on_train_begin``, when
LLaMA-Factory has made it a ``PeftModel``, and logs what it accelerated.
"""

import logging
import sys

from transformers import TrainerCallback

import lowrank

logger = logging.getLogger(__name__)
USAGE = "usage: python -m lowrank.integrations.llamafactory train CONFIG.yaml [key=value ...]"


class LowrankCallback(TrainerCallback):
    """Patches the trainer's ``PeftModel`` once, when training begins (``strict``: fail when some
    adapter layer or adapter stays on PEFT's forward, instead of logging it)."""

    def __init__(self, strict=False):
        self.strict = strict
        self.report = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.report is not None:
            return
        if model is None:
            raise ValueError("lowrank.integrations.llamafactory: the trainer passed no model to "
                             "on_train_begin")
        if not hasattr(model, "peft_config"):
            raise ValueError("lowrank.integrations.llamafactory: the model is not a PeftModel; "
                             "lowrank accelerates `finetuning_type: lora` runs (LoRA and QLoRA)")
        self.report = lowrank.patch_peft_model(model)
        left = {**self.report.not_accelerated, **self.report.adapters_not_served}
        if self.strict and left:
            raise ValueError("lowrank.integrations.llamafactory: strict, and these stay on "
                             f"PEFT's forward: {left}")
        kinds = sorted(set(self.report.accelerated.values()))
        # A warning: LLaMA-Factory sets up handlers for its own loggers only, and Python's
        # last-resort handler prints warnings and above.
        logger.warning("lowrank: %d adapter layers on lowrank's ops (%s), %d left to PEFT%s",
                       len(self.report.accelerated), "; ".join(kinds) or "none", len(left),
                       "".join(f"; {path}: {why}" for path, why in left.items()))


def check_config(config):
    """Refuse LLaMA-Factory options under which lowrank's layers would not run."""
    if config.get("use_unsloth"):
        raise SystemExit("lowrank.integrations.llamafactory: use_unsloth: true replaces the LoRA "
                         "layers' forwards with unsloth's kernels, so lowrank's would never run; "
                         "use one or the other")
    if config.get("finetuning_type", "lora") != "lora":
        raise SystemExit(f"lowrank.integrations.llamafactory: finetuning_type: "
                         f"{config['finetuning_type']}; lowrank accelerates LoRA / QLoRA runs only")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] != "train" or not argv[1].endswith((".yaml", ".yml")):
        raise SystemExit(USAGE)
    from llamafactory.hparams.parser import read_args
    from llamafactory.train.tuner import run_exp

    sys.argv = [sys.argv[0], *argv[1:]]  # read_args reads the YAML and overrides as the CLI does
    config = read_args()
    check_config(config)
    run_exp(args=config, callbacks=[LowrankCallback()])


if __name__ == "__main__":
    main()
