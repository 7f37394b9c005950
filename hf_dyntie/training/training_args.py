"""``DynTieTrainingArguments``: ``TrainingArguments`` plus the settings of dynamic layer tying."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .policies import POLICIES
from .policies.base import (
    BOOTSTRAPS,
    DEPRECATED_POLICY_NAMES,
    GROW_ORDERS,
    SHRINK_ORDERS,
    Q_STATES,
    REWARDS,
    PolicyConfig,
    canonical_policy_name,
    check_choice,
    check_fractions,
)
from ..tie_map import NAMED_MAPS
from ..tying import TIE_DELTA_INITS, TIE_MERGES, TIE_MODES, check_lora_rank

POLICY_NAMES = tuple(POLICIES)  # the policy registry is the one list of names
REWARD_SOURCES = ("train_batch", "eval_batch")
# optimizer steps between decisions when --tie_interval is not given: the paper's k = 4 for the per-layer
# agents; every step for grow (it acts only when an untie falls due); greedy scores all candidates at once
DEFAULT_INTERVALS = {"grow": 1, "greedy": 100, "replay": 1}  # replay: every step, so each recorded step is one


@dataclass
class DynTieTrainingArguments(TrainingArguments):
    """Every ``TrainingArguments`` field, and the ``tie_*`` fields below. Defaults follow the paper's code
    except the reward and the epsilon schedule, chosen from our benchmarks (docs/RESULTS.md)."""

    tie_policy: str = field(
        default="grow",
        metadata={
            "help": f"Tying policy: one of {', '.join(POLICY_NAMES)}. Default grow: the one tying row of the evidence "
            "table (docs/RESULTS.md) that beat static sharing at the same budget. greedy scores maps on an eval "
            "dataset; qlearning is the paper's agent.",
            "choices": [*POLICY_NAMES, *DEPRECATED_POLICY_NAMES],
        },
    )
    tie_interval: int | None = field(
        default=None,
        metadata={
            "help": "Optimizer steps between two tying decisions. Default: 4 (the paper code's k) for qlearning, "
            f"random; {DEFAULT_INTERVALS['greedy']} for greedy; 1 for grow (it unties on its own schedule) and replay (it "
            "follows the recorded steps)."
        },
    )
    resume_allow_partial: bool = field(
        default=False,
        metadata={"help": "Resume from a checkpoint that lacks its optimizer state or learning-rate schedule; they "
                  "restart (a warning says which). Without it such a resume is refused: it would not be exact."},
    )
    tie_budget: int | None = field(
        default=None,
        metadata={
            "help": "Most unique layers the tie map may have at any decision. Dynamic policies never propose a map "
            "above it (actions that would exceed it are masked); grow grows up to it. Default: no limit."
        },
    )
    tie_merge: str = field(
        default="discard",
        metadata={
            "help": "When a root with trained weights is tied to an earlier root: 'discard' its weights (the paper "
            "code) or 'average' them into the surviving root (weighted by the positions each ran, optimizer moments "
            "too). Dependents follow to the surviving root either way.",
            "choices": list(TIE_MERGES),
        },
    )
    tie_grow_until: float = field(
        default=0.25,
        metadata={"help": "grow: fraction of max_steps by which the budget is reached (unties spaced evenly until then)."},
    )
    tie_grow_order: str = field(
        default="sequence",
        metadata={
            "help": "grow: which position unties next: 'sequence' (contiguous groups, towards the sequence pattern), "
            "'spread' (towards the cycle pattern) or 'scored' (the split the held-out scorer predicts helps most).",
            "choices": list(GROW_ORDERS),
        },
    )
    tie_shrink_until: float = field(
        default=0.5,
        metadata={"help": "shrink: fraction of max_steps by which the model is tied down to --tie_budget (ties spaced "
                  "evenly until then)."},
    )
    tie_shrink_order: str = field(
        default="sequence",
        metadata={"help": "shrink: which root merges next: 'sequence' (towards the sequence pattern) or 'scored' "
                  "(the merge that raises the held-out loss least; needs an eval dataset).",
                  "choices": list(SHRINK_ORDERS)},
    )
    tie_score_tokens: int = field(
        default=2048,
        metadata={"help": "greedy / grow scored: tokens of the fixed held-out scoring set, drawn once from the eval dataset."},
    )
    tie_score_margin: float = field(
        default=0.002,
        metadata={"help": "greedy: nats a change must gain over keeping the map (about the measured paired noise)."},
    )
    tie_size_penalty: float = field(
        default=0.0,
        metadata={"help": "greedy: nats charged per unique layer, a soft budget (0: only --tie_budget limits the size)."},
    )
    tie_init: str = field(
        default="auto",
        metadata={
            "help": "Initial tie map for dynamic policies: 'auto' (the default: 'model' when the model's weights came "
            "from a checkpoint, from_pretrained or from_stock, so no trained layer is dropped; 'all_tied' for a "
            "freshly initialised model), 'all_tied' (every layer runs layer 0, the paper code), 'untied', 'model' "
            "(keep the map the model has), or an explicit comma-separated map such as '0,0,2,0'."
        },
    )
    tie_mode: str | None = field(
        default=None,
        metadata={
            "help": "Override the model's tie_mode: 'share' (gradients of all positions accumulate into the root) "
            "or 'follow' (tied positions use the root's weights with a stop-gradient, the paper code).",
            "choices": [*TIE_MODES, None],
        },
    )
    tie_lora_rank: int | None = field(
        default=None,
        metadata={
            "help": "Relaxed ties: give every tied position its own rank-r low-rank delta over its root's weights "
            "on each linear layer, trained together with the roots (0: plain ties). Default: the model's "
            "config.tie_lora_rank. An untie folds the delta into the position's own weights."
        },
    )
    tie_lora_init: str = field(
        default="zero",
        metadata={
            "help": "Relaxed ties on a model with trained weights (a pretrained checkpoint): how the deltas of the "
            "positions tied at the start begin. 'zero': at the shared layer's function; 'svd': at the truncated SVD "
            "of each position's own weights minus the shared ones (at full rank its own function again).",
            "choices": list(TIE_DELTA_INITS),
        },
    )
    tie_unique_layers: int | None = field(
        default=None, metadata={"help": "Static patterns sequence, cycle and cycle_rev: the number of distinct layers."}
    )
    tie_epsilon_start: float = field(default=1.0, metadata={"help": "Q-learning: initial exploration rate."})
    tie_epsilon_decay: float | None = field(
        default=None,
        metadata={
            "help": "Q-learning: epsilon is multiplied by this after each sweep over the layers. Default: scaled to "
            "the run so epsilon reaches --tie_epsilon_min 65%% of the way through max_steps (the paper code's 0.95 "
            "assumes hundreds of sweeps; a short run would end still exploring). Pass 0.95 for paper parity."
        },
    )
    tie_epsilon_min: float = field(default=0.01, metadata={"help": "Q-learning: floor of the exploration rate."})
    tie_gamma: float = field(default=0.99, metadata={"help": "Q-learning: discount factor."})
    tie_q_lr: float = field(default=1e-3, metadata={"help": "Q-learning: learning rate of the Q-network (AdamW)."})
    tie_q_hidden: int = field(default=128, metadata={"help": "Q-learning: hidden width of the Q-network."})
    tie_reward: str = field(
        default="neg_loss",
        metadata={
            "help": "Reward of a decision: 'neg_loss' (-mean loss, the default: see docs/RESULTS.md), "
            "'neg_ppl_clipped' (-perplexity clipped to [-10, 10], the paper code; constant while perplexity > 10, "
            "so the agent learns nothing on real corpora early on), 'loss_improvement' (running baseline minus loss), "
            "'paired' (qlearning: the decision's paired score on the fixed held-out scoring set, its immediate cost "
            "plus what untying gained after the interval; needs an eval dataset).",
            "choices": list(REWARDS),
        },
    )
    tie_reward_source: str = field(
        default="train_batch",
        metadata={
            "help": "Where the reward's loss comes from: 'train_batch' (the last training batch of the interval, "
            "measured by its own forward before its update: no extra work) or 'eval_batch' (one held-out batch "
            "from the eval dataset in eval mode, the paper code's way: one extra forward per decision).",
            "choices": list(REWARD_SOURCES),
        },
    )
    tie_replay_size: int = field(
        default=0, metadata={"help": "Q-learning: replay buffer capacity (0: learn from the last transition only)."}
    )
    tie_replay_batch: int = field(default=32, metadata={"help": "Q-learning: transitions per replayed update."})
    tie_target_update: int = field(
        default=0, metadata={"help": "Q-learning: decisions between target-network syncs (0: no target network)."}
    )
    tie_bootstrap: str = field(
        default="same_layer",
        metadata={
            "help": "Q-learning: bootstrap with the max over the same layer's slice of Q(s') (paper code) or over "
            "the next decision's layer slice ('next_layer').",
            "choices": list(BOOTSTRAPS),
        },
    )
    tie_q_state: str = field(
        default="map",
        metadata={
            "help": "Q-learning: what the Q-network reads: 'map' (raw root indices, the paper code) or "
            "'onehot_progress' (one-hot roots plus the fraction of training done).",
            "choices": list(Q_STATES),
        },
    )
    tie_seed: int | None = field(default=None, metadata={"help": "Seed of the policy (default: --seed)."})
    tie_replay_file: str | None = field(
        default=None, metadata={"help": "Replay policy: a tie_history.jsonl written by an earlier run."}
    )
    tie_replay_permute_seed: int | None = field(
        default=None, metadata={"help": "Replay policy: permute the recorded layer groups with this seed."}
    )
    tie_plots: bool = field(default=True, metadata={"help": "Write tie-map plots to output_dir at the end of training."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Scripts: train into an --output_dir that holds checkpoint-* folders of an earlier run by deleting "
            "them first (without it, such a folder is refused unless --resume_from_checkpoint continues that run)."
        },
    )
    save_remote_code: bool = field(
        default=True,
        metadata={
            "help": "Save the modeling code with the model and every checkpoint, local or pushed (config.json's "
            "auto_map and the .py files), so that AutoModel*.from_pretrained(..., trust_remote_code=True) loads it "
            "where hf_dyntie is not installed. --no_save_remote_code saves the weights and config only."
        },
    )
    tie_max_nonfinite: int = field(
        default=1,
        metadata={
            "help": "Stop training (NonFiniteLossError) at the N-th optimizer step whose training loss is NaN or "
            "infinite; the N-1 steps before it are skipped (no update). 1: stop at the first. 0: never stop, "
            "never skip (the stock Trainer's behaviour)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.tie_policy = canonical_policy_name(self.tie_policy)
        if self.tie_policy not in POLICY_NAMES:
            raise ValueError(f"unknown tie_policy {self.tie_policy!r}; choose one of {', '.join(POLICY_NAMES)}")
        if self.tie_interval is None:
            self.tie_interval = DEFAULT_INTERVALS.get(self.tie_policy, 4)
        if self.tie_interval < 1:
            raise ValueError(f"tie_interval must be >= 1 optimizer step, got {self.tie_interval}")
        if self.tie_budget is not None and self.tie_budget < 1:
            raise ValueError(f"tie_budget must be >= 1 unique layer, got {self.tie_budget}")
        check_choice("tie_merge", self.tie_merge, TIE_MERGES)
        check_choice("tie_lora_init", self.tie_lora_init, TIE_DELTA_INITS)
        if self.tie_lora_init == "svd" and self.tie_lora_rank == 0:
            raise ValueError("tie_lora_init='svd' needs relaxed ties: pass tie_lora_rank > 0")
        check_choice("tie_grow_order", self.tie_grow_order, GROW_ORDERS)
        check_choice("tie_shrink_order", self.tie_shrink_order, SHRINK_ORDERS)
        if not 0.0 < self.tie_shrink_until <= 1.0:
            raise ValueError(f"tie_shrink_until must lie in (0, 1] (a fraction of max_steps), got {self.tie_shrink_until}")
        if not 0.0 < self.tie_grow_until <= 1.0:
            raise ValueError(f"tie_grow_until must lie in (0, 1] (a fraction of max_steps), got {self.tie_grow_until}")
        if self.tie_score_tokens < 1:
            raise ValueError(f"tie_score_tokens must be >= 1, got {self.tie_score_tokens}")
        if self.tie_score_margin < 0 or self.tie_size_penalty < 0:
            raise ValueError(
                f"tie_score_margin and tie_size_penalty must be >= 0, got {self.tie_score_margin} and {self.tie_size_penalty}"
            )
        fractions = ("tie_epsilon_start", "tie_epsilon_decay", "tie_epsilon_min", "tie_gamma")
        check_fractions({name: getattr(self, name) for name in fractions})
        check_choice("tie_reward", self.tie_reward, REWARDS)
        if self.tie_reward == "paired" and self.tie_policy != "qlearning":
            raise ValueError(f"tie_reward='paired' is a Q-learning reward; tie_policy={self.tie_policy!r} does not learn")
        check_choice("tie_q_state", self.tie_q_state, Q_STATES)
        check_choice("tie_reward_source", self.tie_reward_source, REWARD_SOURCES)
        check_choice("tie_bootstrap", self.tie_bootstrap, BOOTSTRAPS)
        if self.tie_mode is not None:
            check_choice("tie_mode", self.tie_mode, TIE_MODES)
        if self.tie_lora_rank is not None:
            check_lora_rank(self.tie_lora_rank)
        if self.tie_unique_layers is not None and self.tie_unique_layers < 1:
            raise ValueError(f"tie_unique_layers must be >= 1, got {self.tie_unique_layers}")
        if self.tie_max_nonfinite < 0:
            raise ValueError(f"tie_max_nonfinite must be >= 0 (0: never stop), got {self.tie_max_nonfinite}")
        check_tie_init(self.tie_init)
        if self.tie_policy == "replay" and not self.tie_replay_file:
            raise ValueError("tie_policy='replay' needs --tie_replay_file (a tie_history.jsonl of an earlier run)")

    def policy_config(self) -> PolicyConfig:
        """The policy's view of these arguments."""
        return PolicyConfig(
            seed=self.seed if self.tie_seed is None else self.tie_seed,
            # "auto" / "model": the trainer resolves them against the model and passes the map it starts from
            init="all_tied" if self.tie_init in ("auto", "model") else self.tie_init,
            epsilon_start=self.tie_epsilon_start,
            epsilon_decay=self.tie_epsilon_decay,  # None: the policy scales it to max_steps (begin_run)
            interval=self.tie_interval,
            epsilon_min=self.tie_epsilon_min,
            gamma=self.tie_gamma,
            q_lr=self.tie_q_lr,
            q_hidden=self.tie_q_hidden,
            reward=self.tie_reward,
            replay_size=self.tie_replay_size,
            replay_batch=self.tie_replay_batch,
            target_update=self.tie_target_update,
            bootstrap=self.tie_bootstrap,
            q_state=self.tie_q_state,
            unique_layers=self.tie_unique_layers,
            replay_file=self.tie_replay_file,
            replay_permute_seed=self.tie_replay_permute_seed,
            budget=self.tie_budget,
            grow_until=self.tie_grow_until,
            grow_order=self.tie_grow_order,
            shrink_until=self.tie_shrink_until,
            shrink_order=self.tie_shrink_order,
            score_margin=self.tie_score_margin,
            size_penalty=self.tie_size_penalty,
        )


TIE_INITS = ("auto", "model", *NAMED_MAPS)


def check_tie_init(value: str) -> None:
    """Refuse a ``tie_init`` that is neither a named start nor a comma-separated list of integers (the map's
    length and pointers are checked against the model later, by the trainer)."""
    if value in TIE_INITS:
        return
    parts = str(value).split(",")
    if not all(part.strip().lstrip("-").isdigit() for part in parts):
        raise ValueError(
            f"tie_init {value!r} is none of {', '.join(TIE_INITS)} nor a comma-separated map such as '0,0,2,0'"
        )
