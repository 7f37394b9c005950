"""Conversions between DynTie models and plain transformers models (docs/design.md, "Checkpoints").

- :func:`expand` turns a DynTie model or compact checkpoint into a plain ``GPT2LMHeadModel`` /
  ``LlamaForCausalLM`` / ``BertForMaskedLM`` / ... folder in which every layer holds its own weights (tied
  layers get copies of their roots), loadable by stock transformers with no custom code.
- :func:`from_stock` brings a plain checkpoint or live model of any family in ``families.py`` (GPT-2, BERT,
  Llama, Qwen2, Mistral) in as a DynTie model, untied first and then, if asked, re-tied to a tie map.

A DynTie model *is* its stock class with tieable leaves, so parameter names are identical both ways;
converting is a matter of swapping the config class and materialising (or sharing) the tied layers.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from .families import FAMILIES, family_named
from .modeling_dyntie import WEIGHTS_ORIGIN_ATTR, DynTieMixin
from .checkpoint_files import is_delta_key
from .deltas import computed_targets, init_deltas_from, tie_deltas, tie_offsets
from .leaves import leaf_parameters
from .tie_map import followed_roots, normalize_tie_map, relaxed_positions
from .tying import TIE_DELTA_INITS, TIE_FROM_PRETRAINED, check_relaxed
from .sharding import full

# DynTie class -> the stock class it extends (and back), for every family of ``families.FAMILIES``. Exact
# types: a DynTie class is also an instance of its stock class, so lookups go through ``type(model)``, never
# ``isinstance``.
DYNTIE_TO_STOCK: dict[type[PreTrainedModel], type[PreTrainedModel]] = {
    family.dyntie_class(head): head.stock for family in FAMILIES for head in family.heads
}
STOCK_TO_DYNTIE = {stock: dyntie for dyntie, stock in DYNTIE_TO_STOCK.items()}

DYNTIE_CONFIG_TO_STOCK: dict[type[PretrainedConfig], type[PretrainedConfig]] = {
    family.config_class(): family.stock_config for family in FAMILIES
}
STOCK_CONFIG_TO_DYNTIE = {stock: dyntie for dyntie, stock in DYNTIE_CONFIG_TO_STOCK.items()}

# config.json fields that only make sense for the DynTie side of a conversion
_DYNTIE_ONLY_FIELDS = ("tie_map", "tie_mode", "tie_lora_rank", "tie_lora_vectors", "tie_lora_roots", "auto_map")
_REBUILT_FIELDS = ("model_type", "architectures", "transformers_version")

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)


def _supported(table: dict[type, type]) -> str:
    return ", ".join(sorted(cls.__name__ for cls in table))


# ---- configs --------------------------------------------------------------------------------------


def _config_fields(config: PretrainedConfig) -> dict:
    fields = config.to_dict()
    for name in (*_DYNTIE_ONLY_FIELDS, *_REBUILT_FIELDS):
        fields.pop(name, None)
    return fields


def to_stock_config(config: PretrainedConfig) -> PretrainedConfig:
    """The stock config (``GPT2Config``, ``LlamaConfig``, ...) with every field of a DynTie config except the tie fields
    and ``auto_map`` (a plain checkpoint must not point at custom code)."""
    stock_class = DYNTIE_CONFIG_TO_STOCK.get(type(config))
    if stock_class is None:
        raise ValueError(
            f"{type(config).__name__} is not a DynTie config; supported: {_supported(DYNTIE_CONFIG_TO_STOCK)}"
        )
    stock = stock_class(**_config_fields(config))
    stock._attn_implementation = config._attn_implementation
    return stock


def to_dyntie_config(
    config: PretrainedConfig, tie_map: list[int] | None = None, tie_mode: str = "share"
) -> PretrainedConfig:
    """The DynTie config for a stock ``GPT2Config`` / ``LlamaConfig`` / ... (same fields, plus the tie fields)."""
    dyntie_class = STOCK_CONFIG_TO_DYNTIE.get(type(config))
    if dyntie_class is None:
        raise ValueError(
            f"cannot bring a {type(config).__name__} (model_type {config.model_type!r}) in as a DynTie model; "
            f"supported: {_supported(STOCK_CONFIG_TO_DYNTIE)}"
        )
    dyntie = dyntie_class(**_config_fields(config), tie_map=tie_map, tie_mode=tie_mode)
    dyntie._attn_implementation = config._attn_implementation
    return dyntie


# ---- live models ----------------------------------------------------------------------------------


def _transplant(
    source: PreTrainedModel,
    target_class: type[PreTrainedModel],
    config: PretrainedConfig,
    state: dict[str, torch.Tensor] | None = None,
) -> PreTrainedModel:
    """A ``target_class`` model holding copies of every tensor of ``source`` (same parameter names).

    The target is built on the meta device, so no throwaway random init is paid for, then takes cloned
    tensors. Cloning is what materialises tied layers: in a DynTie model they alias their root, and the
    state dict hands out that root tensor under the tied position's name. ``state`` replaces the source's
    state dict (cloned tensors, see :func:`stock_state_dict`).
    """
    with torch.device("meta"):
        target = target_class(config)
    if state is None:
        state = {name: tensor.detach().clone() for name, tensor in source.state_dict().items()}
    target.load_state_dict(state, strict=True, assign=True)
    for name, buffer in source.named_buffers():  # non-persistent buffers are not in the state dict
        module_name, _, buffer_name = name.rpartition(".")
        module = target.get_submodule(module_name)
        if buffer_name in module._non_persistent_buffers_set:
            module._buffers[buffer_name] = buffer.detach().clone()
    target.tie_weights()  # embedding <-> head ties (and, for DynTie targets, the layer routing)
    leftovers = [name for name, t in (*target.named_parameters(), *target.named_buffers()) if t.is_meta]
    if leftovers:
        raise RuntimeError(f"conversion left tensors without values: {leftovers}")
    generation_config = getattr(source, "generation_config", None)
    if generation_config is not None and target.can_generate():
        target.generation_config = copy.deepcopy(generation_config)
    return target.train(source.training)


def stock_state_dict(model: DynTieMixin) -> dict[str, torch.Tensor]:
    """``model``'s state dict as its stock class holds it, as fresh tensors: a tied position's weights are
    its root's plus its own relaxed delta (``tie_lora_rank``) and vector offsets (``tie_lora_vectors``), a
    relaxed root's (``tie_lora_roots``) its own weights plus its own, and the deltas themselves are gone."""
    state = {name: t.detach().clone() for name, t in model.state_dict().items() if not is_delta_key(name)}
    prefix, layers = model._dyntie_layers_path, model.dyntie_layers
    paths = {id(module): name for name, module in layers.named_modules()}
    for i in sorted(relaxed_positions(model.tie_map, model.config.tie_lora_roots)):  # same order on every rank
        for _, leaf, delta in tie_deltas(layers[i]):
            key = f"{prefix}.{paths[id(leaf)]}.weight"
            state[key] += delta.weight_delta().detach().to(state[key].dtype)
        for _, leaf, offset in tie_offsets(layers[i]):
            for name, p in offset.named_parameters(recurse=False):
                key = f"{prefix}.{paths[id(leaf)]}.{name}"
                state[key] += full(p).to(state[key].dtype)
    return state


