"""DynTie Qwen2: the stock Qwen2 decoder with a tieable layer stack (``model.layers``).

Every decoder layer keeps its own attention (its ``layer_idx``, hence its KV-cache slot and, where the
config has them, its sliding-window or full attention type); only the weights its linear layers and
RMSNorms compute with follow the tie map. The layer-stack path, ``auto_map`` and loss come from
Qwen2's entry in ``families.py``."""

from __future__ import annotations

from transformers import Qwen2ForCausalLM, Qwen2Model

from .configuration import DynTieQwen2Config
from .modeling_dyntie import DynTieMixin


class DynTieQwen2Model(DynTieMixin, Qwen2Model):
    """Qwen2 decoder stack (no head) whose layers may run an earlier layer's weights."""

    config_class = DynTieQwen2Config


class DynTieQwen2ForCausalLM(DynTieMixin, Qwen2ForCausalLM):
    """Qwen2 causal language model whose layers may run an earlier layer's weights."""

    config_class = DynTieQwen2Config
