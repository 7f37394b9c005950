"""Static sharing patterns: baselines whose tie map is fixed for the whole run.

With ``L`` positions and ``u`` distinct layers (``config.unique_layers``):

- ``untied``      ``[0, 1, ..., L-1]``: an ordinary transformer.
- ``all_tied``    ``[0, 0, ..., 0]``: one layer run ``L`` times (ALBERT); formerly ``all_shared``.
- ``sequence``    consecutive positions share, in ``u`` groups as even as possible (position ``i`` is in group
                  ``floor(i * u / L)``; when ``u`` does not divide ``L`` the earlier groups are the larger
                  ones): ``L=6, u=3 -> [0, 0, 2, 2, 4, 4]``; ``L=7, u=3 -> [0, 0, 0, 3, 3, 5, 5]``.
- ``cycle``       position ``i`` runs layer ``i mod u``: ``L=6, u=3 -> [0, 1, 2, 0, 1, 2]``.
- ``cycle_rev``   Takase & Kiyono (2021), "Lessons on Parameter Sharing across Layers in Transformers": CYCLE
                  for every block of ``u`` positions except the last, which runs the layers in reverse:
                  ``L=6, u=3 -> [0, 1, 2, 2, 1, 0]``, ``L=9, u=3 -> [0, 1, 2, 0, 1, 2, 2, 1, 0]``. When ``u``
                  does not divide ``L`` the last block is the ``L mod u`` positions after the last full block
                  and counts down from ``u-1`` as a full reversed block would start: ``L=7, u=3 ->
                  [0, 1, 2, 0, 1, 2, 2]``, ``L=8, u=3 -> [0, 1, 2, 0, 1, 2, 2, 1]``. With
                  ``u == L`` the single block is reversed, i.e. ``L`` distinct layers in another order, which is
                  the untied map.

Every map is returned in root form: each group of positions that share weights runs the weights stored at its
first position (``tie_map_from_groups``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

from ...tie_map import named_map
from .base import Decision, MapScorer, TyingPolicy
from .options import PolicyConfig


def tie_map_from_groups(group_ids: Sequence[int]) -> list[int]:
    """Root form of a grouping: positions with equal ``group_ids`` share weights, stored at the group's
    smallest position. E.g. ``[5, 7, 7, 5] -> [0, 1, 1, 0]``."""
    first_position: dict[int, int] = {}
    return [first_position.setdefault(group, i) for i, group in enumerate(group_ids)]


def sequence_map(num_layers: int, unique_layers: int) -> list[int]:
    return tie_map_from_groups([i * unique_layers // num_layers for i in range(num_layers)])


def cycle_map(num_layers: int, unique_layers: int) -> list[int]:
    return tie_map_from_groups([i % unique_layers for i in range(num_layers)])


def cycle_rev_map(num_layers: int, unique_layers: int) -> list[int]:
    u = unique_layers
    last_block_start = u * (-(-num_layers // u) - 1)  # u * (ceil(L / u) - 1)
    groups = [i % u if i < last_block_start else u - 1 - (i - last_block_start) for i in range(num_layers)]
    return tie_map_from_groups(groups)


# The static patterns, one table: name -> map builder (num_layers, unique_layers). The names that need
# unique_layers are the ones the map depends on it for.
STATIC_PATTERNS: dict[str, Callable[[int, int], list[int]]] = {
    "untied": lambda num_layers, _: named_map("untied", num_layers),
    "all_tied": lambda num_layers, _: named_map("all_tied", num_layers),
    "sequence": sequence_map,
    "cycle": cycle_map,
    "cycle_rev": cycle_rev_map,
}
NEEDS_UNIQUE_LAYERS = ("sequence", "cycle", "cycle_rev")


class StaticPolicy(TyingPolicy):
    """A fixed map, the pattern of :data:`STATIC_PATTERNS` called ``name``: ``initial_tie_map`` gives it,
    ``decide`` never changes it."""

    dynamic = False
    needs_unique_layers: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.needs_unique_layers = cls.name in NEEDS_UNIQUE_LAYERS

    def __init__(self, num_layers: int, config: PolicyConfig):
        super().__init__(num_layers, config)
        if self.needs_unique_layers:
            u = config.unique_layers
            if u is None:
                raise ValueError(
                    f"policy {self.name!r} needs unique_layers (--tie_unique_layers), the number of distinct layers"
                )
            if not 1 <= u <= num_layers:
                raise ValueError(f"policy {self.name!r}: unique_layers must lie in 1..{num_layers}, got {u}")
        self.tie_map = STATIC_PATTERNS[self.name](num_layers, config.unique_layers)

    def initial_tie_map(self) -> list[int]:
        return list(self.tie_map)

    def decide(self, tie_map: list[int], step: int, scorer: MapScorer | None = None) -> Decision | None:
        return None


class UntiedPolicy(StaticPolicy):
    name = "untied"


class AllTiedPolicy(StaticPolicy):
    name = "all_tied"


class SequencePolicy(StaticPolicy):
    name = "sequence"


class CyclePolicy(StaticPolicy):
    name = "cycle"


class CycleRevPolicy(StaticPolicy):
    name = "cycle_rev"
