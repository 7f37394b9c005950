"""The interface every tying policy implements, and the options they share.

A policy sees the current tie map, proposes the next one every ``interval`` optimizer steps, and is
told the reward its last proposal earned. The trainer owns everything else (measuring the loss,
applying the map to model and optimizer, logging, checkpoints).
"""

from __future__ import annotations

import math

import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from ...tie_map import NAMED_MAPS, check_budget, named_map, normalize_tie_map

REWARDS = ("neg_ppl_clipped", "neg_loss", "loss_improvement", "paired")
Q_STATES = ("map", "onehot_progress")
BOOTSTRAPS = ("same_layer", "next_layer")
GROW_ORDERS = ("sequence", "spread", "scored")
SHRINK_ORDERS = ("sequence", "scored")


@dataclass
class PolicyConfig:
    """Options of the tying policies (the trainer fills this from ``DynTieTrainingArguments``)."""

    seed: int = 0
    init: str = "all_tied"  # "all_tied" (paper code), "untied", or an explicit map "0,0,1,..."
    epsilon_start: float = 1.0
    epsilon_decay: float | None = 0.95  # multiplied once per full sweep over layers 1..L-1; None: scaled to the run
    interval: int = 4  # optimizer steps between decisions (the scaled epsilon schedule counts sweeps with it)
    epsilon_min: float = 0.01
    gamma: float = 0.99
    q_lr: float = 1e-3
    q_weight_decay: float = 0.01
    q_hidden: int = 128
    reward: str = "neg_ppl_clipped"  # paper parity; see REWARDS
    reward_clip: float = 10.0
    reward_baseline_decay: float = 0.9  # running baseline for "loss_improvement"
    replay_size: int = 0  # 0: learn from the last transition only (paper parity)
    replay_batch: int = 32
    target_update: int = 0  # decisions between target-network syncs; 0: no target network (parity)
    bootstrap: str = "same_layer"  # max over the same layer's slice of Q(s') (parity) or the next decision's
    q_state: str = "map"  # Q-network input: the raw map (parity) or one-hot roots plus training progress
    unique_layers: int | None = None  # static patterns: number of distinct layers
    replay_file: str | None = None  # replay policy: a tie_history.jsonl written by DynTieTrainer
    replay_permute_seed: int | None = None  # replay policy: permute the positions of the recorded groups
    budget: int | None = None  # most unique layers any proposed map may have (None: no limit)
    grow_until: float = 0.25  # grow: fraction of the run by which the budget is reached
    grow_order: str = "sequence"  # grow: which position unties next, see GROW_ORDERS
    shrink_until: float = 0.5  # shrink: fraction of the run by which the budget is reached
    shrink_order: str = "sequence"  # shrink: which root merges next, see SHRINK_ORDERS
    score_margin: float = 0.002  # greedy: nats a change must gain over "keep" to be made
    size_penalty: float = 0.0  # greedy: nats charged per unique layer (a soft budget)


