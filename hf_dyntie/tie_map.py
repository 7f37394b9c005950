"""Tie maps: which layer's weights each position of the stack runs.

A tie map is a list of length L. ``tie_map[i] = r`` means position ``i`` computes with the weights of
layer ``r``. Maps are kept in *root form*: ``r <= i``, ``tie_map[0] == 0`` and every pointer lands on a
layer that trains its own weights (``tie_map[r] == r``). ``list(range(L))`` is an ordinary untied stack.

This module is the single owner of those rules (docs/design.md, "The tie map"). It knows nothing about torch: the
models, the trainer and the policies all go through it, so a map means the same thing everywhere.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any
from dataclasses import dataclass

# How a user unties a model for good (what placement and adapter merges that ties forbid point to).
EXPAND_HINT = "`python -m hf_dyntie expand` (or hf_dyntie.convert.expand)"


def _as_index(value: object, position: int) -> int:
    """An integer entry, or a ValueError naming the position (bools and floats are not layer indices)."""
    if isinstance(value, bool):
        raise ValueError(f"tie_map[{position}] = {value!r} is not an integer layer index")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"tie_map[{position}] = {value!r} is not an integer layer index") from None


def normalize_tie_map(tie_map: Sequence[int] | None, num_layers: int | None = None) -> list[int]:
    """Validate ``tie_map`` and return it in root form.

    Chains such as ``2 -> 1 -> 0`` are unambiguous and resolve to their root (``[0, 0, 0]``). Anything
    else that is not a tie map raises ``ValueError`` naming the offending position and value. ``None``
    means untied and needs ``num_layers``.
    """
    if tie_map is None:
        if num_layers is None:
            raise ValueError("tie_map=None (untied) needs the number of layers")
        return list(range(num_layers))
    if isinstance(tie_map, (str, bytes)) or not isinstance(tie_map, Sequence):
        raise ValueError(f"tie_map must be a list of layer indices, got {type(tie_map).__name__}: {tie_map!r}")
    if num_layers is not None and len(tie_map) != num_layers:
        raise ValueError(f"tie_map has length {len(tie_map)} but the model has {num_layers} layers: {list(tie_map)}")
    if len(tie_map) == 0:
        raise ValueError("tie_map is empty: a model needs at least one layer")
    roots: list[int] = []
    for i, value in enumerate(tie_map):
        r = _as_index(value, i)
        if r < 0:
            raise ValueError(f"tie_map[{i}] = {r} is negative; entries are layer indices 0..{i}")
        if i == 0 and r != 0:
            raise ValueError(f"tie_map[0] = {r}: the first layer has no earlier layer to tie to, it must be 0")
        if r > i:
            raise ValueError(f"tie_map[{i}] = {r} points to a later layer; a position may only reuse a layer j <= {i}")
        roots.append(i if r == i else roots[r])
    return roots


# The maps options take by name (tie_init, a start map by name, the static policies of the same names): the one
# vocabulary. "all_tied" is the paper code's start: every position runs layer 0.
NAMED_MAPS = ("untied", "all_tied")


def named_map(name: str, num_layers: int) -> list[int]:
    """The map called ``name`` (one of :data:`NAMED_MAPS`) for ``num_layers`` positions."""
    if name == "untied":
        return list(range(num_layers))
    if name == "all_tied":
        return [0] * num_layers
    raise ValueError(f"{name!r} is not a named tie map; the names are {', '.join(NAMED_MAPS)}")


def apply_actions(tie_map: Sequence[int], actions: Mapping[int, int]) -> list[int]:
    """The paper's transition: ``s'_i = i`` if ``a_i == i`` else ``s'_{a_i}``, processed in increasing ``i``.

    ``actions`` maps a position to its action (``a_i in {0..i}``; ``i`` means "train independently").
    Positions without an action keep pointing where they point; if their root becomes tied in the same
    step they follow it to its new root, which is what the equation gives with ``a_j = s_j``.
    """
    current = normalize_tie_map(tie_map)
    proposal = list(current)
    for i, a in actions.items():
        i = operator.index(i)
        if not 0 <= i < len(current):
            raise ValueError(f"action for position {i}, but the map has {len(current)} positions")
        a = _as_index(a, i)
        if not 0 <= a <= i:
            raise ValueError(f"action a_{i} = {a} is outside 0..{i}")
        proposal[i] = a
    return normalize_tie_map(proposal)


@dataclass(frozen=True)
class TieChanges:
    """What moving from one map to another does to each position (both maps in root form)."""

    tied: tuple[int, ...]  # trained their own weights, now reuse a root: weights released
    untied: tuple[int, ...]  # reused a root, now train their own weights: start from a copy of the old root
    rerouted: tuple[int, ...]  # tied before and after, to a different root: nothing to copy or release

    @property
    def any(self) -> bool:
        return bool(self.tied or self.untied or self.rerouted)


def diff_tie_maps(old: Sequence[int], new: Sequence[int]) -> TieChanges:
    """Classify every position whose root changes between ``old`` and ``new``."""
    if len(old) != len(new):
        raise ValueError(f"tie maps of different lengths: {len(old)} and {len(new)}")
    tied, untied, rerouted = [], [], []
    for i, (o, n) in enumerate(zip(old, new)):
        if o == n:
            continue
        if o == i:
            tied.append(i)
        elif n == i:
            untied.append(i)
        else:
            rerouted.append(i)
    return TieChanges(tuple(tied), tuple(untied), tuple(rerouted))


def root_layers(tie_map: Sequence[int]) -> list[int]:
    """Layers that train their own weights, in order."""
    return [i for i, r in enumerate(tie_map) if r == i]


def num_unique_layers(tie_map: Sequence[int]) -> int:
    return len(root_layers(tie_map))


def tied_fraction(tie_map: Sequence[int]) -> float:
    """Share of positions that reuse another layer's weights (0.0 untied, (L-1)/L all shared)."""
    return 1.0 - num_unique_layers(tie_map) / len(tie_map)


