"""The model families hf-dyntie makes tieable: one table, and everything that needs a fact about a family
reads it here (registration with the Auto classes, the ``auto_map`` written for the Hub, ``convert``,
``python -m hf_dyntie``, the training scripts, and each DynTie class's layer-stack path).

A family is a stock transformers architecture whose layers sit in one ``nn.ModuleList``. Its entry names
the stock config, where the stack lives inside the base model, and the heads: for each stock model class,
the DynTie class that extends it and the Auto class that loads it. The DynTie classes themselves are
plain declarations (``class DynTieLlamaForCausalLM(DynTieMixin, LlamaForCausalLM)`` with its
``config_class``) in ``configuration.py`` and the family's ``modeling_*.py``; the mixin finds its entry
here when the class is declared. Adding a family: see ``docs/design.md``.

This module imports transformers only, never the DynTie classes (it sits below them); it names them, and
resolves a name to a class on demand.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertLMHeadModel,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    MistralModel,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Model,
)

CAUSAL_LM = "AutoModelForCausalLM"
MASKED_LM = "AutoModelForMaskedLM"


@dataclass(frozen=True)
class Head:
    """One model class of a family: the stock class, the DynTie class extending it, the Auto class loading it."""

    stock: type[PreTrainedModel]
    dyntie: str  # class name, declared in the family's module
    auto_class: str  # e.g. "AutoModelForCausalLM"


@dataclass(frozen=True)
class Family:
    stock_config: type[PretrainedConfig]
    config: str  # DynTie config class name, declared in configuration.py
    module: str  # the module declaring the DynTie model classes, e.g. "modeling_llama"
    stack: str  # path of the layer stack (an nn.ModuleList) inside the base model, e.g. "layers"
    heads: tuple[Head, ...]  # the base model (AutoModel) first
    small: str  # --config_overrides for a small model of this family (help texts, README)

    @property
    def name(self) -> str:
        """The stock ``model_type`` ("llama"); ``--model_type llama`` means the DynTie version."""
        return self.stock_config.model_type

    @property
    def model_type(self) -> str:
        return f"dyntie_{self.name}"

    @property
    def base(self) -> Head:
        return self.heads[0]

    def head(self, auto_class: str) -> Head | None:
        return next((h for h in self.heads if h.auto_class == auto_class), None)

    def head_for(self, stock: type[PreTrainedModel]) -> Head | None:
        return next((h for h in self.heads if h.stock is stock), None)

    def default_head(self, config: PretrainedConfig) -> Head:
        """The head a config means when it names no architecture: the masked LM of an encoder family unless
        ``config.is_decoder``, else the causal LM; the base model for a family without language-model heads."""
        masked = self.head(MASKED_LM)
        if masked is not None and not getattr(config, "is_decoder", False):
            return masked
        return self.head(CAUSAL_LM) or self.base

    def layers_path(self, stock: type[PreTrainedModel]) -> str:
        """Where the stack sits in a model of class ``stock``: ``"h"`` in ``GPT2Model``, ``"transformer.h"``
        in ``GPT2LMHeadModel`` (the base model's attribute, ``base_model_prefix``, in front)."""
        return self.stack if stock is self.base.stock else f"{stock.base_model_prefix}.{self.stack}"

    def auto_map(self) -> dict[str, str]:
        """``config.json``'s ``auto_map`` for remote code: every entry point of the family."""
        heads = {h.auto_class: f"{self.module}.{h.dyntie}" for h in self.heads}
        return {"AutoConfig": f"configuration.{self.config}", **heads}

    # ---- the DynTie classes, by name ----------------------------------------------------------------

    def config_class(self) -> type[PretrainedConfig]:
        return getattr(importlib.import_module(".configuration", __package__), self.config)

    def dyntie_class(self, head: Head) -> type[PreTrainedModel]:
        return getattr(importlib.import_module(f".{self.module}", __package__), head.dyntie)


_SMALL_LLAMA = "num_hidden_layers=12,hidden_size=256,num_attention_heads=4,num_key_value_heads=2,intermediate_size=688"

FAMILIES: tuple[Family, ...] = (
    Family(
        GPT2Config, "DynTieGPT2Config", "modeling_gpt2", "h",
        (Head(GPT2Model, "DynTieGPT2Model", "AutoModel"),
         Head(GPT2LMHeadModel, "DynTieGPT2LMHeadModel", CAUSAL_LM)),
        small="n_layer=12,n_embd=256,n_head=4",
    ),
    Family(
        BertConfig, "DynTieBertConfig", "modeling_bert", "encoder.layer",
        (Head(BertModel, "DynTieBertModel", "AutoModel"),
         Head(BertForMaskedLM, "DynTieBertForMaskedLM", MASKED_LM),
         Head(BertLMHeadModel, "DynTieBertLMHeadModel", CAUSAL_LM),
         Head(BertForSequenceClassification, "DynTieBertForSequenceClassification",
              "AutoModelForSequenceClassification")),
        small="num_hidden_layers=12,hidden_size=256,num_attention_heads=4,intermediate_size=1024",
    ),
    Family(
        LlamaConfig, "DynTieLlamaConfig", "modeling_llama", "layers",
        (Head(LlamaModel, "DynTieLlamaModel", "AutoModel"),
         Head(LlamaForCausalLM, "DynTieLlamaForCausalLM", CAUSAL_LM)),
        small=_SMALL_LLAMA,
    ),
    Family(
        Qwen2Config, "DynTieQwen2Config", "modeling_qwen2", "layers",
        (Head(Qwen2Model, "DynTieQwen2Model", "AutoModel"),
         Head(Qwen2ForCausalLM, "DynTieQwen2ForCausalLM", CAUSAL_LM)),
        small=_SMALL_LLAMA,
    ),
    Family(
        MistralConfig, "DynTieMistralConfig", "modeling_mistral", "layers",
        (Head(MistralModel, "DynTieMistralModel", "AutoModel"),
         Head(MistralForCausalLM, "DynTieMistralForCausalLM", CAUSAL_LM)),
        small=_SMALL_LLAMA,
    ),
)


def family_named(name: str | None) -> Family | None:
    """The family of a ``model_type``, stock or DynTie ("llama" or "dyntie_llama"), else ``None``."""
    return next((f for f in FAMILIES if name in (f.name, f.model_type)), None)


def family_of_class(cls: type) -> tuple[Family, Head] | None:
    """The family and head of a model class: the nearest class in its MRO that the table lists."""
    for parent in cls.__mro__:
        for family in FAMILIES:
            head = family.head_for(parent)
            if head is not None:
                return family, head
    return None


def model_types(auto_class: str | None = None) -> list[str]:
    """The DynTie ``model_type`` of every family (with a head for ``auto_class``, if given)."""
    return [f.model_type for f in FAMILIES if auto_class is None or f.head(auto_class) is not None]
