"""Configs for DynTie models: each family's stock config plus the tie map and the gradient mode.

Each ``model_type`` is ``"dyntie_"`` + the stock one, the name ``hf_dyntie.families`` registers it under."""

from __future__ import annotations

import transformers


def require_transformers_5(version: str) -> None:
    """Refuse transformers 4.x in one line. This module is the first one ``trust_remote_code`` runs, and its
    strict config dataclasses need transformers 5 (4.x fails with a ``StrictDataclassDefinitionError``)."""
    if int(version.split(".")[0]) < 5:
        raise ImportError(
            f"hf-dyntie requires transformers>=5; use `python -m hf_dyntie expand` for older versions (found "
            f"transformers {version}; expand writes a plain stock folder that any version loads)"
        )


require_transformers_5(transformers.__version__)

from huggingface_hub.dataclasses import strict  # noqa: E402  (after the version check: 4.x may lack it)
from transformers import BertConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config  # noqa: E402

from .tie_map import normalize_tie_map  # noqa: E402
from .tying import TIE_MODES, check_lora_rank  # noqa: E402

_TIE_DOC = """
    tie_map (`list[int]`, *optional*):
        For each position `i`, the layer whose weights it runs (`tie_map[i] <= i`, root form). `None`
        means untied (`list(range(num_hidden_layers))`). Chains such as `[0, 0, 1]` are resolved to roots
        (`[0, 0, 0]`); anything else that is not a tie map raises `ValueError` naming the position.
    tie_mode (`str`, *optional*, defaults to `"share"`):
        `"share"`: tied positions share their root's weights and gradients accumulate into the root.
        `"follow"`: tied positions use the root's current weights with a stop-gradient (the paper code).
    tie_lora_rank (`int`, *optional*, defaults to 0):
        Relaxed ties: when positive, every linear leaf of every position carries its own rank-`r` delta,
        added while the position is tied (the root's weights plus the position's low-rank correction).
"""


def _validate_tying(config) -> None:
    """Normalise ``config.tie_map`` to root form and check ``tie_mode`` and ``tie_lora_rank``; raise ValueError
    otherwise."""
    if config.tie_map is not None:
        config.tie_map = normalize_tie_map(config.tie_map, config.num_hidden_layers)
    if config.tie_mode not in TIE_MODES:
        raise ValueError(f"tie_mode must be one of {TIE_MODES}, got {config.tie_mode!r}")
    check_lora_rank(config.tie_lora_rank)


@strict
class DynTieGPT2Config(GPT2Config):
    __doc__ = "Configuration of a DynTie GPT-2: every field of `GPT2Config`, and\n" + _TIE_DOC

    model_type = "dyntie_gpt2"

    tie_map: list | None = None
    tie_mode: str = "share"
    tie_lora_rank: int = 0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _validate_tying(self)


@strict
class DynTieBertConfig(BertConfig):
    __doc__ = "Configuration of a DynTie BERT: every field of `BertConfig`, and\n" + _TIE_DOC

    model_type = "dyntie_bert"

    tie_map: list | None = None
    tie_mode: str = "share"
    tie_lora_rank: int = 0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _validate_tying(self)


@strict
class DynTieLlamaConfig(LlamaConfig):
    __doc__ = "Configuration of a DynTie Llama: every field of `LlamaConfig`, and\n" + _TIE_DOC

    model_type = "dyntie_llama"

    tie_map: list | None = None
    tie_mode: str = "share"
    tie_lora_rank: int = 0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _validate_tying(self)


@strict
class DynTieQwen2Config(Qwen2Config):
    __doc__ = "Configuration of a DynTie Qwen2: every field of `Qwen2Config`, and\n" + _TIE_DOC

    model_type = "dyntie_qwen2"

    tie_map: list | None = None
    tie_mode: str = "share"
    tie_lora_rank: int = 0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _validate_tying(self)


@strict
class DynTieMistralConfig(MistralConfig):
    __doc__ = "Configuration of a DynTie Mistral: every field of `MistralConfig`, and\n" + _TIE_DOC

    model_type = "dyntie_mistral"

    tie_map: list | None = None
    tie_mode: str = "share"
    tie_lora_rank: int = 0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _validate_tying(self)
