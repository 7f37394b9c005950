"""The options of the tying policies, declared once: name, default, help text and check.

:class:`PolicyConfig` is what a policy reads. ``DynTieTrainingArguments`` derives its ``tie_<name>`` fields
from these declarations (:func:`tie_option`), and :meth:`DynTieTrainingArguments.policy_config` builds the
config from them, so a policy built from ``PolicyConfig()`` is the policy the trainer builds from default
arguments. Every option is checked in one place (:func:`check_policy_options`), when the arguments are made
and when a policy is built from a config by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields, make_dataclass
from typing import Any, get_type_hints

REWARDS = ("neg_ppl_clipped", "neg_loss", "loss_improvement", "paired")
Q_STATES = ("map", "onehot_progress")
BOOTSTRAPS = ("same_layer", "next_layer")
GROW_ORDERS = ("sequence", "spread", "scored")
SHRINK_ORDERS = ("sequence", "scored")

Check = Callable[[str, Any], None]  # (the option's name as the user spelled it, its value) -> raise ValueError


def fraction(name: str, value: float | None) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


def share_of_run(name: str, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must lie in (0, 1] (a fraction of max_steps), got {value}")


def at_least(minimum: int) -> Check:
    def check(name: str, value: float | None) -> None:
        if value is not None and value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")

    return check


def one_of(choices: Sequence[object]) -> Check:
    def check(name: str, value: object) -> None:
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")

    return check


def option(default: Any, help: str, check: Check | None = None, choices: Sequence[object] | None = None) -> Any:
    """A policy option: its default, the help text the scripts print, and its check (``choices`` checks
    membership and lets argparse list them)."""
    if choices is not None:
        check = one_of(choices)
    return field(default=default, metadata={"help": help, "check": check, "choices": choices})


@dataclass
class PolicyConfig:
    """Options of the tying policies. ``seed`` and ``start_map`` are not options of their own: the trainer
    fills them from ``--tie_seed`` (else ``--seed``) and from ``--tie_init`` resolved against the model."""

    seed: int = 0
    start_map: list[int] | None = None  # the map a dynamic policy starts from; None: the policy's own start
    interval: int | None = option(
        None, "Optimizer steps between two tying decisions. Default: each policy's own (TyingPolicy.default_interval): "
        "4 (the paper code's k) for qlearning, random and shrink; 100 for greedy; 1 for grow (it unties on its own "
        "schedule) and replay (it follows the recorded steps).", at_least(1))
    budget: int | None = option(
        None, "Most unique layers the tie map may have at any decision. Dynamic policies never propose a map above "
        "it (actions that would exceed it are masked); grow grows up to it; shrink, the one policy that starts "
        "above it (untied, from a trained model), ties down to it. Default: no limit.", at_least(1))
    unique_layers: int | None = option(
        None, "Static patterns sequence, cycle and cycle_rev: the number of distinct layers.", at_least(1))
    grow_until: float = option(
        0.25, "grow: fraction of max_steps by which the budget is reached (unties spaced evenly until then).",
        share_of_run)
    grow_order: str = option(
        "sequence", "grow: which position unties next: 'sequence' (contiguous groups, towards the sequence "
        "pattern), 'spread' (towards the cycle pattern) or 'scored' (the split the held-out scorer predicts helps "
        "most).", choices=GROW_ORDERS)
    shrink_until: float = option(
        0.5, "shrink: fraction of max_steps by which the model is tied down to --tie_budget (ties spaced evenly "
        "until then).", share_of_run)
    shrink_order: str = option(
        "sequence", "shrink: which root merges next: 'sequence' (towards the sequence pattern) or 'scored' (of "
        "the merges of a root into the root just before it, the one that raises the held-out loss least; needs an "
        "eval dataset).", choices=SHRINK_ORDERS)
    score_margin: float = option(
        0.002, "greedy: nats a change must gain over keeping the map (about the measured paired noise).", at_least(0))
    size_penalty: float = option(
        0.0, "greedy: nats charged per unique layer, a soft budget (0: only --tie_budget limits the size).",
        at_least(0))
    epsilon_start: float = option(1.0, "Q-learning: initial exploration rate.", fraction)
    epsilon_decay: float | None = option(
        None, "Q-learning: epsilon is multiplied by this after each sweep over the layers. Default: scaled to the "
        "run so epsilon reaches --tie_epsilon_min 65%% of the way through max_steps (the paper code's 0.95 assumes "
        "hundreds of sweeps; a short run would end still exploring). Pass 0.95 for paper parity.", fraction)
    epsilon_min: float = option(0.01, "Q-learning: floor of the exploration rate.", fraction)
    gamma: float = option(0.99, "Q-learning: discount factor.", fraction)
    q_lr: float = option(1e-3, "Q-learning: learning rate of the Q-network (AdamW).", at_least(0))
    q_weight_decay: float = option(0.01, "Q-learning: weight decay of the Q-network (AdamW).", at_least(0))
    q_hidden: int = option(128, "Q-learning: hidden width of the Q-network.", at_least(1))
    q_state: str = option(
        "map", "Q-learning: what the Q-network reads: 'map' (raw root indices, the paper code) or "
        "'onehot_progress' (one-hot roots plus the fraction of training done).", choices=Q_STATES)
    reward: str = option(
        "neg_loss", "Reward of a decision: 'neg_loss' (-mean loss, the default: see docs/RESULTS.md), "
        "'neg_ppl_clipped' (-perplexity clipped to [-10, 10], the paper code; constant while perplexity > 10, so "
        "the agent learns nothing on real corpora early on), 'loss_improvement' (running baseline minus loss), "
        "'paired' (qlearning: the decision's paired score on the fixed held-out scoring set, its immediate cost "
        "plus what untying gained after the interval; needs an eval dataset).", choices=REWARDS)
    reward_clip: float = option(10.0, "Q-learning: rewards are clipped to [-clip, clip].", at_least(0))
    reward_baseline_decay: float = option(
        0.9, "Q-learning, reward 'loss_improvement': decay of the running loss baseline.", fraction)
    replay_size: int = option(
        0, "Q-learning: replay buffer capacity (0: learn from the last transition only).", at_least(0))
    replay_batch: int = option(32, "Q-learning: transitions per replayed update.", at_least(1))
    target_update: int = option(
        0, "Q-learning: decisions between target-network syncs (0: no target network).", at_least(0))
    bootstrap: str = option(
        "same_layer", "Q-learning: bootstrap with the max over the same layer's slice of Q(s') (paper code) or over "
        "the next decision's layer slice ('next_layer').", choices=BOOTSTRAPS)
    replay_file: str | None = option(None, "Replay policy: a tie_history.jsonl written by an earlier run.")
    replay_permute_seed: int | None = option(
        None, "Replay policy: permute the recorded layer groups with this seed.")


# The paper code's settings where our defaults differ (docs/RESULTS.md says why they differ).
PAPER_OPTIONS = {"reward": "neg_ppl_clipped", "epsilon_decay": 0.95, "interval": 4}


def policy_options() -> list[Field]:
    """The declared options (every field but ``seed`` and ``start_map``), in declaration order."""
    return [f for f in fields(PolicyConfig) if "help" in f.metadata]


def tie_option(name: str) -> Any:
    """The ``tie_<name>`` field of the training arguments: the option's own default and help (and choices, so
    ``--help`` lists them); the check runs in :func:`check_policy_options`."""
    declared = next(f for f in policy_options() if f.name == name)
    assert declared.default is not MISSING
    metadata = {"help": declared.metadata["help"]}
    if declared.metadata["choices"] is not None:
        metadata["choices"] = list(declared.metadata["choices"])
    return field(default=declared.default, metadata=metadata)


def policy_arguments() -> type:
    """A dataclass of ``tie_<option>`` fields, one per option (:func:`tie_option`): the base from which
    ``DynTieTrainingArguments`` inherits them, so that no option is spelled out a second time."""
    hints = get_type_hints(PolicyConfig)
    cls = make_dataclass(
        "PolicyArguments", [(f"tie_{f.name}", hints[f.name], tie_option(f.name)) for f in policy_options()]
    )
    cls.__module__ = __name__
    cls.__doc__ = "The tying policy's options as training arguments (``tie_<name>``), derived from PolicyConfig."
    return cls


PolicyArguments = policy_arguments()


def check_policy_options(config: PolicyConfig, prefix: str = "") -> None:
    """Every option's check, naming an option the way the user spelled it (``prefix``: ``"tie_"`` for the
    training arguments). A one-line ``ValueError``."""
    for declared in policy_options():
        check = declared.metadata["check"]
        if check is not None:
            check(prefix + declared.name, getattr(config, declared.name))
