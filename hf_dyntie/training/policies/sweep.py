"""The per-layer sweep that ``qlearning`` and ``random`` share: the paper code's schedule.

Each decision acts on one layer ``l``, cycling through ``1..L-1``, and picks an action ``a in 0..l`` (tie to
``a``, or ``a == l``: train on its own) among those that keep the map within ``config.budget``. The two
policies differ only in how they pick (a Q-network with epsilon-greedy exploration, or uniformly) and in
what they learn from the reward.
"""

from __future__ import annotations

import torch

from ...tie_map import allowed_actions
from .base import TyingPolicy
from .options import PolicyConfig
from .rewards import RewardFunction


class SweepPolicy(TyingPolicy):
    """A seeded generator, the reward function, the budgeted initial map and the sweep over layers 1..L-1."""

    def __init__(self, num_layers: int, config: PolicyConfig):
        super().__init__(num_layers, config)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.reward_fn = RewardFunction(config.reward, config.reward_clip, config.reward_baseline_decay)
        self.init_map = self.budgeted_initial_map()
        self.decisions = 0  # decide() calls that acted; the next one acts on layer 1 + decisions % (L-1)

    def initial_tie_map(self) -> list[int]:
        return list(self.init_map)

    def next_layer(self) -> int:
        """The layer the next decision acts on (sweeping 1..L-1)."""
        return 1 + self.decisions % (self.num_layers - 1)

    def next_choice(self, tie_map: list[int]) -> tuple[list[int], int, list[int]]:
        """The current map (the model's, in root form already), the layer the next decision acts on and its
        allowed actions (all of ``0..layer`` without a budget)."""
        state = list(tie_map)
        layer = self.next_layer()
        return state, layer, allowed_actions(state, layer, self.config.budget)

    def random_action(self, allowed: list[int]) -> int:
        """One of ``allowed``, uniformly, from the policy's own generator (so a run is repeatable)."""
        return allowed[int(torch.randint(0, len(allowed), (), generator=self.generator))]
