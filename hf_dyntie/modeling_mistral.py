"""DynTie Mistral: the stock Mistral decoder with a tieable layer stack (``model.layers``).

Every decoder layer keeps its own attention (its ``layer_idx``, hence its KV-cache slot and, where the
config has them, its sliding-window or full attention type); only the weights its linear layers and
RMSNorms compute with follow the tie map. The layer-stack path, ``auto_map`` and loss come from
Mistral's entry in ``families.py``."""

from __future__ import annotations

from transformers import MistralForCausalLM, MistralModel

from .configuration import DynTieMistralConfig
from .modeling_dyntie import DynTieMixin


class DynTieMistralModel(DynTieMixin, MistralModel):
    """Mistral decoder stack (no head) whose layers may run an earlier layer's weights."""

    config_class = DynTieMistralConfig


class DynTieMistralForCausalLM(DynTieMixin, MistralForCausalLM):
    """Mistral causal language model whose layers may run an earlier layer's weights."""

    config_class = DynTieMistralConfig
