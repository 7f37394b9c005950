"""A random tying policy: the Q-learning agent's schedule with uniform actions.

It is the control for the learned agent: same initial map, same per-layer sweep ``l = 1..L-1``, same
number of decisions, but each action is drawn uniformly from ``0..l`` (from the actions that keep the map
within ``config.budget`` when there is one). Any gap between the two is what the
agent learned. ``learn`` computes the reward only so that it is logged alongside the agent's.
"""

from __future__ import annotations

from typing import Any

import torch

from ..tie_map import allowed_actions, apply_actions, normalize_tie_map
from .base import Decision, MapScorer, PolicyConfig, TyingPolicy
from .rewards import RewardFunction


class RandomPolicy(TyingPolicy):
    """Uniform random action for one layer per decision, sweeping layers 1..L-1."""

    name = "random"
    dynamic = True

    def __init__(self, num_layers: int, config: PolicyConfig):
        super().__init__(num_layers, config)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.reward_fn = RewardFunction(config.reward, config.reward_clip, config.reward_baseline_decay)
        self.init_map = self.budgeted_initial_map()
        self.decisions = 0
        self.pending = False  # a decision is waiting for its reward

    def initial_tie_map(self) -> list[int]:
        return list(self.init_map)

    def next_layer(self) -> int:
        """The layer the next decision acts on (sweeping 1..L-1)."""
        return 1 + self.decisions % (self.num_layers - 1)

    def decide(self, tie_map: list[int], step: int, scorer: MapScorer | None = None) -> Decision | None:
        if self.num_layers == 1:
            return None
        layer = self.next_layer()
        state = normalize_tie_map(tie_map, self.num_layers)
        allowed = allowed_actions(state, layer, self.config.budget)  # all of 0..layer without a budget
        action = allowed[int(torch.randint(0, len(allowed), (), generator=self.generator))]
        self.decisions += 1
        self.pending = True
        new_map = apply_actions(state, {layer: action})
        return Decision(tie_map=new_map, layer=layer, action=action)

    def learn(self, loss: float, scorer: MapScorer | None = None) -> dict[str, float]:
        """The reward of the last decision, for the logs; nothing is learned."""
        if not self.pending:
            return {}
        self.pending = False
        reward = self.reward_fn(loss)
        if reward is None:
            return {"skipped_nonfinite_loss": 1.0}
        return {"reward": reward}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        values = {
            **self.state_header(),
            "decisions": self.decisions,
            "pending": self.pending,
            "reward": self.reward_fn.state_dict(),
        }
        return {"generator_state": self.generator.get_state()}, values

    def load_state_dict(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        self.check_state_header(values)
        self.generator.set_state(tensors["generator_state"].clone())
        self.decisions = int(values["decisions"])
        self.pending = bool(values["pending"])
        self.reward_fn.load_state_dict(values["reward"])
