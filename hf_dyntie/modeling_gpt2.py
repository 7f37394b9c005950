"""DynTie GPT-2: the stock GPT-2 with a tieable block stack (``transformer.h``)."""

from __future__ import annotations

from transformers import GPT2LMHeadModel, GPT2Model

from .configuration import DynTieGPT2Config
from .modeling_dyntie import DynTieMixin

_GPT2_AUTO_MAP = {
    "AutoConfig": "configuration.DynTieGPT2Config",
    "AutoModel": "modeling_gpt2.DynTieGPT2Model",
    "AutoModelForCausalLM": "modeling_gpt2.DynTieGPT2LMHeadModel",
}


class DynTieGPT2Model(DynTieMixin, GPT2Model):
    """GPT-2 transformer (no head) whose blocks may run an earlier block's weights."""

    config_class = DynTieGPT2Config
    _dyntie_layers_path = "h"
    _dyntie_auto_map = _GPT2_AUTO_MAP


class DynTieGPT2LMHeadModel(DynTieMixin, GPT2LMHeadModel):
    """GPT-2 language model whose blocks may run an earlier block's weights."""

    config_class = DynTieGPT2Config
    _dyntie_layers_path = "transformer.h"
    _dyntie_auto_map = _GPT2_AUTO_MAP
    _dyntie_loss_type = "ForCausalLM"