def positions_per_root(tie_map: Sequence[int]) -> dict[int, list[int]]:
    """For each root, the positions that run its weights (itself first)."""
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(tie_map):
        groups.setdefault(r, []).append(i)
    return groups


def followed_roots(tie_map: Sequence[int]) -> set[int]:
    """The roots that at least one other position follows (a root alone shares nothing)."""
    return {r for i, r in enumerate(tie_map) if r != i}


def relaxed_positions(tie_map: Sequence[int], roots: bool = False) -> set[int]:
    """The positions whose relaxed deltas and offsets are on under ``tie_map``: every tied position and, with
    ``roots`` (``tie_lora_roots``), every root that has followers (all members of a group then run the shared
    weights plus a correction of their own). The others' are off: zero, no gradient, no optimizer state."""
    followed = followed_roots(tie_map)
    return {i for i, r in enumerate(tie_map) if r != i or (roots and i in followed)}


def relaxed_positions_across(old: Sequence[int], new: Sequence[int], roots: bool = False) -> set[int]:
    """The positions whose deltas are on while ``new`` is computed *as a retie from* ``old`` leaves it, before the
    retie's folds: on under ``new`` unless newly tied (a new tie starts at zero), and on under ``old`` where
    ``new`` leaves the position untied (an untie, or a root left alone, folds its delta into its weights). What
    a scorer routes a candidate map with, so a candidate scores what the retie would then compute."""
    before, after = relaxed_positions(old, roots), relaxed_positions(new, roots)
    newly_tied = {i for i, (a, b) in enumerate(zip(old, new)) if a == i and b != i}
    return (after - newly_tied) | {i for i in before if new[i] == i}


