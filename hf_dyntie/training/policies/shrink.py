"""``shrink``: the mirror of ``grow`` for a trained model: start untied, tie one group at a time until the budget.

A pretrained model turned into a tied one all at once loses what its tied layers knew in one step. ``shrink``
ties progressively instead: at evenly spaced steps until ``shrink_until`` of the run one root (with every
position that runs it) joins an earlier root, and the model recovers between merges. The trainer applies each
tie as ``model.tie_trained`` does for a one-shot conversion: ``tie_merge="average"`` makes the surviving root the
mean of the merged ones, and with relaxed ties ``tie_lora_init="svd"`` starts the newly tied positions' deltas at
the truncated SVD of their own weights minus the shared ones and refits those of the positions that follow their
root into the merge, so each step changes the function as little as it can (at full rank, with
``tie_lora_vectors`` offsets for the norms and biases, only the surviving root's own position changes: it runs the
mean; with ``tie_lora_roots`` not even that). Which root merges next (``shrink_order``):

- ``sequence``: towards the static ``sequence`` pattern at the budget, the latest root of a target group first:
  8 untied positions to 4 unique: ``[0..7] -> [0,1,2,3,4,5,6,6] -> [0,1,2,3,4,4,6,6] -> ... -> [0,0,2,2,4,4,6,6]``.
- ``scored``: the merge of a root into the root just before it whose held-out loss rises least, measured on
  the trainer's fixed scoring set at the current weights (``MapScorer.loss_deltas``, forward only). The score is
  a cheap proxy: each candidate is evaluated as plain routing (the earlier root's weights, newly tied deltas at
  zero), not with the averaging and SVD refit the merge then makes.

Decisions depend only on the map, the step and (``scored``) the scores, the same on every rank, and resume
exactly with no state of their own.
"""

from __future__ import annotations

from ...tie_map import normalize_tie_map, num_unique_layers, positions_per_root
from .base import (
    Decision,
    MapScorer,
    TyingPolicy,
    changes_made,
    evenly_spaced_steps,
)
from .options import PolicyConfig
from .static import sequence_map


def merge_roots(tie_map: list[int], root: int, into: int) -> list[int]:
    """``tie_map`` with every position that runs ``root`` running ``into`` instead (``into < root``)."""
    return normalize_tie_map([into if r == root else r for r in tie_map], len(tie_map))


class ShrinkPolicy(TyingPolicy):
    name = "shrink"
    dynamic = True
    starts_above_budget = True

    def __init__(self, num_layers: int, config: PolicyConfig):
        super().__init__(num_layers, config)
        if config.budget is None:
            raise ValueError("tie_policy='shrink' needs tie_budget: the number of unique layers to tie down to")
        self.init_map = self.start_map("untied")  # above the budget: that is the point
        self.needs_scorer = config.shrink_order == "scored"
        self.max_steps: int | None = None

    def initial_tie_map(self) -> list[int]:
        return list(self.init_map)

    def begin_run(self, max_steps: int) -> None:
        self.max_steps = max_steps

    def tie_steps(self, start_unique: int) -> list[int]:
        """The steps at which the ties fall due: evenly spaced, the last at ``shrink_until * max_steps``."""
        if self.max_steps is None:
            raise RuntimeError("shrink needs the run length: the trainer calls begin_run(max_steps) first")
        return evenly_spaced_steps(max(0, start_unique - self.config.budget), self.config.shrink_until, self.max_steps)

    def schedule_problem(self, max_steps: int) -> tuple[str, bool] | None:
        """One tie per decision: sparse decisions or a short run may end above the budget (refused)."""
        self.begin_run(max_steps)
        due = self.tie_steps(num_unique_layers(self.init_map))
        if changes_made(due, max_steps, self.interval) == len(due):
            return None
        return (f"shrink cannot tie down to tie_budget {self.config.budget} in {max_steps} steps with a decision every "
                f"{self.interval} (one tie per decision): use --tie_interval 1, a larger --tie_shrink_until or more "
                f"--max_steps", True)

    def decide(self, tie_map: list[int], step: int, scorer: MapScorer | None = None) -> Decision | None:
        unique = num_unique_layers(tie_map)
        if unique <= self.config.budget:
            return None
        start = num_unique_layers(self.init_map)
        due = sum(1 for t in self.tie_steps(start) if t <= step)
        if start - unique >= due:
            return None
        roots = sorted(positions_per_root(tie_map))
        if self.config.shrink_order == "scored":
            return self._scored(tie_map, roots, scorer)
        target = sequence_map(self.num_layers, self.config.budget)
        # the latest current root whose target group has an earlier current root: merge it into that one
        for root in reversed(roots):
            earlier = [r for r in roots if r < root and target[r] == target[root]]
            if earlier:
                into = earlier[-1]
                return Decision(tie_map=merge_roots(tie_map, root, into), layer=root, action=into)
        root, into = roots[-1], roots[-2]  # the start map is not finer than the target: merge the last two
        return Decision(tie_map=merge_roots(tie_map, root, into), layer=root, action=into)

    def _scored(self, tie_map: list[int], roots: list[int], scorer: MapScorer | None) -> Decision:
        if scorer is None:
            raise RuntimeError("tie_shrink_order='scored' needs the trainer's scorer (an eval dataset)")
        pairs = list(zip(roots[1:], roots[:-1]))  # each root into the root just before it
        candidates = [merge_roots(tie_map, root, into) for root, into in pairs]
        costs = scorer.loss_deltas(candidates)
        scores = [{"tie_map": c, "kind": "tie", "score": cost} for c, cost in zip(candidates, costs)]
        best = min(range(len(pairs)), key=lambda k: (costs[k], k))
        root, into = pairs[best]
        return Decision(tie_map=candidates[best], layer=root, action=into, scores=scores)
