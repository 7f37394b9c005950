"""Tying policies: who decides, during training, which layers share weights.

``make_policy(name, num_layers, config)`` builds one by the name ``--tie_policy`` takes:

- ``qlearning``  the paper's agent (per-layer epsilon-greedy deep Q-learning), see ``qlearning.py``
- ``random``     the agent's schedule with uniform random actions (control)
- ``untied``, ``all_tied``, ``sequence``, ``cycle``, ``cycle_rev``  fixed maps (baselines), see ``static.py``
  (``all_shared``: the deprecated name of ``all_tied``)
- ``replay``     the maps of an earlier run's ``tie_history.jsonl``, optionally with permuted positions
- ``grow``       share first, then untie one position at a time up to the budget, never re-tie, see ``grow.py``
- ``greedy``     one local move per decision, chosen by paired held-out scores, see ``greedy.py``
- ``shrink``     a trained model untied at the start, tied one group at a time down to the budget, see ``shrink.py``
"""

from __future__ import annotations

from .base import Decision, MapScorer, TyingPolicy, canonical_policy_name
from .options import BOOTSTRAPS, GROW_ORDERS, PAPER_OPTIONS, Q_STATES, REWARDS, SHRINK_ORDERS, PolicyConfig
from .greedy import GreedyPolicy
from .grow import GrowPolicy
from .qlearning import QLearningPolicy
from .random_policy import RandomPolicy
from .replay import ReplayPolicy
from .shrink import ShrinkPolicy
from .rewards import RewardFunction
from .static import (
    AllTiedPolicy,
    CyclePolicy,
    CycleRevPolicy,
    SequencePolicy,
    StaticPolicy,
    UntiedPolicy,
    tie_map_from_groups,
)

POLICIES: dict[str, type[TyingPolicy]] = {
    cls.name: cls
    for cls in (
        QLearningPolicy,
        RandomPolicy,
        UntiedPolicy,
        AllTiedPolicy,
        SequencePolicy,
        CyclePolicy,
        CycleRevPolicy,
        ReplayPolicy,
        GrowPolicy,
        GreedyPolicy,
        ShrinkPolicy,
    )
}


def make_policy(name: str, num_layers: int, config: PolicyConfig | None = None) -> TyingPolicy:
    """The policy called ``name`` for a stack of ``num_layers`` layers (default options: the trainer's defaults;
    ``PolicyConfig(**PAPER_OPTIONS)`` for the paper code's)."""
    name = canonical_policy_name(name)
    if name not in POLICIES:
        raise ValueError(f"unknown tying policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name](num_layers, config if config is not None else PolicyConfig())


__all__ = [
    "BOOTSTRAPS",
    "canonical_policy_name",
    "GROW_ORDERS",
    "GreedyPolicy",
    "GrowPolicy",
    "MapScorer",
    "PAPER_OPTIONS",
    "Q_STATES",
    "SHRINK_ORDERS",
    "POLICIES",
    "REWARDS",
    "AllTiedPolicy",
    "CyclePolicy",
    "CycleRevPolicy",
    "Decision",
    "PolicyConfig",
    "QLearningPolicy",
    "RandomPolicy",
    "ReplayPolicy",
    "RewardFunction",
    "SequencePolicy",
    "StaticPolicy",
    "TyingPolicy",
    "UntiedPolicy",
    "make_policy",
    "tie_map_from_groups",
]
