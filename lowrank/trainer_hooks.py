"""A patched transformers model in transformers' own machinery, as PEFT's integration is: Trainer
trains it (it refuses purely quantized models), gradient checkpointing keeps input gradients
flowing to the adapters, ``save_pretrained`` (what ``trainer.save_model`` and checkpoints call)
writes the active adapter in PEFT's format, and Trainer resumes from such a checkpoint."""

import functools
import os

from transformers import PreTrainedModel

from lowrank.adapters import (WEIGHTS_NAME, adapter_is_partitioned, restore_adapter_weights,
                              save_adapter)


def attach(model):
    """Tell a transformers model that it carries an adapter, as PEFT's integration does: Trainer
    then trains a 4-bit model (it refuses purely quantized ones), gradient checkpointing keeps
    input gradients flowing to the adapters, and ``save_pretrained`` (what ``trainer.save_model``
    and checkpoints call) writes the active adapter in PEFT's format instead of the whole model."""
    if isinstance(model, PreTrainedModel):
        model._hf_peft_config_loaded = True
        # A partial of a module-level function pickles (torch.save(model), deepcopy); a bound
        # method would be pickled as getattr(model, "_save_pretrained"), which the model lacks.
        model.save_pretrained = functools.partial(_save_pretrained, model)
        _teach_trainer_to_resume()


def detach(model):
    if isinstance(model, PreTrainedModel):
        del model._hf_peft_config_loaded  # back to the class's False
        del model.save_pretrained


def _save_pretrained(model, save_directory, state_dict=None, is_main_process=True, **kwargs):
    """``save_pretrained`` of a patched transformers model: the active adapter, PEFT's format.
    A ``state_dict`` (Trainer passes the one DeepSpeed or FSDP gathered) is where the weights are
    taken from, as PEFT does. Without one, a sharded adapter is gathered by a collective save
    that every process joins, whatever its ``is_main_process`` (rank 0 writes)."""
    name = model.lowrank_state.active
    if is_main_process or (state_dict is None and adapter_is_partitioned(model, name)):
        save_adapter(model, save_directory, adapter_name=name, state_dict=state_dict)


def _teach_trainer_to_resume():
    """Trainer resumes from (and loads the best) adapter-only checkpoint of a ``PeftModel`` alone
    (it tests isinstance); any other model's checkpoint must hold the full weights ("Can't find
    a checkpoint index"). Wrap its two checkpoint loaders, once, so that for a model patched here
    they copy the checkpoint's adapter into the active adapter; other models, and DeepSpeed / FSDP
    runs, which load through their own engines, go to the originals."""
    from transformers import Trainer

    if getattr(Trainer._load_from_checkpoint, "lowrank_wrapped", False):
        return
    def restored(trainer, model, checkpoint):
        if (getattr(model, "lowrank_state", None) is None or trainer.is_deepspeed_enabled
                or trainer.is_fsdp_enabled
                or not os.path.isfile(os.path.join(checkpoint, WEIGHTS_NAME))):
            return False
        restore_adapter_weights(model, checkpoint, model.lowrank_state.active)
        return True

    resume, best = Trainer._load_from_checkpoint, Trainer._load_best_model

    @functools.wraps(resume)
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not restored(self, self.model if model is None else model, resume_from_checkpoint):
            resume(self, resume_from_checkpoint, model)

    @functools.wraps(best)
    def _load_best_model(self):
        if not restored(self, self.model, self.state.best_model_checkpoint):
            best(self)

    _load_from_checkpoint.lowrank_wrapped = True
    Trainer._load_from_checkpoint = _load_from_checkpoint
    Trainer._load_best_model = _load_best_model
    _teach_deepspeed_resume()


def _teach_deepspeed_resume():
    """Under DeepSpeed, Trainer resumes through the engine's own checkpoint, loading the module
    strictly unless the model is a PeftModel. A 4-bit base's state dict holds bitsandbytes' quant
    state entries (``...weight.absmax``, ...), which Linear4bit writes but does not read back, so
    a strict load of a patched 4-bit model fails ("Unexpected key(s)"); load it as Trainer loads a
    PeftModel's: the frozen base comes from ``from_pretrained``, the adapter and optimizer from the
    checkpoint."""
    import transformers.trainer as trainer_module

    load = trainer_module.deepspeed_load_checkpoint

    @functools.wraps(load)
    def deepspeed_load_checkpoint(engine, checkpoint_path, load_module_strict=True):
        if getattr(engine.module, "lowrank_state", None) is not None:
            load_module_strict = False
        return load(engine, checkpoint_path, load_module_strict=load_module_strict)

    trainer_module.deepspeed_load_checkpoint = deepspeed_load_checkpoint
