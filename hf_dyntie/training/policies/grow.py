"""``grow``: share first, then untie one position at a time until the unique-layer budget is reached.

The monotone schedule of share-then-unshare (SWE), progressive stacking and recurrence curricula: the
stack starts with few unique layers (default: every position runs layer 0), and at evenly spaced steps
until ``grow_until`` of the run one tied position becomes a root. An untie starts from a copy of the root's
weights *and* optimizer state (the trainer carries both), so it changes no function and restarts nothing,
and nothing is ever re-tied. Which position unties next (``grow_order``):

- ``sequence``: grow towards the static ``sequence`` pattern at the budget; each untie splits a contiguous
  group where the two halves are most balanced, taking the later members of the group along. All-shared
  8 positions to 4 unique: ``[0]*8 -> [0,0,0,0,4,4,4,4] -> [0,0,2,2,4,4,4,4] -> [0,0,2,2,4,4,6,6]``.
- ``spread``: grow towards the ``cycle`` pattern; each new root takes the positions ``p, p+u, p+2u, ...``,
  so every unique layer is used across the whole depth.
- ``scored``: the split the trainer's scorer predicts to lower the held-out loss most (per-position
  gradient conflict, see ``hf_dyntie.training.scoring``).

Decisions depend only on the map, the step and (for ``scored``) the scores, so they are the same on
every rank and resume exactly with no state of their own.
"""

from __future__ import annotations

from ...tie_map import num_unique_layers, split_group, untie_candidates
from .base import Decision, MapScorer, TyingPolicy, changes_made, evenly_spaced_steps
from .options import PolicyConfig
from .static import cycle_map, sequence_map


class GrowPolicy(TyingPolicy):
    name = "grow"
    dynamic = True
    default_interval = 1  # it acts only when an untie falls due

    def __init__(self, num_layers: int, config: PolicyConfig):
        super().__init__(num_layers, config)
        self.init_map = self.budgeted_initial_map()
        self.target_unique = num_layers if config.budget is None else config.budget
        self.needs_scorer = config.grow_order == "scored"
        self.max_steps: int | None = None

    def initial_tie_map(self) -> list[int]:
        return list(self.init_map)

    def begin_run(self, max_steps: int) -> None:
        self.max_steps = max_steps

    def untie_steps(self) -> list[int]:
        """The steps at which the unties fall due: evenly spaced, the last at ``grow_until * max_steps``."""
        if self.max_steps is None:
            raise RuntimeError("grow needs the run length: the trainer calls begin_run(max_steps) first")
        return evenly_spaced_steps(self.target_unique - num_unique_layers(self.init_map), self.config.grow_until,
                                   self.max_steps)

    def schedule_problem(self, max_steps: int) -> tuple[str, bool] | None:
        """grow unties at most once per decision: with sparse decisions or a short run it may end below its budget
        (refused when the budget was asked for, said when grow was only to grow as far as the run allows)."""
        self.begin_run(max_steps)
        start = num_unique_layers(self.init_map)
        due = self.untie_steps()
        done = changes_made(due, max_steps, self.interval)
        if done == len(due):
            return None
        goal = f"tie_budget {self.target_unique}" if self.config.budget is not None else f"{self.target_unique} unique layers"
        return (f"grow cannot reach {goal} in {max_steps} steps with a decision every {self.interval} "
                f"(one untie per decision, the last due at step {due[-1]}): it would end at {start + done} unique layers; "
                f"use --tie_interval 1, a larger --tie_grow_until or more --max_steps", self.config.budget is not None)

    def decide(self, tie_map: list[int], step: int, scorer: MapScorer | None = None) -> Decision | None:
        unique = num_unique_layers(tie_map)
        if unique >= self.target_unique:
            return None
        due = sum(1 for t in self.untie_steps() if t <= step)
        if unique - num_unique_layers(self.init_map) >= due:
            return None
        if self.config.grow_order == "scored":
            return self._scored(tie_map, scorer)
        target = (sequence_map if self.config.grow_order == "sequence" else cycle_map)(self.num_layers, self.target_unique)
        position, movers = self._next_fixed(tie_map, target)
        return Decision(tie_map=split_group(tie_map, position, movers), layer=position, action=position)

    def _next_fixed(self, tie_map: list[int], target: list[int]) -> tuple[int, tuple[int, ...]]:
        """The target root that is still tied whose split is most balanced (earliest on ties)."""
        options = []
        for p in range(self.num_layers):
            if target[p] != p or tie_map[p] == p:
                continue
            root = tie_map[p]
            if self.config.grow_order == "sequence":
                movers = tuple(q for q in range(p + 1, self.num_layers) if tie_map[q] == root)
            else:
                movers = tuple(q for q in range(p + 1, self.num_layers) if tie_map[q] == root and target[q] == p)
            staying = sum(1 for q in range(self.num_layers) if tie_map[q] == root) - 1 - len(movers)
            options.append((-min(staying, 1 + len(movers)), p, movers))
        if not options:  # the start map is not coarser than the target: untie the earliest tied position
            p = next(i for i, r in enumerate(tie_map) if r != i)
            return p, ()
        _, p, movers = min(options)
        return p, movers

    def _scored(self, tie_map: list[int], scorer: MapScorer | None) -> Decision:
        if scorer is None:
            raise RuntimeError("tie_grow_order='scored' needs the trainer's scorer (an eval dataset)")
        splits = untie_candidates(tie_map)
        gains = scorer.untie_gains(splits)
        scores = [
            {"tie_map": split_group(tie_map, p, movers), "kind": "untie", "score": gain}
            for (p, movers), gain in zip(splits, gains)
        ]
        best = min(range(len(splits)), key=lambda k: (gains[k], k))
        p, movers = splits[best]
        return Decision(tie_map=split_group(tie_map, p, movers), layer=p, action=p, scores=scores)
