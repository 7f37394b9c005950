"""DynTie Llama: the stock Llama decoder with a tieable layer stack (``model.layers``).

Every decoder layer keeps its own attention (its ``layer_idx``, hence its KV-cache slot and, where the
config has them, its sliding-window or full attention type); only the weights its linear layers and
RMSNorms compute with follow the tie map. The layer-stack path, ``auto_map`` and loss come from
Llama's entry in ``families.py``."""

from __future__ import annotations

from transformers import LlamaForCausalLM, LlamaModel

from .configuration import DynTieLlamaConfig
from .modeling_dyntie import DynTieMixin


class DynTieLlamaModel(DynTieMixin, LlamaModel):
    """Llama decoder stack (no head) whose layers may run an earlier layer's weights."""

    config_class = DynTieLlamaConfig


class DynTieLlamaForCausalLM(DynTieMixin, LlamaForCausalLM):
    """Llama causal language model whose layers may run an earlier layer's weights."""

    config_class = DynTieLlamaConfig
