"""What every DynTie model adds to its stock transformers class: a live tie map over its layer stack.

A DynTie model *is* the stock model (same modules, parameter names, forward code, cache and hooks)
with the leaves of its layer stack made tieable. This mixin owns the tie map of the instance and
keeps four things in step with it: the routing of the leaves, the storage of tied positions, the keys
a checkpoint stores (roots only) and the keys a checkpoint may lack (tied positions).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.utils import logging

from .families import CAUSAL_LM, Family, family_of_class
from .placement import resolve_device_map
from .sharding import check_wrap, is_sharded, route_calls, shard_model
from .tie_map import (
    TieChanges,
    diff_tie_maps,
    format_tie_map,
    normalize_tie_map,
    num_unique_layers,
)
from .tying import (
    TIE_DELTA_INITS,
    check_lora_rank,
    init_deltas_from,
    linear_weights,
    ParameterMoves,
    compile_block,
    is_compiled_block,
    leaf_parameters,
    make_tieable,
    relax_layer,
    release_storage,
    retie_layers,
    route_layers,
    share_storage,
    tie_deltas,
    TieDelta,
    TIE_MODES,
    TieMode,
    uncompile_block,
)

EXPAND_HINT = "`python -m hf_dyntie expand` (or hf_dyntie.convert.expand)"
logger = logging.get_logger(__name__)
# from_pretrained's arguments that reach the config file too (a device_map is checked against its tie map)
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "trust_remote_code")


@contextmanager
def registered_for_auto_class(cls: type, auto_class: str) -> Iterator[None]:
    """Register ``cls`` for ``auto_class`` while the block saves or pushes, then restore the inherited ``None``:
    transformers decides whether a save carries the modeling code by asking the class, not the instance. A class
    the user registered stays as it is."""
    if cls.is_remote_code():
        yield
        return
    cls._auto_class = auto_class
    try:
        yield
    finally:
        del cls._auto_class


def _follow_sharding_hook(model: nn.Module, args: tuple) -> None:
    """Forward pre-hook of every DynTie model: adopts an FSDP2 wrap at the first forward after it (a cheap
    check otherwise), so a model sharded by accelerate or by hand trains without a call of the user's."""
    model._follow_sharding()


class _MergeGuard:
    """Stands in for ``merge`` on a PEFT adapter layer of a DynTie model: refuses while the model has ties
    (see :meth:`DynTieMixin._refuse_merge_into_ties`), else runs the layer's own ``merge``. A plain object,
    so the model still pickles and deep-copies."""

    def __init__(self, model: nn.Module, layer: nn.Module) -> None:
        self.model, self.layer = model, layer

    def __call__(self, *args, **kwargs):
        self.model._refuse_merge_into_ties()
        return type(self.layer).merge(self.layer, *args, **kwargs)


@dataclass
class RetieReport:
    """What :meth:`DynTieMixin.retie` changed. ``moves`` says, parameter by parameter, what the optimizer
    state must follow: released (drop), copied by an untie (copy), merged (average); see
    :func:`hf_dyntie.training.optimizer_state.carry_optimizer_state`."""

    old_tie_map: list[int]
    new_tie_map: list[int]
    changes: TieChanges
    moves: ParameterMoves

    def __repr__(self) -> str:
        moved = self.moves
        return (f"RetieReport({self.old_tie_map} -> {self.new_tie_map}: tied {self.changes.tied}, untied "
                f"{self.changes.untied}, rerouted {self.changes.rerouted}; {len(moved.released)} parameters released, "
                f"{len(moved.copied)} copied, {len(moved.merged)} merged)")


