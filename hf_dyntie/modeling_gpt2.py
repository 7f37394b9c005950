"""DynTie GPT-2: the stock GPT-2 with a tieable block stack (``transformer.h``).

The layer-stack path, ``auto_map`` and loss come from GPT-2's entry in ``families.py``."""

from __future__ import annotations

from transformers import GPT2LMHeadModel, GPT2Model

from .configuration import DynTieGPT2Config
from .modeling_dyntie import DynTieMixin


class DynTieGPT2Model(DynTieMixin, GPT2Model):
    """GPT-2 transformer (no head) whose blocks may run an earlier block's weights."""

    config_class = DynTieGPT2Config


class DynTieGPT2LMHeadModel(DynTieMixin, GPT2LMHeadModel):
    """GPT-2 language model whose blocks may run an earlier block's weights."""

    config_class = DynTieGPT2Config
