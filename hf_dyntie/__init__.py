"""hf-dyntie: Dynamic Layer Tying (David-Hay & Wolf, ICLR 2024) for Hugging Face Transformers.

Importing the package registers the DynTie configs and models with the Auto classes, so
``AutoModelForCausalLM.from_pretrained(path)`` loads a DynTie checkpoint like any other.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)

from .configuration import DynTieBertConfig, DynTieGPT2Config
from .modeling_bert import (
    DynTieBertForMaskedLM,
    DynTieBertForSequenceClassification,
    DynTieBertLMHeadModel,
    DynTieBertModel,
)
from .modeling_dyntie import DynTieMixin, RetieReport
from .modeling_gpt2 import DynTieGPT2LMHeadModel, DynTieGPT2Model
from .policies import PolicyConfig, TyingPolicy, make_policy
from .tie_map import apply_actions, format_tie_map, normalize_tie_map, num_unique_layers

__version__ = "0.1.0"

AutoConfig.register("dyntie_gpt2", DynTieGPT2Config, exist_ok=True)
AutoConfig.register("dyntie_bert", DynTieBertConfig, exist_ok=True)
AutoModel.register(DynTieGPT2Config, DynTieGPT2Model, exist_ok=True)
AutoModelForCausalLM.register(DynTieGPT2Config, DynTieGPT2LMHeadModel, exist_ok=True)
AutoModel.register(DynTieBertConfig, DynTieBertModel, exist_ok=True)
AutoModelForMaskedLM.register(DynTieBertConfig, DynTieBertForMaskedLM, exist_ok=True)
AutoModelForCausalLM.register(DynTieBertConfig, DynTieBertLMHeadModel, exist_ok=True)
AutoModelForSequenceClassification.register(DynTieBertConfig, DynTieBertForSequenceClassification, exist_ok=True)

_LAZY = {"DynTieTrainer": "trainer", "DynTieTrainingArguments": "training_args"}


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
