"""What every DynTie model adds to its stock transformers class: a live tie map over its layer stack.

A DynTie model *is* the stock model (same modules, parameter names, forward code, cache and hooks)
with the leaves of its layer stack made tieable. This mixin owns the tie map of the instance and
keeps four things in step with it: the routing of the leaves, the storage of tied positions, the keys
a checkpoint stores (roots only) and the keys a checkpoint may lack (tied positions).

Here: the family declaration, the stack and its map, ``retie`` / ``tie_trained`` / ``relax_ties``, FSDP2,
``compile_layers`` and ``.to()``. The rest comes from small mixins it inherits: parameter names and counts
(tied_parameters.py), checkpoint keys and loading checks (loading.py), PEFT merge guards (adapters.py), saves
and pushes that carry the modeling code (hub.py).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from .adapters import AdapterGuardMixin
from .compiled import compile_block, is_compiled_block, uncompile_block
from .deltas import DELTA_CLASSES, computed_targets, init_deltas_from, relax_layer, relaxed_parameters
from .families import CAUSAL_LM, Family, family_of_class
from .hub import HubMixin
from .leaves import make_tieable
from .loading import LoadingMixin
from .retie import RetieReport, refitted_positions, retie_layers
from .sharding import check_wrap, is_sharded, route_calls, shard_model
from .tie_map import diff_tie_maps, format_tie_map, normalize_tie_map, relaxed_positions, relaxed_positions_across
from .tied_parameters import TiedParametersMixin
from .tying import TIE_DELTA_INITS, TIE_MODES, TieMode, check_relaxed, release_storage, route_layers, share_storage

# The note a model carries when its weights were not freshly initialised and not loaded by from_pretrained
# (from_stock of a live model, a finished DynTieTrainer run): a later trainer then keeps its trained layers.
WEIGHTS_ORIGIN_ATTR = "_dyntie_weights_from"

def _relaxed_words(rank: int, vectors: bool, roots: bool) -> str:
    """``rank 2 with vector offsets, roots relaxed``: a relaxed-tie setting in an error message."""
    return f"rank {rank} {'with' if vectors else 'without'} vector offsets" + (", roots relaxed" if roots else "")


def _follow_sharding_hook(model: nn.Module, args: tuple) -> None:
    """Forward pre-hook of every DynTie model: adopts an FSDP2 wrap at the first forward after it (a cheap
    check otherwise), so a model sharded by accelerate or by hand trains without a call of the user's."""
    model._follow_sharding()