def check_fractions(values: dict[str, float | None]) -> None:
    """Refuse a value outside [0, 1] (``None``: unset), naming it by its key (the option's name where it
    entered: ``tie_gamma`` from the arguments, ``gamma`` from a ``PolicyConfig``)."""
    for name, value in values.items():
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    """Refuse a value that is none of ``choices``, in one line naming the option and the choices."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def scaled_epsilon_decay(
    epsilon_start: float, epsilon_min: float, max_steps: int, interval: int, num_layers: int, reach_at: float = 0.65
) -> float:
    """The per-sweep decay that brings epsilon from ``epsilon_start`` to ``epsilon_min`` after ``reach_at`` of
    a run of ``max_steps`` optimizer steps (one sweep = ``L - 1`` decisions, ``interval`` steps each)."""
    sweeps = max_steps / (interval * max(1, num_layers - 1))
    if sweeps <= 0 or epsilon_start <= 0 or epsilon_min <= 0 or epsilon_min >= epsilon_start:
        return 1.0
    return (epsilon_min / epsilon_start) ** (1.0 / max(1e-9, reach_at * sweeps))


def evenly_spaced_steps(count: int, until: float, max_steps: int) -> list[int]:
    """The steps at which ``count`` structure changes fall due: evenly spaced, the last at ``until * max_steps``
    (``grow``'s unties, ``shrink``'s ties)."""
    horizon = until * max_steps
    return [max(1, math.ceil(k * horizon / count)) for k in range(1, count + 1)]


def changes_made(due: list[int], max_steps: int, interval: int) -> int:
    """How many of the changes due at ``due`` a run makes with one change per decision, a decision every
    ``interval`` steps from step 0 to ``max_steps - 1``."""
    done = 0
    for step in range(0, max_steps, interval):
        if done < len(due) and due[done] <= step:
            done += 1
    return done


@dataclass
class Decision:
    """One proposal: the map to apply from now on, and (for per-layer policies) the action behind it.
    ``scores`` (scored policies): every candidate map considered with its score, so a user can see why."""

    tie_map: list[int]
    layer: int | None = None
    action: int | None = None
    scores: list[dict[str, Any]] | None = None


class MapScorer(Protocol):
    """Paired counterfactual scores of candidate maps, all measured at the current weights on one fixed
    held-out scoring set (the trainer's :class:`hf_dyntie.training.scoring.HeldOutScorer`). Lower is better; both
    return predicted changes of the held-out loss, in nats, relative to keeping the current map."""

    def loss_deltas(self, candidates: Sequence[Sequence[int]]) -> list[float]:
        """``L(candidate) - L(current)`` right now (forward only): what a tie or a move costs at once."""

    def untie_gains(self, splits: Sequence[tuple[int, Sequence[int]]]) -> list[float]:
        """For each ``(position, movers)`` split: the predicted loss change over the next decision interval
        if ``position`` (with ``movers``) trained its own copy (negative: untying helps)."""


class TyingPolicy(ABC):
    """Proposes tie maps. Subclasses set ``name`` and ``dynamic`` (False: the map never changes)."""

    name: ClassVar[str]
    dynamic: ClassVar[bool] = True
    starts_above_budget: ClassVar[bool] = False  # shrink: starts with more unique layers than the budget, ties down
    needs_scorer: bool = False  # True: decide() must be given a MapScorer

    def __init__(self, num_layers: int, config: PolicyConfig):
        if num_layers < 1:
            raise ValueError(f"a policy needs at least one layer, got {num_layers}")
        self.num_layers = num_layers
        self.config = config

    @abstractmethod
    def initial_tie_map(self) -> list[int]:
        """The map training starts from."""

    @abstractmethod
    def decide(self, tie_map: list[int], step: int, scorer: MapScorer | None = None) -> Decision | None:
        """The next map, given the current one at optimizer step ``step``; ``None`` keeps the current map.
        Policies with ``needs_scorer`` get the trainer's scorer for this decision."""

    def budgeted_initial_map(self) -> list[int]:
        """The map ``config.init`` names, refused in one line when it exceeds ``config.budget``: every dynamic
        policy that starts from ``init`` starts here."""
        tie_map = initial_map_from_init(self.config.init, self.num_layers)
        check_budget(tie_map, self.config.budget, "initial tie map")
        return tie_map

    def begin_run(self, max_steps: int) -> None:
        """Told once before training (and again on resume, with the same value): the run's length."""


    def schedule_problem(self, max_steps: int, interval: int) -> tuple[str, bool] | None:
        """Why this policy cannot do what it was asked in a run of ``max_steps`` with a decision every
        ``interval`` steps: ``(one line, refuse)``, where ``refuse`` says the run must not start (else the line is
        a warning), or ``None``. Checked before training."""
        return None
    def learn(self, loss: float, scorer: MapScorer | None = None) -> dict[str, float]:
        """Learn from the loss the last decision's map reached (mean token loss, one number for all
        ranks). Returns what to log (e.g. ``reward``, ``q_loss``). A non-finite loss must not reach a
        learner: it is skipped and reported as ``{"skipped_nonfinite_loss": 1.0}``. Policies with
        ``needs_scorer`` also get the scorer (e.g. for a paired reward)."""
        return {}

    def metrics(self) -> dict[str, float]:
        """State worth logging at any time (e.g. ``epsilon``)."""
        return {}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything needed to continue exactly: tensors (for safetensors) and JSON-able values.

        The values always carry :meth:`state_header` so a state cannot be loaded into the wrong policy."""
        return {}, self.state_header()

    def load_state_dict(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        self.check_state_header(values)

    def state_header(self) -> dict[str, Any]:
        """The numbers a saved state only fits: the policy's name and layer count."""
        return {"name": self.name, "num_layers": self.num_layers}

    def check_state_header(self, values: dict[str, Any]) -> None:
        """Refuse, with a ``ValueError`` that says what differs, a state saved by another policy or layer count."""
        name, num_layers = values.get("name"), values.get("num_layers")
        if canonical_policy_name(str(name), warn=False) != self.name:
            raise ValueError(f"this state was saved by policy {name!r}; it cannot be loaded into policy {self.name!r}")
        if num_layers != self.num_layers:
            raise ValueError(
                f"this {name!r} state was saved for {num_layers} layers; this policy has {self.num_layers} layers"
            )


def initial_map_from_init(init: str, num_layers: int) -> list[int]:
    """The map ``PolicyConfig.init`` names: one of ``tie_map.NAMED_MAPS`` (``"all_tied"``, every position on
    layer 0, the paper code; ``"untied"``), or an explicit comma-separated map such as ``"0,0,2,0"``
    (validated and put in root form)."""
    if init in NAMED_MAPS:
        return named_map(init, num_layers)
    try:
        entries = [int(part) for part in init.split(",")]
    except ValueError:
        raise ValueError(
            f"init={init!r} is neither 'all_tied', 'untied' nor a comma-separated map of integers such as '0,0,2,0'"
        ) from None
    return normalize_tie_map(entries, num_layers)


# Old policy names still accepted, because checkpoints (dyntie_state.json) and result files store them.
DEPRECATED_POLICY_NAMES = {"all_shared": "all_tied"}


def canonical_policy_name(name: str, warn: bool = True) -> str:
    """``name``, or the current name of a deprecated one (with a ``FutureWarning`` unless ``warn`` is off)."""
    new = DEPRECATED_POLICY_NAMES.get(name)
    if new is None:
        return name
    if warn:
        warnings.warn(f"tie_policy {name!r} is deprecated; it is called {new!r} now", FutureWarning, stacklevel=3)
    return new