def to_stock(model: PreTrainedModel) -> PreTrainedModel:
    """The plain transformers model computing what the DynTie ``model`` computes: every layer holds its own
    copy of its root's current weights (plus its relaxed delta, folded in). ``model`` is left untouched."""
    stock_class = DYNTIE_TO_STOCK.get(type(model))
    if stock_class is None:
        raise ValueError(
            f"expand() takes a DynTie model; got {type(model).__name__}. Supported: {_supported(DYNTIE_TO_STOCK)}"
        )
    return _transplant(model, stock_class, to_stock_config(model.config), stock_state_dict(model))


# ---- folders --------------------------------------------------------------------------------------


def model_class_for(config: PretrainedConfig, table: dict[type, type]) -> type[PreTrainedModel]:
    """The model class named in ``config.architectures`` (must be a key of ``table``), else the LM head
    of the family (``Family.default_head``: BERT's causal LM if ``is_decoder``, else its masked LM)."""
    by_name = {cls.__name__: cls for cls in table}
    for name in config.architectures or ():
        if name in by_name:
            return by_name[name]
    if config.architectures:
        raise ValueError(f"unsupported architecture {config.architectures}; supported: {_supported(table)}")
    family = family_named(config.model_type)
    if family is None:
        raise ValueError(f"unsupported model_type {config.model_type!r}; supported: {_supported(table)}")
    head = family.default_head(config)
    return family.dyntie_class(head) if type(config) in DYNTIE_CONFIG_TO_STOCK else head.stock


