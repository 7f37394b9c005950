"""DynTie BERT: the stock BERT models with a tieable layer stack (``encoder.layer``)."""

from __future__ import annotations

from transformers import BertForMaskedLM, BertForSequenceClassification, BertLMHeadModel, BertModel

from .configuration import DynTieBertConfig
from .modeling_dyntie import DynTieMixin

_BERT_AUTO_MAP = {
    "AutoConfig": "configuration.DynTieBertConfig",
    "AutoModel": "modeling_bert.DynTieBertModel",
    "AutoModelForMaskedLM": "modeling_bert.DynTieBertForMaskedLM",
    "AutoModelForCausalLM": "modeling_bert.DynTieBertLMHeadModel",
    "AutoModelForSequenceClassification": "modeling_bert.DynTieBertForSequenceClassification",
}


class DynTieBertModel(DynTieMixin, BertModel):
    """BERT encoder whose layers may run an earlier layer's weights."""

    config_class = DynTieBertConfig
    _dyntie_layers_path = "encoder.layer"
    _dyntie_auto_map = _BERT_AUTO_MAP


class DynTieBertForMaskedLM(DynTieMixin, BertForMaskedLM):
    """BERT masked language model whose layers may run an earlier layer's weights."""

    config_class = DynTieBertConfig
    _dyntie_layers_path = "bert.encoder.layer"
    _dyntie_auto_map = _BERT_AUTO_MAP


class DynTieBertLMHeadModel(DynTieMixin, BertLMHeadModel):
    """Causal BERT language model (set ``is_decoder=True``), the way the paper trained BERT."""

    config_class = DynTieBertConfig
    _dyntie_layers_path = "bert.encoder.layer"
    _dyntie_auto_map = _BERT_AUTO_MAP
    _dyntie_loss_type = "ForCausalLM"


class DynTieBertForSequenceClassification(DynTieMixin, BertForSequenceClassification):
    """BERT classifier, to fine-tune an encoder pretrained with dynamic layer tying."""

    config_class = DynTieBertConfig
    _dyntie_layers_path = "bert.encoder.layer"
    _dyntie_auto_map = _BERT_AUTO_MAP
