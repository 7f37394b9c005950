"""hf-dyntie: Dynamic Layer Tying (David-Hay & Wolf, ICLR 2024) for Hugging Face Transformers.

Importing the package registers the DynTie configs and models with the Auto classes, so
``AutoModelForCausalLM.from_pretrained(path)`` loads a DynTie checkpoint like any other.
"""

import transformers

from .configuration import (
    DynTieBertConfig,
    DynTieGPT2Config,
    DynTieLlamaConfig,
    DynTieMistralConfig,
    DynTieQwen2Config,
)
from .families import FAMILIES
from .modeling_bert import (
    DynTieBertForMaskedLM,
    DynTieBertForSequenceClassification,
    DynTieBertLMHeadModel,
    DynTieBertModel,
)
from .modeling_dyntie import DynTieMixin, RetieReport
from .modeling_gpt2 import DynTieGPT2LMHeadModel, DynTieGPT2Model
from .modeling_llama import DynTieLlamaForCausalLM, DynTieLlamaModel
from .modeling_mistral import DynTieMistralForCausalLM, DynTieMistralModel
from .modeling_qwen2 import DynTieQwen2ForCausalLM, DynTieQwen2Model
from .training.policies import PolicyConfig, TyingPolicy, make_policy
from .tie_map import apply_actions, format_tie_map, normalize_tie_map, num_unique_layers

__version__ = "0.1.0"

for _family in FAMILIES:  # every family's config and heads, from the one table
    _config_class = _family.config_class()
    transformers.AutoConfig.register(_family.model_type, _config_class, exist_ok=True)
    for _head in _family.heads:
        getattr(transformers, _head.auto_class).register(_config_class, _family.dyntie_class(_head), exist_ok=True)
del _family, _config_class, _head

_LAZY = {"DynTieTrainer": "training.trainer", "DynTieTrainingArguments": "training.training_args"}


def __getattr__(name: str):
    """The trainer pulls in transformers.Trainer, accelerate and matplotlib: import it on first use only,
    so loading a model or running ``python -m hf_dyntie inspect`` stays light."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DynTieBertConfig",
    "DynTieBertForMaskedLM",
    "DynTieBertForSequenceClassification",
    "DynTieBertLMHeadModel",
    "DynTieBertModel",
    "DynTieGPT2Config",
    "DynTieGPT2LMHeadModel",
    "DynTieGPT2Model",
    "DynTieLlamaConfig",
    "DynTieLlamaForCausalLM",
    "DynTieLlamaModel",
    "DynTieMistralConfig",
    "DynTieMistralForCausalLM",
    "DynTieMistralModel",
    "DynTieQwen2Config",
    "DynTieQwen2ForCausalLM",
    "DynTieQwen2Model",
    "FAMILIES",
    "DynTieMixin",
    "DynTieTrainer",
    "DynTieTrainingArguments",
    "PolicyConfig",
    "TyingPolicy",
    "make_policy",
    "RetieReport",
    "apply_actions",
    "format_tie_map",
    "normalize_tie_map",
    "num_unique_layers",
]