def load_dyntie(path: str | os.PathLike) -> PreTrainedModel:
    """Load a DynTie checkpoint folder with the DynTie class its config names."""
    config = AutoConfig.from_pretrained(path)
    if type(config) not in DYNTIE_CONFIG_TO_STOCK:
        raise ValueError(
            f"{path} holds a {config.model_type!r} checkpoint, not a DynTie one; supported model types: "
            f"{', '.join(c.model_type for c in DYNTIE_CONFIG_TO_STOCK)} (a plain checkpoint needs no expanding)"
        )
    return model_class_for(config, DYNTIE_TO_STOCK).from_pretrained(path, config=config)


def copy_tokenizer_files(source_dir: str | os.PathLike, output_dir: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files found in ``source_dir``; return their names."""
    copied = []
    for name in TOKENIZER_FILES:
        source = Path(source_dir) / name
        if source.is_file():
            shutil.copy2(source, Path(output_dir) / name)
            copied.append(name)
    return copied


def expand(model_or_path: PreTrainedModel | str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Write a plain transformers folder (the stock class the DynTie class extends: ``GPT2LMHeadModel``,
    ``LlamaForCausalLM``, ``BertForMaskedLM``, ``LlamaModel``, ...) computing what a DynTie model
    computes, with every layer materialised.

    ``model_or_path`` is a live DynTie model or a DynTie checkpoint folder (compact or not). The output's
    ``config.json`` has the stock ``model_type`` and ``architectures`` and no tie fields or ``auto_map``, so
    stock transformers loads it without custom code. Tokenizer files of a source folder are copied along.
    Returns the output folder.
    """
    if isinstance(model_or_path, (str, os.PathLike)):
        model = load_dyntie(model_or_path)
    elif isinstance(model_or_path, DynTieMixin):
        model = model_or_path
    else:
        raise ValueError(
            f"expand() takes a DynTie model or checkpoint folder; got {type(model_or_path).__name__}. "
            f"Supported: {_supported(DYNTIE_TO_STOCK)}"
        )
    output_dir = Path(output_dir)
    to_stock(model).save_pretrained(output_dir)
    if isinstance(model_or_path, (str, os.PathLike)):
        copy_tokenizer_files(model_or_path, output_dir)
    return output_dir


def from_stock(
    model_or_path: PreTrainedModel | str | os.PathLike,
    tie_map: list[int] | None = None,
    tie_mode: str = "share",
    init: str = "root",
    tie_lora_rank: int = 0,
    delta_init: str = "zero",
    tie_lora_vectors: bool = False,
    tie_lora_roots: bool = False,
) -> PreTrainedModel:
    """Bring a plain model of a family in ``families.py`` (live, or a checkpoint folder) in as the matching
    DynTie model.

    The result starts untied, computing exactly what the stock model computes; with ``tie_map`` it is then tied
    through :meth:`DynTieMixin.tie_trained`. ``init`` says what each group's shared layer starts from: ``"root"``
    the group's lowest layer, ``"average"`` the mean of the group's layers (every leaf including the norms), or a
    source layer picked by position among the groups, as Relaxed Recursive Transformers (Bae et al., ICLR 2025)
    initialise their looped block (:func:`source_layers`): ``"stepwise"`` spreads the sources evenly from the first
    layer to the last, ``"lower"`` takes the first layers in order. Their looped block is a ``cycle`` map, where
    ``"lower"`` is ``"root"``; with any other map the two differ, and ``"stepwise"`` differs from both (8 layers, 4
    groups: sources 0, 2, 5, 7; a layer left alone keeps its own). ``tie_lora_rank`` gives every tied position a
    relaxed delta of that rank, started at zero or, with ``delta_init="svd"``, at the truncated SVD of its own
    weights minus the shared ones; ``tie_lora_vectors`` adds each tied position's own offset of every norm weight
    and bias (started at zero, or with ``"svd"`` at its exact residual), so ``init="root"`` with full-rank ``"svd"``
    deltas and offsets computes exactly what the stock model did. ``tie_lora_roots`` gives each group's root
    position its own delta and offsets too (started, with ``"svd"``, at its own weights minus the shared ones), so
    every other ``init`` with full rank is exact as well: every position runs the shared layer plus its own
    correction. A live model is copied, never modified.
    """
    if init not in TIE_FROM_PRETRAINED:
        raise ValueError(f"init must be one of {TIE_FROM_PRETRAINED}, got {init!r}")
    check_relaxed(tie_lora_rank, tie_lora_vectors, tie_lora_roots)  # these before any weights load
    if delta_init not in TIE_DELTA_INITS:
        raise ValueError(f"delta_init must be one of {TIE_DELTA_INITS}, got {delta_init!r}")
    if delta_init == "svd" and not tie_lora_rank:
        raise ValueError("delta_init='svd' needs relaxed ties: pass tie_lora_rank > 0")
    if tie_map is None and (init != "root" or delta_init != "zero"):
        raise ValueError(f"init={init!r} and delta_init={delta_init!r} say how to tie: pass the tie_map to tie to")
    if isinstance(model_or_path, (str, os.PathLike)):
        config = AutoConfig.from_pretrained(model_or_path)
        dyntie_config = to_dyntie_config(config, tie_mode=tie_mode)
        model_class = STOCK_TO_DYNTIE[model_class_for(config, STOCK_TO_DYNTIE)]
        model = model_class.from_pretrained(model_or_path, config=dyntie_config)
    else:
        model_class = STOCK_TO_DYNTIE.get(type(model_or_path))
        if model_class is None:
            raise ValueError(
                f"from_stock() takes a plain transformers model; got {type(model_or_path).__name__}. "
                f"Supported: {_supported(STOCK_TO_DYNTIE)}"
            )
        model = _transplant(model_or_path, model_class, to_dyntie_config(model_or_path.config, tie_mode=tie_mode))
        # trained weights: DynTieTrainer's tie_init='auto' then starts from this model's map (see start.weights_origin)
        model.__dict__[WEIGHTS_ORIGIN_ATTR] = f"a live {type(model_or_path).__name__} (from_stock)"
    model.relax_ties(tie_lora_rank, tie_lora_vectors, tie_lora_roots)  # (0, False, False): nothing to do
    if tie_map is None:
        return model
    if init in ("root", "average"):
        model.tie_trained(tie_map, merge="discard" if init == "root" else "average", delta_init=delta_init)
    else:
        _tie_from_sources(model, normalize_tie_map(tie_map, len(model.dyntie_layers)), init, delta_init)
    return model


def source_layers(init: str, num_layers: int, num_groups: int) -> list[int]:
    """The pretrained layer whose weights each group's shared layer starts from, for the groups in the order of
    their roots: ``"lower"`` layers 0, 1, ..., ``"stepwise"`` the layer nearest ``g (L - 1) / (K - 1)`` (a half
    going to the even one), evenly spaced with the first and the last kept (one group: layer 0)."""
    if init == "lower" or num_groups == 1:
        return list(range(num_groups))
    return [round(g * (num_layers - 1) / (num_groups - 1)) for g in range(num_groups)]


@torch.no_grad()
def _tie_from_sources(model: DynTieMixin, tie_map: list[int], init: str, delta_init: str) -> None:
    """Tie an untied model to ``tie_map`` with each root's weights replaced by its source layer's
    (:func:`source_layers`, counted over every group; a layer left alone keeps its own weights: nothing of it is
    shared); with ``"svd"`` every position that carries deltas is then fitted to what it computed before (its
    own weights), roots included where relaxed roots are on."""
    layers = model.dyntie_layers
    roots = sorted(set(tie_map))
    followed = followed_roots(tie_map)
    sources = {r: s for r, s in zip(roots, source_layers(init, len(layers), len(roots))) if r in followed}
    weights = {r: {key: p.detach().clone() for key, _, p in leaf_parameters(layers[s])} for r, s in sources.items()}
    carrying = relaxed_positions(tie_map, model.config.tie_lora_roots) if delta_init == "svd" else []
    own = {i: computed_targets(layers[i], layers[i]) for i in carrying}  # untied: each position's own weights
    model.tie_trained(tie_map, merge="discard")  # deltas and offsets start at zero
    for r, tensors in weights.items():
        for key, _, p in leaf_parameters(layers[r]):
            p.copy_(tensors[key])
    for i, target in own.items():
        init_deltas_from(layers[i], layers[tie_map[i]], target)
