"""hf-dyntie: Dynamic Layer Tying (David-Hay & Wolf, ICLR 2024) for Hugging Face Transformers.

Importing the package registers the DynTie configs and models with the Auto classes, so
``AutoModelForCausalLM.from_pretrained(path)`` loads a DynTie checkpoint like any other. The public names
(``from hf_dyntie import DynTieLlamaForCausalLM``) are imported on first use, so the trainer (transformers'
Trainer, accelerate, matplotlib) and the policies load only when asked for.

One process skips the registration at import: ``python -m hf_dyntie``. Python imports this package before
running ``__main__``, and the commands register when they read a checkpoint, so ``--help``, a flag error or
a missing folder answer without loading torch (seconds on a cold start).
"""

from __future__ import annotations

import functools
import importlib
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# every public name -> the module (below this package) that defines it
_EXPORTS = {
    **dict.fromkeys(
        ["DynTieBertConfig", "DynTieGPT2Config", "DynTieLlamaConfig", "DynTieMistralConfig", "DynTieQwen2Config"],
        "configuration",
    ),
    **dict.fromkeys(
        ["DynTieBertForMaskedLM", "DynTieBertForSequenceClassification", "DynTieBertLMHeadModel", "DynTieBertModel"],
        "modeling_bert",
    ),
    **dict.fromkeys(["DynTieGPT2LMHeadModel", "DynTieGPT2Model"], "modeling_gpt2"),
    **dict.fromkeys(["DynTieLlamaForCausalLM", "DynTieLlamaModel"], "modeling_llama"),
    **dict.fromkeys(["DynTieMistralForCausalLM", "DynTieMistralModel"], "modeling_mistral"),
    **dict.fromkeys(["DynTieQwen2ForCausalLM", "DynTieQwen2Model"], "modeling_qwen2"),
    "FAMILIES": "families",
    **dict.fromkeys(["DynTieMixin", "RetieReport"], "modeling_dyntie"),
    "DynTieTrainer": "training.trainer",
    "DynTieTrainingArguments": "training.training_args",
    **dict.fromkeys(["PolicyConfig", "TyingPolicy", "make_policy"], "training.policies"),
    **dict.fromkeys(["apply_actions", "format_tie_map", "normalize_tie_map", "num_unique_layers"], "tie_map"),
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # what type checkers and editors see; at run time __getattr__ imports these on first use
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
    from .tie_map import apply_actions, format_tie_map, normalize_tie_map, num_unique_layers
    from .training.policies import PolicyConfig, TyingPolicy, make_policy
    from .training.trainer import DynTieTrainer
    from .training.training_args import DynTieTrainingArguments


def __getattr__(name: str) -> Any:
    """A public name, imported on first use (then kept): loading a model never imports the training wing."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


@functools.cache
def register_auto_classes() -> None:
    """Register every family's DynTie config and heads with the Auto classes, from the one table (once)."""
    import transformers

    from .families import FAMILIES

    for family in FAMILIES:
        config_class = family.config_class()
        transformers.AutoConfig.register(family.model_type, config_class, exist_ok=True)
        for head in family.heads:
            getattr(transformers, head.auto_class).register(config_class, family.dyntie_class(head), exist_ok=True)


def _imported_by_python_m() -> bool:
    """Whether Python is importing this package to run ``python -m hf_dyntie``: while it looks ``__main__`` up,
    ``sys.argv[0]`` is ``"-m"`` (documented), and ``sys.orig_argv`` names the module it runs."""
    if sys.argv[:1] != ["-m"]:
        return False
    args = getattr(sys, "orig_argv", [])
    for i, arg in enumerate(args):
        if arg == "-m":
            return args[i + 1 : i + 2] == [__name__]
        if arg.startswith("-m"):
            return arg == f"-m{__name__}"
    return False


if not _imported_by_python_m():
    register_auto_classes()
