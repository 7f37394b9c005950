"""Per-position routing of a layer stack: which weights each leaf computes with, and where tied weights live.

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

A *relaxed* tie (``tie_lora_rank``) adds the position's own low-rank delta (:class:`~hf_dyntie.deltas.TieDelta`) on top of
the root's weights, and with ``tie_lora_vectors`` its own offset of each norm weight and bias
(:class:`~hf_dyntie.deltas.TieOffset`); both are children of the leaf, never tied themselves (docs/design.md,
"Relaxed ties").

Here: the tie options, :func:`route_layers`, :func:`share_storage` / :func:`release_storage` and
:func:`capture_routed`. Beside it: the tieable leaves that carry the routing out (leaves.py), the relaxed
deltas (deltas.py), moving a live stack to a new map (retie.py) and compiled blocks (compiled.py).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal, get_args

import torch
from torch import nn

from .leaves import leaf_parameters, tieable_leaves
from .sharding import alias_shard, shard_index
from .tie_map import relaxed_positions

# the one declaration of each option: configs, arguments and the CLI take their choices from these
TieMode = Literal["share", "follow"]  # how a tied position takes gradients (docs/design.md, "Routing")
TieMerge = Literal["discard", "average"]  # what a root tied away leaves to the surviving root
TieDeltaInit = Literal["zero", "svd"]  # how a newly tied position's relaxed delta starts (see deltas.init_deltas_from)
# where a group's shared layer starts when a pretrained model is tied in one call (convert.from_stock): its root,
# its mean, or a source layer picked as Relaxed Recursive Transformers pick it (convert.source_layers)
TieFromPretrained = Literal["root", "average", "stepwise", "lower"]
TIE_MODES: tuple[str, ...] = get_args(TieMode)
TIE_MERGES: tuple[str, ...] = get_args(TieMerge)
TIE_DELTA_INITS: tuple[str, ...] = get_args(TieDeltaInit)
TIE_FROM_PRETRAINED: tuple[str, ...] = get_args(TieFromPretrained)


def check_relaxed(rank: object, vectors: object = False, roots: object = False) -> None:
    """``tie_lora_rank`` is a non-negative integer (0: plain ties); ``tie_lora_vectors`` and ``tie_lora_roots``
    are bools that need a positive rank (they extend the deltas); raise ValueError otherwise. The one check of
    the config, ``relax_ties``, ``from_stock`` and the training arguments."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ValueError(f"tie_lora_rank must be a non-negative integer, got {rank!r}")
    for name, value in (("tie_lora_vectors", vectors), ("tie_lora_roots", roots)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
        if value and not rank:
            raise ValueError(f"{name} needs relaxed ties: set tie_lora_rank > 0")


def route_layers(
    layers: nn.ModuleList, tie_map: Sequence[int], tie_mode: str, active: Collection[int] | None = None
) -> None:
    """Point every leaf of every position at the leaf it computes with (itself when untied), and switch on the
    relaxed deltas and offsets of the positions in ``active`` (``tie_map.relaxed_positions``: the tied ones and,
    with ``tie_lora_roots``, roots that have followers; default: the tied ones). ``tie_mode`` was checked where
    it entered (the config, the model's ``tie_mode`` setter, the training arguments)."""
    if active is None:
        active = relaxed_positions(tie_map)
    for i, r in enumerate(tie_map):
        sources = dict(tieable_leaves(layers[r]))
        for name, leaf in tieable_leaves(layers[i]):
            if r != i and name not in sources:
                raise ValueError(f"layer {i}'s leaf {name!r} has no counterpart in layer {r}; they cannot be tied")
            relaxed = i in active and ("tie_delta" in leaf._modules or "tie_offset" in leaf._modules)
            leaf.__dict__["_tie_source"] = None if r == i else sources[name]
            leaf.__dict__["_tie_detach"] = tie_mode == "follow"
            leaf.__dict__["_tie_relaxed"] = relaxed
            # a relaxed root runs its own vectors plus its offsets: the leaf must take the routed path
            leaf.__dict__["_tie_root_offsets"] = relaxed and r == i and "tie_offset" in leaf._modules


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
