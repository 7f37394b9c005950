"""``greedy``: decide from paired counterfactual scores, one local move per decision.

The reward the Q-learning agent sees (one batch's loss a few steps later) is ~40x noisier than the effect
of any single tie action and sees only its transient (measured in docs/RESULTS.md, section 0; the research note is ../shared/research/tying-agent-diagnosis.md). A
*paired* comparison removes both: every candidate map is scored at the same weights on the same fixed
held-out tokens, relative to keeping the current map. Candidates, all one step from the current map:

- **tie** a root (and its group) to an earlier root, and **move** a tied position to another root: scored
  by the immediate held-out loss change (forward only; the immediate change predicts the 32-step outcome,
  Spearman 0.70 in the diagnosis);
- **untie** a tied position (alone, or with the later members of its group): its immediate change is 0
  (the copy computes the same function), so it is scored by the first-order gain of letting the split-off
  positions follow their own gradient for the next ``interval`` steps (the scorer's per-position
  gradient conflict), and allowed only while the map is under ``budget``.

The best candidate by ``score + size_penalty * (unique layers added)`` is taken only if it beats "keep" by
more than ``score_margin``; among candidates within the margin of the best, the one with the fewest unique
layers wins. Every candidate and its score go into the decision, so the tie history shows why.
"""

from __future__ import annotations

from typing import Any

from ...tie_map import apply_actions, num_unique_layers, root_layers, split_group, untie_candidates
from .base import Decision, MapScorer, TyingPolicy
from .options import PolicyConfig


class GreedyPolicy(TyingPolicy):
    name = "greedy"
    dynamic = True
    needs_scorer = True
    default_interval = 100  # a decision scores every candidate map: held-out forwards, so not every step

    def __init__(self, num_layers: int, config: PolicyConfig):
        super().__init__(num_layers, config)
        self.init_map = self.budgeted_initial_map()
        self.budget = num_layers if config.budget is None else config.budget

    def initial_tie_map(self) -> list[int]:
        return list(self.init_map)

    def candidates(self, tie_map: list[int]) -> tuple[list[list[int]], list[tuple[int, tuple[int, ...]]]]:
        """Maps one tie or move away (distinct, not the current map), and the untie splits within budget."""
        roots = root_layers(tie_map)
        seen, changed = {tuple(tie_map)}, []
        for p in range(1, self.num_layers):
            for j in roots:
                if j >= p or j == tie_map[p]:
                    continue
                candidate = apply_actions(tie_map, {p: j})
                if tuple(candidate) not in seen:
                    seen.add(tuple(candidate))
                    changed.append(candidate)
        splits = untie_candidates(tie_map) if num_unique_layers(tie_map) < self.budget else []
        return changed, splits

    def decide(self, tie_map: list[int], step: int, scorer: MapScorer | None = None) -> Decision | None:
        if scorer is None:
            raise RuntimeError("the greedy policy needs the trainer's scorer (an eval dataset to score on)")
        changed, splits = self.candidates(tie_map)
        unique = num_unique_layers(tie_map)
        scored: list[dict[str, Any]] = []
        for candidate, delta in zip(changed, scorer.loss_deltas(changed) if changed else []):
            kind = "tie" if num_unique_layers(candidate) < unique else "move"
            scored.append({"tie_map": candidate, "kind": kind, "score": delta})
        for (p, movers), gain in zip(splits, scorer.untie_gains(splits) if splits else []):
            scored.append({"tie_map": split_group(tie_map, p, movers), "kind": "untie", "score": gain})
        for entry in scored:
            entry["objective"] = entry["score"] + self.config.size_penalty * (num_unique_layers(entry["tie_map"]) - unique)
        if not scored:
            return None
        best = min(entry["objective"] for entry in scored)
        if best >= -self.config.score_margin:
            return Decision(tie_map=list(tie_map), scores=scored)  # keep: nothing beats it beyond the margin
        near = [e for e in scored if e["objective"] < -self.config.score_margin and e["objective"] <= best + self.config.score_margin]
        chosen = min(near, key=lambda e: (num_unique_layers(e["tie_map"]), e["objective"]))
        changed_at = [i for i, (a, b) in enumerate(zip(tie_map, chosen["tie_map"])) if a != b]
        return Decision(tie_map=chosen["tie_map"], layer=changed_at[0], action=chosen["tie_map"][changed_at[0]], scores=scored)
