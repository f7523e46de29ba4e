"""Adapter methods, one module each: ``lora.py`` (LoRA, and DoRA as a variant of it) and
``ia3.py``. A method module holds everything lowrank does for that method:

- ``Layer``: the ``AdapterLayer`` subclass (``lowrank/adapter_layer.py``) that ``patch_model`` puts in place,
  with its weights named as PEFT names them, its forward on a ``lowrank.ops`` op, its merges;
- ``layer_class(module)``: the layer class that wraps ``module`` (LoRA: ``LoraExperts``,
  ``methods/lora_experts.py``, for a mixture-of-experts experts module; else ``Layer``);
- ``NAME`` (``patch_model(method=...)``), ``LABEL`` (reports), ``PEFT_TYPE``, ``KEY`` (its PEFT
  weight keys) and ``KEY_WHAT``;
- ``patch_settings``: ``patch_model``'s arguments checked, defaults applied;
- ``to_peft`` / ``check_peft_config`` / ``from_peft``: its config and weights in PEFT's format;
  ``FITTING``, ``fitting_settings``, ``held_settings``: what must agree to restore saved weights;
- ``peft_layer_classes``, ``peft_refusals``, ``peft_forward``: ``patch_peft_model``'s forward
  for PEFT's own layers of that method.

A new method is one more module here, listed in ``METHODS``.
"""

from lowrank.methods import ia3, lora

METHODS = {method.NAME: method for method in (lora, ia3)}
BY_PEFT_TYPE = {method.PEFT_TYPE: method for method in METHODS.values()}