class DynTieMixin:
    """Layer tying for a ``PreTrainedModel`` whose layer stack is the ``nn.ModuleList`` at
    ``_dyntie_layers_path`` (e.g. ``"transformer.h"``).

    A class extending a stock class listed in ``families.py`` gets its stack path, ``auto_map`` and loss
    type from that table when it is declared; a class of your own declares ``_dyntie_layers_path`` (and
    ``_dyntie_auto_map`` to push it to the Hub). A head's inner base model (``model.transformer``,
    ``model.model``, ...) becomes the family's DynTie base model sharing the head's tie map, so it saves
    compactly on its own too."""

    _dyntie_layers_path: str
    _dyntie_auto_map: dict[str, str]
    # transformers guesses the loss from the class name ("...ForCausalLM"); LM-head names need telling
    _dyntie_loss_type: str | None = None
    _dyntie_family: Family | None = None
    _dyntie_module: str | None = None  # the module declaring the family's DynTie classes

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        found = family_of_class(cls)
        if found is None:
            return
        family, head = found
        cls._dyntie_family = family
        cls._dyntie_auto_map = family.auto_map()
        if "_dyntie_layers_path" not in cls.__dict__:
            cls._dyntie_layers_path = family.layers_path(head.stock)
        if head.auto_class == CAUSAL_LM and "_dyntie_loss_type" not in cls.__dict__:
            cls._dyntie_loss_type = "ForCausalLM"
        if cls.__name__ == head.dyntie:
            cls._dyntie_module = cls.__module__

    # ---- the layer stack and its tie map -------------------------------------------------------

    @property
    def dyntie_layers(self) -> nn.ModuleList:
        return self.get_submodule(self._dyntie_layers_path)

    @property
    def tie_map(self) -> list[int]:
        """The current tie map (root form); change it with :meth:`retie`."""
        return list(self._tie_map)

    @property
    def tie_mode(self) -> TieMode:
        """How tied positions take gradients (``config.tie_mode``); setting it re-routes the leaves."""
        return self.config.tie_mode

    @tie_mode.setter
    def tie_mode(self, mode: TieMode) -> None:
        if mode not in TIE_MODES:
            raise ValueError(f"tie_mode must be one of {TIE_MODES}, got {mode!r}")
        self.config.tie_mode = mode
        self.retie(self.tie_map)  # the same map: nothing moves, every leaf is re-routed under the new mode

    def post_init(self) -> None:
        super().post_init()
        if self._dyntie_loss_type is not None:
            self.loss_type = self._dyntie_loss_type
        for layer in self.dyntie_layers:
            make_tieable(layer)
            if self.config.tie_lora_rank:
                relax_layer(layer, self.config.tie_lora_rank)
        # one list object, updated in place by retie: a DynTie inner base model holds the very same one
        self._tie_map = normalize_tie_map(self.config.tie_map, len(self.dyntie_layers))
        self._adopt_base_model()
        self._declare_delta_units()
        self._apply_ties()
        self.register_forward_pre_hook(_follow_sharding_hook)

    def _declare_delta_units(self) -> None:
        """With relaxed ties, list ``TieDelta`` in ``_no_split_modules``: accelerate's FSDP2 wraps every class
        named there, and a delta must be a unit of its own (sharding.py)."""
        if self.config.tie_lora_rank:
            for model in {id(m): m for m in (self, self.base_model)}.values():
                model._no_split_modules = set(getattr(model, "_no_split_modules", None) or ()) | {TieDelta.__name__}

    def _adopt_base_model(self) -> None:
        """Make a head's stock inner base model (``self.transformer``: a ``GPT2Model``) the family's DynTie
        base model (a ``__class__`` swap: same modules and parameters), sharing this head's tie map. Then
        ``model.transformer.save_pretrained(...)`` saves the roots only and reloads with its tie map."""
        family, base = self._dyntie_family, self.base_model
        if family is None or self._dyntie_module is None or base is self or type(base) is not family.base.stock:
            return
        base.__class__ = getattr(sys.modules[self._dyntie_module], family.base.dyntie)
        base.__dict__["_tie_map"] = self._tie_map

    def _apply_ties(self) -> None:
        share_storage(self.dyntie_layers, self._tie_map)
        route_layers(self.dyntie_layers, self._tie_map, self.config.tie_mode)
        if self.sharded:
            route_calls(self.dyntie_layers, self._tie_map)

    def shard(self, **fully_shard_kwargs: Any) -> "DynTieMixin":
        """Shard the model with FSDP2 (``fully_shard``) in place: each block of the layer stack and each relaxed
        delta a unit of its own, then the model. ``fully_shard_kwargs`` (``mesh``, ``reshard_after_forward``,
        ``mp_policy``, ``offload_policy``) go to every call. Under ``accelerate launch`` with an FSDP2 config
        accelerate wraps the model itself (the same units); this is for scripts that use torch directly."""
        shard_model(self, self.dyntie_layers, TieDelta, **fully_shard_kwargs)
        self._follow_sharding()
        return self

    @property
    def sharded(self) -> bool:
        """Whether the layer stack is sharded with FSDP2 (``fully_shard`` on its blocks)."""
        return is_sharded(self.dyntie_layers)

    def _follow_sharding(self) -> None:
        """Once, at the first forward after an FSDP2 wrap: check the wrap, make tied positions' shards views of
        their roots' shards (the wrap gave each its own copy) and route tied blocks through their roots' calls."""
        if self.__dict__.get("_dyntie_sharded") or not self.sharded:
            return
        if self.layers_compiled:
            raise ValueError("compile_layers cannot be combined with FSDP2 yet: train sharded without --torch_compile")
        check_wrap(self.dyntie_layers, TieDelta)
        self._apply_ties()
        self.__dict__["_dyntie_sharded"] = True

    def retie(self, tie_map: list[int], merge: str = "discard") -> RetieReport:
        """Apply a new tie map to the live model.

        Newly untied positions start from a copy of their former root's current weights (the function does
        not change). Newly tied positions release their weights and compute with their root's; their
        dependents follow to the surviving root. With ``merge="discard"`` (the paper code) a root tied away
        loses its trained weights; with ``merge="average"`` the surviving root becomes the mean of the merged
        roots, each weighted by the number of positions it ran. The parameter objects, their order and
        their shapes never change, so an optimizer or a DDP wrapper built earlier stays valid; the report's
        ``moves`` tell a trainer how to carry the optimizer state. ``config.tie_mode`` is (re)applied too.
        """
        new = normalize_tie_map(tie_map, len(self.dyntie_layers))
        old = list(self._tie_map)
        self._follow_sharding()
        moves = retie_layers(self.dyntie_layers, old, new, self.config.tie_mode, merge)
        self._tie_map[:] = new  # in place: a head and its inner base model share this list
        self.config.tie_map = list(new)
        if self.sharded:
            route_calls(self.dyntie_layers, new)
        self._guard_adapter_merges()
        return RetieReport(old, list(new), diff_tie_maps(old, new), moves)

    def tie_trained(self, tie_map: list[int], merge: str = "discard", delta_init: str = "zero") -> RetieReport:
        """Tie a model whose layers were trained on their own (a pretrained checkpoint), keeping as much of what
        they learned as the map allows: ``merge="average"`` makes each group's shared layer the mean of its
        members (every leaf, norms included), ``"discard"`` keeps the group's lowest layer (its root). With
        relaxed ties, ``delta_init="svd"`` starts each newly tied position's deltas at the truncated SVD of its
        own weights minus the shared ones, so at full rank its linear maps are its own again; ``"zero"`` starts
        it at the shared function. See README, "Compress a pretrained model"."""
        if delta_init not in TIE_DELTA_INITS:
            raise ValueError(f"delta_init must be one of {TIE_DELTA_INITS}, got {delta_init!r}")
        if delta_init == "svd" and not self.config.tie_lora_rank:
            raise ValueError("delta_init='svd' needs relaxed ties: set tie_lora_rank (or call relax_ties) first")
        new = normalize_tie_map(tie_map, len(self.dyntie_layers))
        newly = diff_tie_maps(self._tie_map, new).tied
        own = {i: linear_weights(self.dyntie_layers[i]) for i in newly} if delta_init == "svd" else {}
        report = self.retie(new, merge=merge)
        for i, weights in own.items():
            init_deltas_from(self.dyntie_layers[i], self.dyntie_layers[new[i]], weights)
        return report

    @property
    def tie_lora_rank(self) -> int:
        """The rank of every tied position's own delta over its root's weights (0: plain ties)."""
        return self.config.tie_lora_rank

    def relax_ties(self, rank: int) -> None:
        """Give every position a rank-``rank`` delta of its own on each linear leaf (``tying.TieDelta``), active
        while the position is tied: a *relaxed* tie runs its root's weights plus its own low-rank correction.
        The deltas start at zero, so the function does not change; call before the optimizer is built (the
        model gains parameters). A model that has deltas keeps their rank."""
        check_lora_rank(rank)
        current = self.config.tie_lora_rank
        if rank == current:
            return
        if current:
            raise ValueError(f"this model already has relaxed ties of rank {current}; it cannot change to {rank}")
        if self.sharded:
            raise ValueError("relax_ties must be called before the model is sharded (FSDP2 fixes its parameters at wrap time)")
        for layer in self.dyntie_layers:
            relax_layer(layer, rank)
        self.config.tie_lora_rank = rank
        self._declare_delta_units()
        self._apply_ties()

    def _init_weights(self, module: nn.Module) -> None:
        """Stock init, and a relaxed delta's own (``up`` zero) wherever transformers initialises one."""
        if isinstance(module, TieDelta):
            module.reset_parameters()
        else:
            super()._init_weights(module)

    # ---- torch.compile -------------------------------------------------------------------------

    def compile_layers(self, **compile_kwargs: Any) -> None:
        """``torch.compile`` every block of the layer stack, the tie routing outside the compiled region
        (``tying.CompiledBlock``): one compiled graph serves every tie map, so a run visiting dozens of maps
        compiles a few times, not once per map. ``compile_kwargs`` go to ``torch.compile`` (``backend``,
        ``mode``, ``dynamic``, ...). Embeddings, the head and the loss stay eager. Compiling the whole model
        instead (``torch.compile(model)``) still works but specialises on the tie map: one compilation per
        map, and dynamo's eager fall-back after ``recompile_limit`` maps."""
        if self.sharded:
            raise ValueError("compile_layers cannot be combined with FSDP2 yet: train sharded without --torch_compile")
        for block in self.dyntie_layers:
            compile_block(block, **compile_kwargs)

    def uncompile_layers(self) -> None:
        """Undo :meth:`compile_layers` (the blocks run eagerly again)."""
        for block in self.dyntie_layers:
            uncompile_block(block)

    @property
    def layers_compiled(self) -> bool:
        """Whether :meth:`compile_layers` is in effect."""
        return any(is_compiled_block(block) for block in self.dyntie_layers)

    # ---- names of the parameters of each position ----------------------------------------------

    def _position_parameter_names(self, i: int) -> list[str]:
        """The keys of position ``i``'s tieable leaves (never an adapter's tensors), as named today."""
        return [f"{self._dyntie_layers_path}.{i}.{key}" for _, key, _ in leaf_parameters(self.dyntie_layers[i])]

    def tied_parameter_names(self) -> list[str]:
        """State-dict keys of tied positions: not stored in a compact checkpoint."""
        tie_map = self.__dict__.get("_tie_map")
        if tie_map is None:
            return []
        return [name for i, r in enumerate(tie_map) if r != i for name in self._position_parameter_names(i)]

    def idle_parameters(self) -> list[nn.Parameter]:
        """Parameters that take no gradient under the current map: tied positions' own leaves (they alias their
        root) and untied positions' relaxed deltas (off while untied). They hold no optimizer state."""
        idle = []
        for i, (layer, r) in enumerate(zip(self.dyntie_layers, self._tie_map)):
            if r != i:
                idle += [p for _, _, p in leaf_parameters(layer)]
            else:
                idle += [p for _, _, delta in tie_deltas(layer) for p in delta.parameters()]
        return idle

    # transformers reads these two instance attributes when saving and loading; they follow the live map.
    @property
    def _keys_to_ignore_on_save(self) -> set[str]:
        return set(self.__dict__.get("_dyntie_ignore_on_save", ())) | set(self.tied_parameter_names())

    @_keys_to_ignore_on_save.setter
    def _keys_to_ignore_on_save(self, value) -> None:
        self.__dict__["_dyntie_ignore_on_save"] = set(value or ())

    @property
    def _keys_to_ignore_on_load_missing(self) -> set[str]:
        tied = {rf"^{re.escape(name)}$" for name in self.tied_parameter_names()}
        return set(self.__dict__.get("_dyntie_ignore_on_load_missing", ())) | tied

    @_keys_to_ignore_on_load_missing.setter
    def _keys_to_ignore_on_load_missing(self, value) -> None:
        self.__dict__["_dyntie_ignore_on_load_missing"] = set(value or ())

    # ---- loading, moving, saving ----------------------------------------------------------------

    def tie_weights(self, missing_keys: set[str] | None = None, recompute_mapping: bool = True) -> None:
        """Stock embedding tying, then the layer ties. ``from_pretrained`` calls this after the weights
        are loaded, with the keys the checkpoint lacked: that is where a compact checkpoint's sharing is
        rebuilt, and where a checkpoint that does not fit the tie map is refused."""
        super().tie_weights(missing_keys=missing_keys, recompute_mapping=recompute_mapping)
        if "_tie_map" not in self.__dict__:
            return  # called from post_init, before the stack is tieable
        if missing_keys is not None:
            self._check_checkpoint_fits_tie_map(missing_keys)
        self._apply_ties()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Stock ``from_pretrained``, with a ``device_map`` checked against the tie map first (placement.py):
        one that would split or offload a tie group is refused in one line before anything loads."""
        if kwargs.get("device_map") is not None:
            config = kwargs.get("config")
            if not isinstance(config, PretrainedConfig):
                hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
                config = cls.config_class.from_pretrained(config or pretrained_model_name_or_path, **hub)
            tie_map = normalize_tie_map(config.tie_map, config.num_hidden_layers)
            offload = any(kwargs.get(k) for k in ("max_memory", "offload_folder"))
            kwargs["device_map"] = resolve_device_map(kwargs["device_map"], cls._dyntie_layers_path, tie_map, offload)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def _move_missing_keys_from_meta_to_device(self, missing_keys, *args, **kwargs):
        """``from_pretrained`` materialises (and then randomly initialises) every key the checkpoint lacks.
        A compact checkpoint lacks the tied positions by design: leave them on meta, ``tie_weights`` points
        them at their roots' storage right after. Halves the load time of a mostly tied model."""
        tied = set(self.tied_parameter_names())
        return super()._move_missing_keys_from_meta_to_device(
            {key for key in missing_keys if key not in tied}, *args, **kwargs
        )

    @staticmethod
    def _load_pretrained_model(model, *args, **kwargs):
        """``from_pretrained``'s loading step, then the tie-map check at once: a checkpoint that does not fit
        config.json's tie map is refused here, before transformers initialises the missing weights and prints
        its load report (``tie_weights`` checks again for every other way in)."""
        loaded = super(DynTieMixin, type(model))._load_pretrained_model(model, *args, **kwargs)
        missing = getattr(loaded[0], "missing_keys", None)
        if missing is not None and "_tie_map" in model.__dict__:
            model._check_checkpoint_fits_tie_map(set(missing))
        return loaded

    def _check_checkpoint_fits_tie_map(self, missing_keys: set[str]) -> None:
        lacking = [
            name for i, r in enumerate(self._tie_map) if r == i for name in self._position_parameter_names(i)
            if name in missing_keys
        ]
        embedding = self.get_input_embeddings()
        own_names = {id(p): n for n, p in self.named_parameters()}
        no_embedding = [own_names[id(p)] for p in (embedding.parameters() if embedding is not None else ())
                        if own_names.get(id(p)) in missing_keys]
        if no_embedding and len(missing_keys) < len(own_names):  # a partial file, not an empty one
            raise ValueError(
                f"The checkpoint lacks the token embedding ({', '.join(no_embedding)}). Refusing to initialise it "
                f"randomly; the checkpoint is incomplete."
            )
        if lacking:
            raise ValueError(
                f"The checkpoint lacks weights of layers that train on their own under tie_map "
                f"{self._tie_map}: {lacking}. Refusing to initialise them randomly; check that config.json's "
                f"tie_map matches the weights file."
            )
        loaded = {k: v for k, v in self.state_dict(keep_vars=True).items() if k not in missing_keys}
        self._refuse_own_weights_at_tied_positions(loaded)

    def _refuse_own_weights_at_tied_positions(self, values: dict[str, torch.Tensor]) -> None:
        """Raise if ``values`` (full key -> tensor) holds weights for a tied position that differ from its
        root's (taken from ``values`` too, else from the live root). Equal copies (an expanded checkpoint)
        pass; meta tensors (keys a checkpoint lacked) are skipped."""
        prefix = self._dyntie_layers_path
        for i, r in enumerate(self._tie_map):
            if r == i:
                continue
            own = {stock: key for stock, key, _ in leaf_parameters(self.dyntie_layers[i])}
            for stock, root_key, root_param in leaf_parameters(self.dyntie_layers[r]):
                key = f"{prefix}.{i}.{own.get(stock, stock)}"
                value = values.get(key)
                if value is None or value.is_meta:
                    continue
                root = values.get(f"{prefix}.{r}.{root_key}", root_param)
                if not torch.equal(value.detach().cpu(), root.detach().cpu()):
                    raise ValueError(
                        f"The checkpoint holds its own weights for layer {i} ('{key}'), but tie_map {self._tie_map} "
                        f"ties position {i} to layer {r} and the weights differ: loading would silently drop them. "
                        f"Load it untied (tie_map=None) and call model.retie(...) to tie on purpose."
                    )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` that refuses weights of their own at tied positions. A tied
        position's parameters alias its root's storage, so loading them would silently overwrite the root
        (the last key written wins). Tied keys equal to their root's (an expanded checkpoint) load fine;
        keys a compact state dict lacks are left to ``strict``."""
        if "_tie_map" in self.__dict__:
            self._refuse_own_weights_at_tied_positions(state_dict)
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if assign:  # parameters were replaced: tie the embeddings and alias the tied positions again
            self.tie_weights()
        return result

    def _apply(self, fn, recurse: bool = True):
        """``.to()``, ``.half()``, ...: convert roots only, then point tied positions at them again."""
        tie_map = self.__dict__.get("_tie_map")
        if tie_map is None:
            return super()._apply(fn, recurse)
        if not self.sharded:  # sharded: each position's shard converts on its own; aliases are rebuilt after
            release_storage(self.dyntie_layers, tie_map)
        try:
            return super()._apply(fn, recurse)
        finally:
            self._apply_ties()
            self._guard_adapter_merges()

    # ---- adapters (PEFT) -----------------------------------------------------------------------

    def _adapter_layers(self) -> list[nn.Module]:
        """PEFT's adapter layers anywhere in the model (each wraps a stock module as ``base_layer``)."""
        return [m for m in self.modules() if isinstance(m.__dict__.get("_modules", {}).get("base_layer"), nn.Module)]

    def _guard_adapter_merges(self) -> None:
        """Put a :class:`_MergeGuard` in front of every adapter layer's ``merge`` (``merge_and_unload``,
        ``merge_adapter``): merging is refused while the model has ties, before any weight changes."""
        for layer in self._adapter_layers():
            if callable(getattr(type(layer), "merge", None)) and not isinstance(layer.__dict__.get("merge"), _MergeGuard):
                layer.__dict__["merge"] = _MergeGuard(self, layer)

    def _refuse_merge_into_ties(self) -> None:
        """A tied position computes with its root's storage: merging a delta there would write it into
        every position of the group (or, with ``safe_merge``, drop it). Refuse while any position is tied
        and the layer stack carries adapters."""
        tied = [i for i, r in enumerate(self._tie_map) if r != i]
        stack = {id(m) for m in self.dyntie_layers.modules()}
        if tied and any(id(m) in stack for m in self._adapter_layers()):
            raise ValueError(
                f"Cannot merge adapters into a tied DynTie model (tie_map {self._tie_map}): tied positions share "
                f"their root's weights, so a merge would change the function. Save the adapter, untie with "
                f"{EXPAND_HINT}, load the adapter on the expanded model and merge there."
            )

    # PEFT copies its config onto the model once the adapters are in place: the moment to guard them.
    @property
    def peft_config(self):
        try:
            return self.__dict__["_dyntie_peft_config"]
        except KeyError:
            raise AttributeError("peft_config") from None

    @peft_config.setter
    def peft_config(self, value) -> None:
        self.__dict__["_dyntie_peft_config"] = value
        if "_tie_map" in self.__dict__:
            self._guard_adapter_merges()

    @peft_config.deleter
    def peft_config(self) -> None:
        self.__dict__.pop("_dyntie_peft_config", None)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Stock ``save_pretrained`` (roots only, see ``_keys_to_ignore_on_save``). When the class was
        registered for an auto class, ``config.json`` gets an ``auto_map`` with every entry point of the
        family so ``trust_remote_code=True`` loads it with any Auto class."""
        if getattr(self, "_auto_class", None) is not None:
            self.config.auto_map = dict(self._dyntie_auto_map)
        return super().save_pretrained(save_directory, *args, **kwargs)

    def push_to_hub(self, *args, **kwargs):
        """Stock ``push_to_hub``, with the modeling code and an ``auto_map``: a pushed DynTie folder must load
        where hf_dyntie is not installed (``trust_remote_code=True``). A family class not registered with
        ``register_for_auto_class`` is registered for this push only (transformers asks the class)."""
        cls = type(self)
        found = family_of_class(cls)
        if found is None:
            if not cls.is_remote_code():
                logger.warning(f"{cls.__name__} is not registered for an Auto class: the pushed folder carries no "
                               "modeling code and loads only where hf_dyntie is installed")
            return super().push_to_hub(*args, **kwargs)
        with registered_for_auto_class(cls, found[1].auto_class):
            return super().push_to_hub(*args, **kwargs)

    # ---- accounting ----------------------------------------------------------------------------

    def tie_summary(self) -> dict[str, Any]:
        """Parameter counts under the current map: ``total`` as if untied, ``stored`` (unique storage,
        what a compact checkpoint holds: every relaxed delta included) and ``trainable`` (roots, everything
        outside the stack and the relaxed deltas of tied positions, counted apart as ``delta_parameters``)."""
        layers = self.dyntie_layers
        deltas = [sum(p.numel() for _, _, d in tie_deltas(layer) for p in d.parameters()) for layer in layers]
        per_layer = [sum(p.numel() for p in layer.parameters()) - d for layer, d in zip(layers, deltas)]
        stack_ids = {id(p) for p in layers.parameters()}
        outside = sum(p.numel() for p in self.parameters() if id(p) not in stack_ids)
        roots = sum(n for i, n in enumerate(per_layer) if self._tie_map[i] == i)
        active = sum(d for i, d in enumerate(deltas) if self._tie_map[i] != i)  # relaxed deltas of tied positions
        return {
            "tie_map": self.tie_map,
            "num_layers": len(layers),
            "unique_layers": num_unique_layers(self._tie_map),
            "total_parameters": outside + sum(per_layer) + sum(deltas),
            "stored_parameters": outside + roots + sum(deltas),
            "trainable_parameters": outside + roots + active,
            "parameters_per_layer": per_layer[0],
            "parameters_outside_layers": outside,
            "tie_lora_rank": self.config.tie_lora_rank,
            "delta_parameters": active,
            "delta_parameters_per_layer": deltas[0],
        }

    def extra_repr(self) -> str:
        relaxed = f", tie_lora_rank={self.config.tie_lora_rank}" if self.config.tie_lora_rank else ""
        return f"tie_map={format_tie_map(self._tie_map)}, tie_mode={self.config.tie_mode}{relaxed}"
