"""DynTie BERT: the stock BERT models with a tieable layer stack (``encoder.layer``).

The layer-stack path, ``auto_map`` and loss come from BERT's entry in ``families.py``."""

from __future__ import annotations

from transformers import BertForMaskedLM, BertForSequenceClassification, BertLMHeadModel, BertModel

from .configuration import DynTieBertConfig
from .modeling_dyntie import DynTieMixin


class DynTieBertModel(DynTieMixin, BertModel):
    """BERT encoder whose layers may run an earlier layer's weights."""

    config_class = DynTieBertConfig


class DynTieBertForMaskedLM(DynTieMixin, BertForMaskedLM):
    """BERT masked language model whose layers may run an earlier layer's weights."""

    config_class = DynTieBertConfig


class DynTieBertLMHeadModel(DynTieMixin, BertLMHeadModel):
    """Causal BERT language model (set ``is_decoder=True``), the way the paper trained BERT."""

    config_class = DynTieBertConfig


class DynTieBertForSequenceClassification(DynTieMixin, BertForSequenceClassification):
    """BERT classifier, to fine-tune an encoder pretrained with dynamic layer tying."""

    config_class = DynTieBertConfig
