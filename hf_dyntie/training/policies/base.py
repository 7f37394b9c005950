"""The interface every tying policy implements, and the schedule helpers several share (options: options.py).

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

from ...tie_map import check_budget, named_map, normalize_tie_map
from .options import PolicyConfig, check_policy_options

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
    default_interval: ClassVar[int] = 4  # optimizer steps between decisions unless config.interval says (paper's k)
    needs_scorer: bool = False  # True: decide() must be given a MapScorer

    def __init__(self, num_layers: int, config: PolicyConfig):
        if num_layers < 1:
            raise ValueError(f"a policy needs at least one layer, got {num_layers}")
        check_policy_options(config)
        self.num_layers = num_layers
        self.config = config
        self.interval = config.interval if config.interval is not None else self.default_interval

    @abstractmethod
    def initial_tie_map(self) -> list[int]:
        """The map training starts from."""

    @abstractmethod
    def decide(self, tie_map: list[int], step: int, scorer: MapScorer | None = None) -> Decision | None:
        """The next map, given the current one at optimizer step ``step``; ``None`` keeps the current map.
        Policies with ``needs_scorer`` get the trainer's scorer for this decision."""

    def start_map(self, default: str = "all_tied") -> list[int]:
        """``config.start_map`` in root form, or the named map ``default`` (the paper code starts all tied)."""
        if self.config.start_map is None:
            return named_map(default, self.num_layers)
        return normalize_tie_map(self.config.start_map, self.num_layers)

    def budgeted_initial_map(self) -> list[int]:
        """:meth:`start_map`, refused in one line when it exceeds ``config.budget``: every dynamic policy that
        may not start above its budget starts here."""
        tie_map = self.start_map()
        check_budget(tie_map, self.config.budget, "initial tie map")
        return tie_map

    def begin_run(self, max_steps: int) -> None:
        """Told once before training (and again on resume, with the same value): the run's length."""


    def schedule_problem(self, max_steps: int) -> tuple[str, bool] | None:
        """Why this policy cannot do what it was asked in a run of ``max_steps`` with a decision every
        ``self.interval`` steps: ``(one line, refuse)``, where ``refuse`` says the run must not start (else the
        line is a warning), or ``None``. Checked before training."""
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
