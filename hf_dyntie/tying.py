"""Per-position routing of a layer stack, and tie/untie on live weights.

Every position ``i`` of the stack keeps its own block object (its attention module keeps ``layer_idx =
i``, so KV-cache slots, hidden-state indices and ``scale_attn_by_inverse_layer_idx`` follow the
position) and its own parameters (so the set and order of parameters the optimizer and DDP see never
change). What tying changes is *which weights the leaves compute with*: every parameter-owning leaf of
a tied position is routed to the same leaf of its root.

- ``tie_mode="share"``: the leaf computes with the root's parameters, gradients accumulate into the root.
- ``tie_mode="follow"``: the leaf computes with the root's parameters detached (the paper code's
  behaviour): the root learns only from its own position and tied positions skip weight-gradient work.

While a position is tied its own parameters keep their shape but point at the root's storage, so they
cost no memory; they are unused in forward, so their ``grad`` stays ``None`` and AdamW skips them.

A *relaxed* tie (``tie_lora_rank``) adds the position's own low-rank delta (:class:`TieDelta`) on top of
the root's weights; the delta is a child of the leaf, never tied itself (docs/design.md, "Relaxed ties").
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from .sharding import alias_shard, copy_shard, full, local, local_part, shard_index
from .tie_map import diff_tie_maps, positions_per_root

# the one declaration of each option: configs, arguments and the CLI take their choices from these
TieMode = Literal["share", "follow"]  # how a tied position takes gradients (docs/design.md, "Routing")
TieMerge = Literal["discard", "average"]  # what a root tied away leaves to the surviving root
TieDeltaInit = Literal["zero", "svd"]  # how a newly tied position's relaxed delta starts (see init_deltas_from)
TIE_MODES: tuple[str, ...] = get_args(TieMode)
TIE_MERGES: tuple[str, ...] = get_args(TieMerge)
TIE_DELTA_INITS: tuple[str, ...] = get_args(TieDeltaInit)


class TieableLeaf:
    """Mixin that lets a parameter-owning leaf of any class run another leaf's parameters.

    ``make_tieable`` puts it in front of the leaf's own class (``TieableLinear``, ``TieableLlamaRMSNorm``,
    ...: one subclass per stock class, made on first use). Its ``forward`` runs the stock forward
    unchanged; only while a tied (or captured) leaf computes, the entries of ``_parameters`` that the stock
    code reads through ``self.weight`` / ``self.bias`` are swapped for the tensors it is routed to, and put
    back right after. Outside ``forward`` the leaf is its stock self: ``leaf.weight`` is its own parameter.
    A relaxed tied leaf then adds its own ``tie_delta`` of the input to the output.

    The source is kept in ``__dict__`` (not as a submodule) so it never shows in ``named_modules``,
    ``state_dict`` or ``parameters``.
    """

    _stock_class: type[nn.Module]

    def routed(self, name: str) -> torch.Tensor | None:
        """The tensor to compute with: our own parameter, or the root's (detached in follow mode)."""
        source = self.__dict__.get("_tie_source")
        tensor = (self if source is None else source)._parameters[name]
        capture = self.__dict__.get("_tie_capture")
        if capture is not None and tensor is not None:
            return capture(self, name, tensor)
        if source is not None and tensor is not None and self.__dict__.get("_tie_detach", False):
            return tensor.detach()
        return tensor

    def forward(self, *args, **kwargs):
        out = self._routed_forward(*args, **kwargs)
        if self.__dict__.get("_tie_relaxed", False):  # a relaxed tie: this position's own delta on top
            out = out + self._modules["tie_delta"](args[0])
        return out

    def _routed_forward(self, *args, **kwargs):
        state = self.__dict__
        if state.get("_tie_source") is None and state.get("_tie_capture") is None:
            return super().forward(*args, **kwargs)  # untied: the stock forward on our own parameters
        own = self._parameters
        saved = dict(own)
        offload = _offload_hook(state.get("_tie_source"))
        if offload is not None:  # accelerate's offload: the root's weights are on meta until its hook loads them
            source = state["_tie_source"]
            args, kwargs = offload.pre_forward(source, *args, **kwargs)
        try:
            for name in saved:
                own[name] = self.routed(name)
            out = super().forward(*args, **kwargs)
        finally:
            own.update(saved)
        return out if offload is None else offload.post_forward(source, out)

    def __reduce_ex__(self, protocol):
        # the class is made at run time, so pickle (``torch.save(model)``) rebuilds it from the stock class
        return _rebuild_leaf, (self._stock_class,), self.__getstate__()


