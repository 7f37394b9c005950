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
from .tying import TIE_MODES, check_relaxed  # noqa: E402

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
    tie_lora_vectors (`bool`, *optional*, defaults to `False`):
        With relaxed ties, every leaf with vector parameters (norm weights, biases) also carries the
        position's own full offset of each, added while the position is tied: with full-rank deltas a tied
        position can compute exactly what its own weights did (converting a pretrained model).
    tie_lora_roots (`bool`, *optional*, defaults to `False`):
        With relaxed ties, a root that has followers runs its own delta (and offsets) too, so every member of a
        group is the shared weights plus its own correction: with `average`-merged groups and full-rank deltas
        the tied model can compute exactly what each layer did.
"""


def _validate_tying(config) -> None:
    """Normalise ``config.tie_map`` to root form and check ``tie_mode``, ``tie_lora_rank``,
    ``tie_lora_vectors`` and ``tie_lora_roots``; raise ValueError otherwise."""
    if config.tie_map is not None:
        config.tie_map = normalize_tie_map(config.tie_map, config.num_hidden_layers)
    if config.tie_mode not in TIE_MODES:
        raise ValueError(f"tie_mode must be one of {TIE_MODES}, got {config.tie_mode!r}")
    check_relaxed(config.tie_lora_rank, config.tie_lora_vectors, config.tie_lora_roots)


def dyntie_config(stock: type, name: str, label: str) -> type:
    """The DynTie config class of one family: every field of ``stock``, and ``tie_map``, ``tie_mode``,
    ``tie_lora_rank``, ``tie_lora_vectors`` and ``tie_lora_roots`` (documented above), checked in ``__post_init__``. One definition for the five families;
    each class gets its own name and ``model_type`` (``"dyntie_"`` + the stock one)."""

    def __post_init__(self, **kwargs):
        super(cls, self).__post_init__(**kwargs)
        _validate_tying(self)

    namespace = {
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"Configuration of a DynTie {label}: every field of `{stock.__name__}`, and\n" + _TIE_DOC,
        "__annotations__": {"tie_map": list | None, "tie_mode": str, "tie_lora_rank": int,
                            "tie_lora_vectors": bool, "tie_lora_roots": bool},
        "model_type": "dyntie_" + stock.model_type,
        "tie_map": None,
        "tie_mode": "share",
        "tie_lora_rank": 0,
        "tie_lora_vectors": False,
        "tie_lora_roots": False,
        "__post_init__": __post_init__,
    }
    cls = strict(type(name, (stock,), namespace))
    return cls


DynTieGPT2Config = dyntie_config(GPT2Config, "DynTieGPT2Config", "GPT-2")
DynTieBertConfig = dyntie_config(BertConfig, "DynTieBertConfig", "BERT")
DynTieLlamaConfig = dyntie_config(LlamaConfig, "DynTieLlamaConfig", "Llama")
DynTieQwen2Config = dyntie_config(Qwen2Config, "DynTieQwen2Config", "Qwen2")
DynTieMistralConfig = dyntie_config(MistralConfig, "DynTieMistralConfig", "Mistral")