def trainable_parameters(tie_map: Sequence[int], params_per_layer: int, params_outside_layers: int = 0) -> int:
    """Parameters that train (and need gradients and optimizer state) under ``tie_map``."""
    return num_unique_layers(tie_map) * params_per_layer + params_outside_layers


def maps_per_step(records: Sequence[Mapping[str, Any]], final_step: int) -> list[list[int]]:
    """The map in force at each optimizer step ``0..final_step-1``, from decision records (``{"step",
    "tie_map"}``): each record's map holds until the next record's step (the first one from step 0)."""
    records = sorted(records, key=lambda r: r["step"])
    end = max(final_step, records[-1]["step"] + 1)
    steps, current = [], 0
    for step in range(end):
        while current + 1 < len(records) and records[current + 1]["step"] <= step:
            current += 1
        steps.append(list(records[current]["tie_map"]))
    return steps


def format_tie_map(tie_map: Sequence[int]) -> str:
    """A compact one-line picture, e.g. ``[0 0 2 0 2 5]  (3 unique of 6)``."""
    body = " ".join(str(r) for r in tie_map)
    return f"[{body}]  ({num_unique_layers(tie_map)} unique of {len(tie_map)})"


def check_budget(tie_map: Sequence[int], budget: int | None, what: str = "tie map") -> None:
    """Raise a one-line ``ValueError`` if ``tie_map`` has more unique layers than ``budget`` (``None``: no budget)."""
    if budget is None:
        return
    if not 1 <= budget <= len(tie_map):
        raise ValueError(f"tie_budget must lie in 1..{len(tie_map)} (the number of layers), got {budget}")
    unique = num_unique_layers(tie_map)
    if unique > budget:
        raise ValueError(f"the {what} {list(tie_map)} has {unique} unique layers, more than tie_budget={budget}")


def allowed_actions(tie_map: Sequence[int], layer: int, budget: int | None) -> list[int]:
    """The actions ``a in 0..layer`` for position ``layer`` whose resulting map stays within ``budget``.

    This is how every per-layer policy respects a unique-layer budget: actions that would exceed it are
    never proposed (masked before choosing), so no map is ever clipped after the fact. "Keep" (pointing
    where it points now) never adds a layer, so the list is never empty for a map within budget."""
    actions = list(range(layer + 1))
    if budget is None:
        return actions
    return [a for a in actions if num_unique_layers(apply_actions(tie_map, {layer: a})) <= budget]


def split_group(tie_map: Sequence[int], new_root: int, movers: Sequence[int] = ()) -> list[int]:
    """Untie ``new_root`` and move ``movers`` (positions of the same group, after ``new_root``) onto it.

    Every mover ran the same weights as ``new_root`` (their common root), and the untied ``new_root``
    starts from a copy of them, so the split changes no function: it is the growth step of ``grow``."""
    current = normalize_tie_map(tie_map)
    root = current[new_root]
    if root == new_root:
        raise ValueError(f"position {new_root} already trains its own weights; nothing to untie")
    proposal = list(current)
    proposal[new_root] = new_root
    for p in movers:
        if current[p] != root or p <= new_root:
            raise ValueError(f"position {p} cannot follow {new_root}: it must be a later position of group {root}")
        proposal[p] = new_root
    return normalize_tie_map(proposal)


def untie_candidates(tie_map: Sequence[int]) -> list[tuple[int, tuple[int, ...]]]:
    """Every function-preserving growth step of ``tie_map``: for each tied position ``p``, untie it alone
    (``(p, ())``) or together with the later members of its group (``(p, movers)``, splitting the group
    where it keeps groups contiguous). Each is a valid :func:`split_group` argument pair."""
    out: list[tuple[int, tuple[int, ...]]] = []
    for p, r in enumerate(tie_map):
        if r == p:
            continue
        out.append((p, ()))
        later = tuple(q for q in range(p + 1, len(tie_map)) if tie_map[q] == r)
        if later:
            out.append((p, later))
    return out