def _offload_hook(source: nn.Module | None) -> Any:
    """The root leaf's accelerate hook when it offloads its weights (``cpu_offload``, ``disk_offload``): a tied
    leaf then runs inside it, so the root's weights are loaded for this call and offloaded again after."""
    hook = None if source is None else source.__dict__.get("_hf_hook")
    return hook if getattr(hook, "offload", False) else None


_TIEABLE_CLASSES: dict[type, type] = {}


def tieable_class(stock: type[nn.Module]) -> type[nn.Module]:
    """The tieable subclass of a leaf class (made once per class)."""
    tieable = _TIEABLE_CLASSES.get(stock)
    if tieable is None:
        attributes = {"_stock_class": stock, "__module__": __name__}
        tieable = type(f"Tieable{stock.__name__}", (TieableLeaf, stock), attributes)
        _TIEABLE_CLASSES[stock] = tieable
    return tieable


def _rebuild_leaf(stock: type[nn.Module]) -> nn.Module:
    cls = tieable_class(stock)
    return cls.__new__(cls)


def parameter_leaves(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules of ``layer`` that own parameters directly, in registration order."""
    return [(name, module) for name, module in layer.named_modules() if module._parameters]


def stock_leaf_name(name: str) -> str:
    """A leaf's name as the stock block has it: PEFT's ``base_layer`` path segments stripped
    (``attn.c_attn.base_layer`` -> ``attn.c_attn``), so a wrapped position pairs with an unwrapped root."""
    return ".".join(part for part in name.split(".") if part != "base_layer")


def tieable_leaves(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    """The leaves tying works on, as ``(stock name, leaf)``: those :func:`make_tieable` found, kept on the
    block, so modules added later (PEFT's ``lora_A``/``lora_B``, ...) are never tied, released or copied.
    A block never made tieable falls back to its parameter-owning modules now."""
    recorded = layer.__dict__.get("_dyntie_leaves")
    if recorded is not None:
        return list(recorded)
    return [(stock_leaf_name(name), leaf) for name, leaf in parameter_leaves(layer)]


def leaf_parameters(layer: nn.Module) -> list[tuple[str, str, nn.Parameter]]:
    """``(stock key, current key, parameter)`` for every parameter of the block's tieable leaves, in order.
    The current key is the parameter's name in the block today (``attn.c_attn.base_layer.weight`` once PEFT
    wrapped the leaf), the stock key the name it pairs by (``attn.c_attn.weight``)."""
    current = {id(module): name for name, module in layer.named_modules()}
    found = []
    for stock, leaf in tieable_leaves(layer):
        path = current.get(id(leaf), stock)
        for key, p in leaf._parameters.items():
            if p is not None:
                found.append((f"{stock}.{key}" if stock else key, f"{path}.{key}" if path else key, p))
    return found


def make_tieable(layer: nn.Module) -> None:
    """Upgrade the leaves of one block in place to their tieable subclasses.

    Swapping ``__class__`` keeps the very same parameter objects, names, hooks and init, and keeps the
    stock block and attention forward code around them, and the leaf's own forward too; only which
    tensors that forward reads changes. Any leaf class works: ``nn.Linear``, GPT-2's ``Conv1D``,
    ``LlamaRMSNorm``, a class of your own.
    """
    leaves = tieable_leaves(layer)
    for _, leaf in leaves:
        if not isinstance(leaf, TieableLeaf):
            leaf.__class__ = tieable_class(type(leaf))
    layer.__dict__["_dyntie_leaves"] = leaves  # what tying touches from now on, whatever is added later


def check_lora_rank(rank: object) -> None:
    """``tie_lora_rank`` is a non-negative integer (0: plain ties); raise ValueError otherwise."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ValueError(f"tie_lora_rank must be a non-negative integer, got {rank!r}")


# ---- relaxed ties: a tied position's own low-rank delta over its root's weights ------------------------


class TieDelta(nn.Module):
    """A position's own rank-``r`` correction to the linear map it is tied to: ``x -> (x A^T) B^T``.

    A relaxed tie (the idea of Relaxed Recursive Transformers and Zamba2's per-position LoRA): a tied
    position still computes with its root's weights, plus this delta, which is its own and trains with it.
    ``up`` (B) is set to zero when a position ties, so a newly tied position starts at exactly its root's
    function. The delta is off while its position is untied (no gradient, no optimizer state): an untie
    folds it into the weights the position copies from its root, then zeroes ``up``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, transposed: bool,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.up = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.transposed = transposed  # the leaf stores its weight as (in, out), GPT-2's Conv1D
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # LoRA's start: A random, B zero
        nn.init.zeros_(self.up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.down), self.up)

    def weight_delta(self) -> torch.Tensor:
        """The delta in the leaf's own weight layout (what folding adds to ``leaf.weight``), whole: under
        FSDP2 the two rank-``r`` factors are gathered (every rank must call it)."""
        delta = full(self.up) @ full(self.down)
        return delta.t() if self.transposed else delta

    def extra_repr(self) -> str:
        return f"rank={self.down.shape[0]}"


def linear_layout(leaf: nn.Module) -> tuple[int, int, bool] | None:
    """``(in, out, transposed)`` of a leaf that computes an affine map of its input (``nn.Linear``, GPT-2's
    ``Conv1D``, which stores its weight transposed); ``None`` for anything else (norms get no delta)."""
    if isinstance(leaf, nn.Linear):
        return leaf.in_features, leaf.out_features, False
    if isinstance(leaf, Conv1D):
        n_in, n_out = leaf.weight.shape
        return n_in, n_out, True
    return None


def relax_layer(layer: nn.Module, rank: int) -> None:
    """Give every linear tieable leaf of a block a :class:`TieDelta` of ``rank`` (a child named
    ``tie_delta``: its own parameters, saved with the block, never tied, released or copied)."""
    for _, leaf in tieable_leaves(layer):
        layout = linear_layout(leaf)
        if layout is not None and "tie_delta" not in leaf._modules:
            n_in, n_out, transposed = layout
            weight = leaf.weight
            delta = TieDelta(n_in, n_out, rank, transposed, device=weight.device, dtype=weight.dtype)
            leaf.add_module("tie_delta", delta)


def tie_deltas(layer: nn.Module) -> list[tuple[str, nn.Module, TieDelta]]:
    """``(stock leaf name, leaf, delta)`` for every tieable leaf of the block that carries a delta."""
    return [(name, leaf, leaf._modules["tie_delta"]) for name, leaf in tieable_leaves(layer) if "tie_delta" in leaf._modules]


def fold_deltas(layer: nn.Module) -> list[nn.Parameter]:
    """Add each delta of a block into its leaf's own weight and zero it (an untie keeps the function);
    returns the deltas' parameters, whose optimizer state is void from now on. Under FSDP2 each rank adds the
    part of the (rank-``r``, cheap to gather) delta that matches its own shard of the weight."""
    folded = []
    for _, leaf, delta in tie_deltas(layer):
        weight = leaf.weight
        local(weight).add_(local_part(weight, delta.weight_delta()).to(weight.dtype))
        local(delta.up).zero_()
        folded += [delta.down, delta.up]
    return folded


def linear_weights(layer: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of each delta-carrying leaf's weight as the affine map it computes, ``(out, in)`` (GPT-2's
    ``Conv1D`` stores the transpose): what :func:`init_deltas_from` fits the deltas to."""
    out = {}
    for name, leaf, delta in tie_deltas(layer):
        weight = full(leaf.weight).float()
        out[name] = (weight.t() if delta.transposed else weight).clone()
    return out


@torch.no_grad()
def init_deltas_from(layer: nn.Module, root: nn.Module, own: dict[str, torch.Tensor]) -> None:
    """Start a tied position's deltas at the rank-``r`` truncated SVD of (its own weights ``own``, from
    :func:`linear_weights` before it was tied) - (the root's weights now), the best rank-``r`` approximation
    (Eckart-Young): with ``r`` at full rank the position's linear maps are exactly its own again. The two
    factors share the singular values' square roots. Norms and biases are not low-rank: they stay the root's."""
    roots = linear_weights(root)
    for name, leaf, delta in tie_deltas(layer):
        residual = own[name] - roots[name]
        u, sv, vh = torch.linalg.svd(residual, full_matrices=False)
        rank = delta.down.shape[0]
        scale = sv[:rank].sqrt()
        up = torch.zeros(delta.up.shape, dtype=torch.float32)
        down = torch.zeros(delta.down.shape, dtype=torch.float32)
        k = min(rank, sv.shape[0])
        up[:, :k] = u[:, :k] * scale[:k]
        down[:k] = scale[:k, None] * vh[:k]
        local(delta.up).copy_(local_part(delta.up, up).to(delta.up.dtype))
        local(delta.down).copy_(local_part(delta.down, down).to(delta.down.dtype))


def route_layers(layers: nn.ModuleList, tie_map: Sequence[int], tie_mode: str) -> None:
    """Point every leaf of every position at the leaf it computes with (itself when untied), and switch on
    the relaxed deltas of tied positions."""
    if tie_mode not in TIE_MODES:
        raise ValueError(f"tie_mode must be one of {TIE_MODES}, got {tie_mode!r}")
    for i, r in enumerate(tie_map):
        sources = dict(tieable_leaves(layers[r]))
        for name, leaf in tieable_leaves(layers[i]):
            if r != i and name not in sources:
                raise ValueError(f"layer {i}'s leaf {name!r} has no counterpart in layer {r}; they cannot be tied")
            leaf.__dict__["_tie_source"] = None if r == i else sources[name]
            leaf.__dict__["_tie_detach"] = tie_mode == "follow"
            leaf.__dict__["_tie_relaxed"] = r != i and "tie_delta" in leaf._modules


def _paired_parameters(layers: nn.ModuleList, i: int, r: int) -> list[tuple[nn.Parameter, nn.Parameter]]:
    own, root = leaf_parameters(layers[i]), leaf_parameters(layers[r])
    if [n for n, _, _ in own] != [n for n, _, _ in root]:
        raise ValueError(f"layers {i} and {r} have different parameters and cannot be tied")
    return [(p, q) for (_, _, p), (_, _, q) in zip(own, root)]


def share_storage(layers: nn.ModuleList, tie_map: Sequence[int]) -> None:
    """Make each tied position's own parameters views of its root's storage (zero extra bytes); under FSDP2,
    views of the root's local shard (``sharding.alias_shard``).

    A parameter still on the meta device (``from_pretrained`` leaves a compact checkpoint's tied keys
    there) cannot take real storage through ``.data``; it is replaced by a new ``Parameter`` on the root's
    storage. That happens only while loading, before any optimizer holds the old object.
    """
    shards = shard_index(layers)
    for i, r in enumerate(tie_map):
        if r == i:
            continue
        sources = dict(tieable_leaves(layers[r]))
        for name, leaf in tieable_leaves(layers[i]):
            for key, p in leaf._parameters.items():
                q = sources[name]._parameters[key]
                if p is None or q is None:
                    continue
                if p.is_meta and not q.is_meta:
                    leaf._parameters[key] = nn.Parameter(q.data, requires_grad=p.requires_grad)
                else:
                    alias_shard(p, q, shards)


def release_storage(layers: nn.ModuleList, tie_map: Sequence[int]) -> None:
    """Detach tied positions' leaf parameters from any storage (used around ``Module._apply``). Anything
    else in the block (an adapter's own tensors) is converted like any other parameter."""
    for i, r in enumerate(tie_map):
        if r != i:
            for _, _, p in leaf_parameters(layers[i]):
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
                p.grad = None


@dataclass
class ParameterMoves:
    """What a retie did to each parameter, so a trainer can carry the optimizer state along.

    ``released``: parameters of newly tied positions, and the relaxed deltas of positions tied or untied
    (their optimizer state is void). ``copied``: ``(param,
    source)`` for every parameter of a newly untied position and the root parameter it was copied from (the
    state should be copied too). ``merged``: ``(root param, [(member param, weight), ...])`` for ``merge=
    "average"``: the surviving root's new value is the weighted mean of the members (the root included)."""

    released: list[nn.Parameter] = field(default_factory=list)
    copied: list[tuple[nn.Parameter, nn.Parameter]] = field(default_factory=list)
    merged: list[tuple[nn.Parameter, list[tuple[nn.Parameter, float]]]] = field(default_factory=list)


def merge_groups(old: Sequence[int], new: Sequence[int]) -> dict[int, dict[int, float]]:
    """For ``merge="average"``: each surviving root ``j`` that absorbs roots tied in this step, with the
    weight of every member (``j`` itself included): the number of positions that member ran before the
    step, i.e. how many layers' worth of parameters its weights stood for."""
    group_sizes = {r: len(ps) for r, ps in positions_per_root(old).items()}
    merges: dict[int, dict[int, float]] = {}
    for i in diff_tie_maps(old, new).tied:
        j = new[i]
        members = merges.setdefault(j, {j: float(group_sizes.get(j, 1))})
        members[i] = float(group_sizes[i])
    return merges


@torch.no_grad()
def retie_layers(
    layers: nn.ModuleList, old: Sequence[int], new: Sequence[int], tie_mode: str, merge: str = "discard"
) -> ParameterMoves:
    """Move a live stack from ``old`` to ``new`` (both in root form) and say what happened to each parameter.

    Order matters and is fixed: (1) newly untied positions copy their former root's current weights,
    (2) with ``merge="average"`` each surviving root becomes the weighted mean of the roots tied into it,
    (3) tied positions are pointed at their roots' storage. An untied position's relaxed delta is folded into
    its copy in step (1), so an untie keeps the function with or without deltas. So a layer that unties and a root that merges
    in the same step stay correct: the untie copies the pre-merge weights it was running.
    """
    if merge not in TIE_MERGES:
        raise ValueError(f"tie_merge must be one of {TIE_MERGES}, got {merge!r}")
    changes = diff_tie_maps(old, new)
    moves = ParameterMoves()
    shards = shard_index(layers)
    for i in changes.untied:
        for p, q in _paired_parameters(layers, i, old[i]):
            copy_shard(p, q, shards)
            moves.copied.append((p, q))
        moves.released += fold_deltas(layers[i])  # a relaxed tie's delta goes into the copied weights
    if merge == "average":
        for j, members in merge_groups(old, new).items():
            total = sum(members.values())
            columns = {m: _paired_parameters(layers, m, j) for m in members}  # (member's param, root's param)
            for k, (root_param, _) in enumerate(columns[j]):
                parts = [(columns[m][k][0], w) for m, w in members.items()]
                mean = sum(local(p).float() * (w / total) for p, w in parts)  # local shards: same placement
                local(root_param).copy_(mean.to(root_param.dtype))
                moves.merged.append((root_param, parts))
    moves.released += [p for i in changes.tied for _, _, p in leaf_parameters(layers[i])]
    for i in changes.tied:  # a newly tied position starts at exactly its root's function, fresh optimizer state
        for _, _, delta in tie_deltas(layers[i]):
            local(delta.up).zero_()
            moves.released += [delta.down, delta.up]
    share_storage(layers, new)
    route_layers(layers, new, tie_mode)
    return moves


@contextmanager
def capture_routed(layers: nn.ModuleList) -> Iterator[dict[tuple[int, str, str], torch.Tensor]]:
    """Within the block, every position's leaves compute with a fresh view of the tensor they route to, and
    the views are collected as ``{(position, stock leaf name, parameter name): view}``.

    ``torch.autograd.grad(loss, views)`` then gives each position's own gradient of the routed weights
    (what a tied root receives is their sum), without touching any ``.grad``. In follow mode the views are
    not detached, so per-position gradients exist there too. Used by the scoring of tie decisions only."""
    captured: dict[tuple[int, str, str], torch.Tensor] = {}
    leaves = [(i, name, leaf) for i, layer in enumerate(layers) for name, leaf in tieable_leaves(layer)]

    def make_capture(position: int, leaf_name: str):
        def capture(leaf: nn.Module, param_name: str, tensor: torch.Tensor) -> torch.Tensor:
            view = tensor.view_as(tensor)
            captured[(position, leaf_name, param_name)] = view
            return view

        return capture

    for i, name, leaf in leaves:
        leaf.__dict__["_tie_capture"] = make_capture(i, name)
    try:
        yield captured
    finally:
        for _, _, leaf in leaves:
            leaf.__dict__.pop("_tie_capture", None)


# ---- compiled blocks: the routing outside the compiled region ------------------------------------------

# what a stock block's forward calls its KV cache, across families and transformers versions
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")


def cache_argument(block: nn.Module) -> tuple[str, int | None] | None:
    """``(name, positional index)`` of the KV-cache argument of the block's forward (index ``None`` when it is
    keyword-only), or ``None`` when it takes no cache."""
    parameters = list(inspect.signature(type(block).forward).parameters.values())[1:]  # without self
    for index, parameter in enumerate(parameters):
        if parameter.name in CACHE_ARGUMENTS:
            positional = parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
            return parameter.name, index if positional else None
    return None


class CompiledBlock:
    """A block's compiled call with the tie routing done *outside* the compiled region.

    Installed as the block's ``_compiled_call_impl`` (what ``nn.Module.compile`` sets), so ``block(...)``
    lands here. Before the compiled call it puts into every tied leaf's ``_parameters`` the tensors that
    leaf is routed to (the root's parameter, detached in follow mode) and marks the leaf untied; the
    compiled graph then reads them as ordinary graph inputs, checked by shape, dtype and ``requires_grad``
    only. So one graph serves every tie map: dynamo never sees which root a position runs, only whether
    its weights need a gradient (two graphs in follow mode: tied blocks take detached weights, and their
    backward skips the weight-gradient work). An untied block (the identity map) costs one dictionary
    look-up per leaf.

    Two kinds of call run the block eagerly, with the leaves routing themselves as without compile:
    scoring's captured views (``capture_routed``), and a call carrying a KV cache outside training (cached
    generation: the cache slot is per position, so a compiled graph would be specialised per position). In
    training with gradients the cache is dropped, as transformers does under gradient checkpointing: no
    training step reads it.
    """

    def __init__(self, block: nn.Module, compiled: Callable[..., Any]) -> None:
        self.block = block
        self.compiled = compiled
        self.cache = cache_argument(block)

    def __call__(self, *args, **kwargs):
        block = self.block
        leaves = tieable_leaves(block)
        if any(leaf.__dict__.get("_tie_capture") is not None for _, leaf in leaves):
            return block._call_impl(*args, **kwargs)
        args, kwargs, eager = self._without_training_cache(args, kwargs)
        if eager:
            return block._call_impl(*args, **kwargs)
        swapped = [_route_outside(leaf) for _, leaf in leaves if leaf.__dict__.get("_tie_source") is not None]
        try:
            return self.compiled(*args, **kwargs)
        finally:
            for leaf, own, source in swapped:
                leaf._parameters.update(own)
                leaf.__dict__["_tie_source"] = source

    def _without_training_cache(self, args: tuple, kwargs: dict) -> tuple[tuple, dict, bool]:
        """The call's arguments with a KV cache dropped in training, and whether the call must run eagerly
        (a cache outside training)."""
        if self.cache is None:
            return args, kwargs, False
        name, index = self.cache
        in_args = index is not None and index < len(args)
        value = args[index] if in_args else kwargs.get(name)
        if value is None:
            return args, kwargs, False
        if not (self.block.training and torch.is_grad_enabled()):
            return args, kwargs, True
        if in_args:
            args = args[:index] + (None,) + args[index + 1:]
        else:
            kwargs = {**kwargs, name: None}
        return args, kwargs, False


def _route_outside(leaf: nn.Module) -> tuple[nn.Module, dict[str, Any], nn.Module]:
    """Put the routed tensors into a tied leaf's ``_parameters`` and mark it untied for the compiled call;
    returns what to restore. Without gradients the root's parameter itself is routed even in follow mode
    (detaching changes nothing there), so every no-grad call (evaluation, scoring) shares one graph."""
    own = dict(leaf._parameters)
    source = leaf.__dict__["_tie_source"]
    grad = torch.is_grad_enabled()
    for name in own:
        leaf._parameters[name] = leaf.routed(name) if grad else source._parameters[name]
    leaf.__dict__["_tie_source"] = None
    return leaf, own, source


def compile_block(block: nn.Module, **compile_kwargs: Any) -> None:
    """``torch.compile`` one block with the routing outside the graph (see :class:`CompiledBlock`). Every
    block of a stack shares the compiled code of its class (dynamo caches per code object and checks the
    module's attributes, not its identity), so the whole stack compiles once per graph kind."""
    uncompile_block(block)
    block._compiled_call_impl = CompiledBlock(block, torch.compile(block._call_impl, **compile_kwargs))


def uncompile_block(block: nn.Module) -> None:
    """Back to the eager call (a no-op for a block that is not compiled)."""
    block.__dict__.pop("_compiled_call_impl", None)


def is_compiled_block(block: nn.Module) -> bool:
    return isinstance(block.__dict__.get("_compiled_call_impl"), CompiledBlock)


def block_kinds(layers: nn.ModuleList) -> int:
    """How many differently configured blocks the stack holds, as a compiled graph sees them: blocks whose
    modules differ in a plain setting (GPT-2's ``scaling`` under ``scale_attn_by_inverse_layer_idx``,
    Qwen2's per-layer ``sliding_window``) get a graph each. ``layer_idx`` does not count: only the KV cache
    reads it, and compiled blocks run without one."""
    return len({_block_settings(block) for block in layers})


def _block_settings(block: nn.Module) -> tuple:
    settings = []
    for name, module in block.named_modules():
        for key, value in sorted(vars(module).items()):
            if key.startswith("_") or key in ("training", "layer_idx"):
                continue
            if isinstance(value, (bool, int, float, str)) or value is None:
                settings.append((name, key, value))
    return tuple(settings)
