"""The layers ``lowrank.patch_model`` puts in place of a model's linear layers, by the names they
have always had here. Each method's layer lives with the rest of that method in
``lowrank/methods`` (``lora.py``: ``LoraLinear``; ``lora_experts.py``: ``LoraExperts``, over a
mixture-of-experts experts module; ``ia3.py``: ``IA3Linear``); what they share is
in ``lowrank/adapter_layer.py``, the kinds of base layer they wrap are in ``lowrank/base_layers.py``."""

from lowrank.methods.ia3 import IA3Linear
from lowrank.adapter_layer import AdapterLayer
from lowrank.methods.lora import LoraLinear
from lowrank.methods.lora_experts import LoraExperts

__all__ = ["AdapterLayer", "LoraLinear", "LoraExperts", "IA3Linear"]
