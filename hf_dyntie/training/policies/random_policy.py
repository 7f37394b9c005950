"""A random tying policy: the Q-learning agent's schedule with uniform actions.

It is the control for the learned agent: same initial map, same per-layer sweep ``l = 1..L-1``, same
number of decisions, but each action is drawn uniformly from ``0..l`` (from the actions that keep the map
within ``config.budget`` when there is one). Any gap between the two is what the
agent learned. ``learn`` computes the reward only so that it is logged alongside the agent's.
"""

from __future__ import annotations

from typing import Any

import torch

from ...tie_map import apply_actions
from .base import Decision, MapScorer
from .options import PolicyConfig
from .sweep import SweepPolicy


class RandomPolicy(SweepPolicy):
    """Uniform random action for one layer per decision, sweeping layers 1..L-1."""

    name = "random"
    dynamic = True

    def __init__(self, num_layers: int, config: PolicyConfig):
        super().__init__(num_layers, config)
        self.pending = False  # a decision is waiting for its reward

    def decide(self, tie_map: list[int], step: int, scorer: MapScorer | None = None) -> Decision | None:
        if self.num_layers == 1:
            return None
        state, layer, allowed = self.next_choice(tie_map)
        action = self.random_action(allowed)
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
