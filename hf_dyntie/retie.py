"""Retie: move a live layer stack from one tie map to another, and say what happened to each parameter.

:func:`retie_layers` copies the weights of newly untied positions (folding their relaxed deltas in), merges
roots with ``merge="average"``, then points tied positions' storage and routing at their roots (tying.py).
:class:`ParameterMoves` tells a trainer how to carry the optimizer state along; :class:`RetieReport` is what
``model.retie`` returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .deltas import fold_deltas, reset_relaxed
from .leaves import leaf_parameters
from .sharding import copy_shard, local, shard_index
from .tie_map import TieChanges, diff_tie_maps, positions_per_root, relaxed_positions
from .tying import TIE_MERGES, route_layers, share_storage


def _paired_parameters(layers: nn.ModuleList, i: int, r: int) -> list[tuple[nn.Parameter, nn.Parameter]]:
    own, root = leaf_parameters(layers[i]), leaf_parameters(layers[r])
    if [n for n, _, _ in own] != [n for n, _, _ in root]:
        raise ValueError(f"layers {i} and {r} have different parameters and cannot be tied")
    return [(p, q) for (_, _, p), (_, _, q) in zip(own, root)]


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


def refitted_positions(old: Sequence[int], new: Sequence[int], merge: str, roots: bool = False) -> list[int]:
    """The positions whose relaxed deltas ``tie_trained(..., delta_init="svd")`` refits to keep their function:
    the newly tied, the rerouted (their old root's weights are not the new root's) and, with ``"average"``, the
    positions already tied to a root whose weights the merge replaces by a mean, and with ``roots``
    (``tie_lora_roots``) that root's own position."""
    changes = diff_tie_maps(old, new)
    merged = set(merge_groups(old, new)) if merge == "average" else set()
    moved = set(changes.tied) | set(changes.rerouted)
    followers = {i for i, r in enumerate(new) if r != i and r in merged}
    return sorted(moved | followers | (merged if roots else set()))


@torch.no_grad()
def retie_layers(
    layers: nn.ModuleList, old: Sequence[int], new: Sequence[int], tie_mode: str, merge: str = "discard",
    roots: bool = False,
) -> ParameterMoves:
    """Move a live stack from ``old`` to ``new`` (both in root form) and say what happened to each parameter.

    Order matters and is fixed: (1) newly untied positions copy their former root's current weights,
    (2) with ``merge="average"`` each surviving root becomes the weighted mean of the roots tied into it,
    (3) tied positions are pointed at their roots' storage. An untied position's relaxed delta is folded into
    its copy in step (1), so an untie keeps the function with or without deltas; with ``roots``
    (``tie_lora_roots``) a root left without followers folds its own delta after that copy. So a layer that unties and a root that merges
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
    if roots:  # a relaxed root left without followers keeps its function: its delta goes into its own weights
        for j in relaxed_positions(old, roots) - relaxed_positions(new, roots):
            if new[j] == j:
                moves.released += fold_deltas(layers[j])
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
    for i in changes.tied:
        moves.released += reset_relaxed(layers[i])
    share_storage(layers, new)
    route_layers(layers, new, tie_mode, relaxed_positions(new, roots))
    return moves


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