class DynTieMixin(TiedParametersMixin, LoadingMixin, AdapterGuardMixin, HubMixin):
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
                relax_layer(layer, self.config.tie_lora_rank, self.config.tie_lora_vectors)
        # one list object, updated in place by retie: a DynTie inner base model holds the very same one
        self._tie_map = normalize_tie_map(self.config.tie_map, len(self.dyntie_layers))
        self._adopt_base_model()
        self._declare_delta_units()
        self._apply_ties()
        self.register_forward_pre_hook(_follow_sharding_hook)

    def _declare_delta_units(self) -> None:
        """With relaxed ties, list ``TieDelta`` and ``TieOffset`` in ``_no_split_modules``: accelerate's FSDP2
        wraps every class named there, and a delta must be a unit of its own (sharding.py)."""
        if self.config.tie_lora_rank:
            names = {cls.__name__ for cls in DELTA_CLASSES}
            for model in {id(m): m for m in (self, self.base_model)}.values():
                model._no_split_modules = set(getattr(model, "_no_split_modules", None) or ()) | names

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
        self._route(self._tie_map)

    def _route(self, tie_map: list[int], active: set[int] | None = None) -> None:
        """Point every position's leaves (and, under FSDP2, the tied blocks' calls) at ``tie_map``'s roots, the
        relaxed deltas of ``active`` on (default: ``tie_map``'s own, ``tie_map.relaxed_positions``)."""
        if active is None:
            active = relaxed_positions(tie_map, self.config.tie_lora_roots)
        route_layers(self.dyntie_layers, tie_map, self.config.tie_mode, active)
        if self.sharded:
            route_calls(self.dyntie_layers, tie_map)

    @contextmanager
    def routed_as(self, tie_map: list[int]) -> Iterator[None]:
        """Compute as ``tie_map`` would right after ``retie`` to it, without moving or releasing any weight (a
        candidate map's forward, as a scorer needs it: deltas that the retie would fold stay on, those it would
        zero are off), and route back to the model's own map on exit, also after an error."""
        tie_map = normalize_tie_map(list(tie_map), len(self.dyntie_layers))
        self._route(tie_map, relaxed_positions_across(self._tie_map, tie_map, self.config.tie_lora_roots))
        try:
            yield
        finally:
            self._route(self._tie_map)

    def shard(self, **fully_shard_kwargs: Any) -> "DynTieMixin":
        """Shard the model with FSDP2 (``fully_shard``) in place: each block of the layer stack and each relaxed
        delta a unit of its own, then the model. ``fully_shard_kwargs`` (``mesh``, ``reshard_after_forward``,
        ``mp_policy``, ``offload_policy``) go to every call. Under ``accelerate launch`` with an FSDP2 config
        accelerate wraps the model itself (the same units); this is for scripts that use torch directly."""
        shard_model(self, self.dyntie_layers, DELTA_CLASSES, **fully_shard_kwargs)
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
        check_wrap(self.dyntie_layers, DELTA_CLASSES)
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
        moves = retie_layers(self.dyntie_layers, old, new, self.config.tie_mode, merge, self.config.tie_lora_roots)
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
        own weights minus the shared ones, so at full rank its linear maps are its own again; positions already
        tied whose root changes (rerouted, or averaged by the merge) are refitted to what they computed before,
        so a progressive schedule keeps the function as well as one call with the final map; with
        ``tie_lora_roots`` a root whose weights the merge averages is refitted too (its own weights minus the
        mean), so ``average`` with full-rank deltas and offsets computes exactly what the model did. ``"zero"``
        starts a newly tied position at the shared function. See README, "Compress a pretrained model"."""
        if delta_init not in TIE_DELTA_INITS:
            raise ValueError(f"delta_init must be one of {TIE_DELTA_INITS}, got {delta_init!r}")
        if delta_init == "svd" and not self.config.tie_lora_rank:
            raise ValueError("delta_init='svd' needs relaxed ties: set tie_lora_rank (or call relax_ties) first")
        layers, old = self.dyntie_layers, list(self._tie_map)
        new = normalize_tie_map(tie_map, len(layers))
        refit = refitted_positions(old, new, merge, self.config.tie_lora_roots) if delta_init == "svd" else []
        targets = {i: computed_targets(layers[i], layers[old[i]]) for i in refit}  # before the retie moves them
        report = self.retie(new, merge=merge)
        newly = set(report.changes.tied)
        for i, weights in targets.items():
            init_deltas_from(layers[i], layers[new[i]], weights)
            if i not in newly:  # a refitted delta's moments are stale (the newly tied ones were released already)
                report.moves.released += relaxed_parameters(layers[i])
        return report

    @property
    def tie_lora_rank(self) -> int:
        """The rank of every tied position's own delta over its root's weights (0: plain ties)."""
        return self.config.tie_lora_rank

    def relax_ties(self, rank: int, vectors: bool = False, roots: bool = False) -> None:
        """Give every position a rank-``rank`` delta of its own on each linear leaf (``deltas.TieDelta``), active
        while the position is tied: a *relaxed* tie runs its root's weights plus its own low-rank correction.
        With ``vectors`` every norm weight and bias gets the position's own offset too (``deltas.TieOffset``;
        what makes full-rank SVD deltas exact on a pretrained model). With ``roots`` a root that has followers
        runs its own delta and offsets too, so every member of a group is the shared weights plus its own
        correction (Relaxed Recursive Transformers' per-loop LoRA; what makes ``average`` + SVD exact).
        Everything starts at zero, so the function does not change; call before the optimizer is built (the
        model gains parameters). A model that has deltas keeps their rank and offsets; it may switch relaxed
        roots on (their deltas, off until then, are zero), never off."""
        check_relaxed(rank, vectors, roots)
        config = self.config
        current = (config.tie_lora_rank, config.tie_lora_vectors, config.tie_lora_roots)
        if (rank, vectors, roots) == current:
            return
        if (rank, vectors, roots) == (*current[:2], True):  # roots on: their deltas are off, so zero; nothing moves
            config.tie_lora_roots = True
            self._route(self._tie_map)
            return
        if current[0]:
            raise ValueError(f"this model already has relaxed ties of {_relaxed_words(*current)}; they cannot change "
                             f"to {_relaxed_words(rank, vectors, roots)}")
        if self.sharded:
            raise ValueError("relax_ties must be called before the model is sharded (FSDP2 fixes its parameters at wrap time)")
        for layer in self.dyntie_layers:
            relax_layer(layer, rank, vectors)
        config.tie_lora_rank, config.tie_lora_vectors, config.tie_lora_roots = rank, vectors, roots
        self._declare_delta_units()
        self._apply_ties()

    def _init_weights(self, module: nn.Module) -> None:
        """Stock init, and a relaxed delta's own (``up`` zero, offsets zero) wherever transformers initialises one."""
        if isinstance(module, DELTA_CLASSES):
            module.reset_parameters()
        else:
            super()._init_weights(module)

    # ---- torch.compile -------------------------------------------------------------------------

    def compile_layers(self, **compile_kwargs: Any) -> None:
        """``torch.compile`` every block of the layer stack, the tie routing outside the compiled region
        (``compiled.CompiledBlock``): one compiled graph serves every tie map, so a run visiting dozens of maps
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

    # ---- moving ----------------------------------------------------------------------------------

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

    def extra_repr(self) -> str:
        relaxed = f", tie_lora_rank={self.config.tie_lora_rank}" if self.config.tie_lora_rank else ""
        relaxed += ", tie_lora_vectors=True" if self.config.tie_lora_vectors else ""
        relaxed += ", tie_lora_roots=True" if self.config.tie_lora_roots else ""
        return f"tie_map={format_tie_map(self._tie_map)}, tie_mode={self.config.tie_mode}{relaxed}"
