"""``DynTieTrainingArguments``: ``TrainingArguments`` plus the settings of dynamic layer tying."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .policies import POLICIES
from .policies.base import DEPRECATED_POLICY_NAMES, canonical_policy_name
from .policies.options import PolicyArguments, PolicyConfig, check_policy_options, one_of, policy_options
from ..tie_map import NAMED_MAPS
from ..tying import TIE_DELTA_INITS, TIE_MERGES, TIE_MODES, check_relaxed

POLICY_NAMES = tuple(POLICIES)  # the policy registry is the one list of names
REWARD_SOURCES = ("train_batch", "eval_batch")


@dataclass
class DynTieTrainingArguments(TrainingArguments, PolicyArguments):
    """Every ``TrainingArguments`` field, the policy's options and the ``tie_*`` fields below. The policy's
    options (``tie_<name>`` for each option of :class:`PolicyConfig`: ``tie_budget``, ``tie_grow_until``,
    ``tie_reward``, ...) come from ``PolicyArguments``, with PolicyConfig's default, help and check. Defaults follow the
    paper's code except the policy, the reward and the epsilon schedule, chosen from our benchmarks
    (docs/RESULTS.md; ``PAPER_OPTIONS`` holds the paper's)."""

    tie_policy: str = field(
        default="grow",
        metadata={
            "help": f"Tying policy: one of {', '.join(POLICY_NAMES)}. Default grow: the one tying row of the evidence "
            "table (docs/RESULTS.md) that beat static sharing at the same budget. greedy scores maps on an eval "
            "dataset; qlearning is the paper's agent.",
            "choices": [*POLICY_NAMES, *DEPRECATED_POLICY_NAMES],
        },
    )
    resume_allow_partial: bool = field(
        default=False,
        metadata={"help": "Resume from a checkpoint that lacks its optimizer state or learning-rate schedule; they "
                  "restart (a warning says which). Without it such a resume is refused: it would not be exact."},
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
    tie_score_tokens: int = field(
        default=2048,
        metadata={"help": "greedy / grow scored: tokens of the fixed held-out scoring set, drawn once from the eval dataset."},
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
    tie_lora_vectors: bool = field(
        default=False,
        metadata={
            "help": "With relaxed ties, also give every tied position its own offset of each norm weight and bias "
            "(vectors are not low-rank: the offset is full, d numbers each). With --tie_lora_init svd at full rank "
            "a pretrained model's tied positions then compute exactly what they did. A model whose "
            "config.tie_lora_vectors is set keeps its offsets either way."
        },
    )
    tie_lora_roots: bool = field(
        default=False,
        metadata={
            "help": "With relaxed ties, a root that has followers runs its own delta (and offsets) too: every member "
            "of a group is the shared layer plus its own correction (Relaxed Recursive Transformers' per-loop "
            "LoRA). With --tie_merge average and --tie_lora_init svd at full rank a pretrained model's groups then "
            "compute exactly what their layers did. A model whose config.tie_lora_roots is set keeps it either way."
        },
    )
    tie_lora_init: str = field(
        default="zero",
        metadata={
            "help": "Relaxed ties: how a newly tied position's deltas begin, at the start on a model with trained "
            "weights and at every tie a dynamic policy makes. 'zero': at the shared layer's function; 'svd': at the "
            "truncated SVD of the position's own weights minus the shared ones (at full rank its own linear maps "
            "again, and with --tie_lora_vectors its own function), and positions whose root changes in the same "
            "step are refitted to what they computed.",
            "choices": list(TIE_DELTA_INITS),
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
    tie_seed: int | None = field(default=None, metadata={"help": "Seed of the policy (default: --seed)."})
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
            self.tie_interval = POLICIES[self.tie_policy].default_interval
        check_policy_options(self.policy_config(), prefix="tie_")
        one_of(TIE_MERGES)("tie_merge", self.tie_merge)
        one_of(TIE_DELTA_INITS)("tie_lora_init", self.tie_lora_init)
        one_of(REWARD_SOURCES)("tie_reward_source", self.tie_reward_source)
        if self.tie_mode is not None:
            one_of(TIE_MODES)("tie_mode", self.tie_mode)
        if self.tie_lora_rank is not None:  # None keeps the model's (checked against it in start.py)
            check_relaxed(self.tie_lora_rank, self.tie_lora_vectors, self.tie_lora_roots)
        if self.tie_lora_init == "svd" and self.tie_lora_rank == 0:
            raise ValueError("tie_lora_init='svd' needs relaxed ties: pass tie_lora_rank > 0")
        if self.tie_score_tokens < 1:
            raise ValueError(f"tie_score_tokens must be >= 1, got {self.tie_score_tokens}")
        if self.tie_reward == "paired" and self.tie_policy != "qlearning":
            raise ValueError(f"tie_reward='paired' is a Q-learning reward; tie_policy={self.tie_policy!r} does not learn")
        if self.tie_max_nonfinite < 0:
            raise ValueError(f"tie_max_nonfinite must be >= 0 (0: never stop), got {self.tie_max_nonfinite}")
        check_tie_init(self.tie_init)
        if self.tie_policy == "replay" and not self.tie_replay_file:
            raise ValueError("tie_policy='replay' needs --tie_replay_file (a tie_history.jsonl of an earlier run)")

    def policy_config(self, start_map: list[int] | None = None) -> PolicyConfig:
        """The policy's view of these arguments: every ``tie_<option>``, the policy's seed, and the map it starts
        from (``tie_init`` resolved against the model by ``start.build_policy``)."""
        options = {declared.name: getattr(self, f"tie_{declared.name}") for declared in policy_options()}
        seed = self.seed if self.tie_seed is None else self.tie_seed
        return PolicyConfig(seed=seed, start_map=start_map, **options)


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
