"""Where a training run starts: its policy, the map it starts from, and every tying argument checked against
the model, once, before training (and, from the scripts, before any data work). See docs/design.md ("The
trainer", where a run starts)."""

from __future__ import annotations

import os

import torch

from transformers.utils import logging

from ..modeling_dyntie import WEIGHTS_ORIGIN_ATTR, DynTieMixin
from .policies import POLICIES, make_policy
from .policies.base import TyingPolicy
from .policies.static import NEEDS_UNIQUE_LAYERS
from ..tie_map import NAMED_MAPS, check_budget, format_tie_map, named_map, normalize_tie_map, num_unique_layers
from .training_args import TIE_INITS, DynTieTrainingArguments

logger = logging.get_logger(__name__)



def weights_origin(model: DynTieMixin) -> str | None:
    """Where the model's weights came from, or ``None`` for a fresh initialisation.

    ``from_pretrained`` marks every parameter it loads (transformers' ``_is_hf_initialized``); ``from_stock``
    of a live model and a finished ``DynTieTrainer`` run leave a note on the model.
    """
    noted = model.__dict__.get(WEIGHTS_ORIGIN_ATTR)
    if noted:
        return str(noted)
    if any(getattr(p, "_is_hf_initialized", False) for p in model.dyntie_layers.parameters()):
        name = str(getattr(model, "name_or_path", "") or "")
        return f"the checkpoint {name!r}" if name else "a checkpoint"
    return None


def dropped_positions(old: list[int], new: list[int]) -> list[int]:
    """Positions that own weights under ``old`` and are tied under ``new``: retie discards what they learned."""
    return [i for i, (a, b) in enumerate(zip(old, new)) if a == i and b != i]


def resolve_tie_init(model: DynTieMixin, args: DynTieTrainingArguments) -> str:
    """``args.tie_init`` with ``'auto'`` decided: ``'model'`` when the weights came from somewhere
    (see :func:`weights_origin`), ``'all_tied'`` for a fresh model (and for ``replay``, which starts from
    its recorded map)."""
    if args.tie_init != "auto":
        return args.tie_init
    if args.tie_policy == "replay":
        return "all_tied"
    if POLICIES[args.tie_policy].starts_above_budget:  # shrink: a trained model's own map, else untied
        return "model" if weights_origin(model) is not None else "untied"
    return "model" if weights_origin(model) is not None else "all_tied"


def relaxed_settings(model: DynTieMixin, args) -> tuple[int, bool, bool]:
    """``(tie_lora_rank, tie_lora_vectors, tie_lora_roots)`` the run trains with: the arguments', else the
    model's (an argument can switch an option on, never off). What ``DynTieTrainer`` relaxes the model to and
    what a checkpoint to resume from must have been written with."""
    config = model.config
    rank = config.tie_lora_rank if args.tie_lora_rank is None else args.tie_lora_rank
    return rank, bool(args.tie_lora_vectors or config.tie_lora_vectors), bool(args.tie_lora_roots or config.tie_lora_roots)


def build_policy(model: DynTieMixin, args: DynTieTrainingArguments) -> tuple[TyingPolicy, str, list[int]]:
    """The run's policy, its resolved ``tie_init`` and the map training starts from, every tying argument
    checked against the model (a one-line ``ValueError`` naming the argument otherwise). Reads no data."""
    num_layers = len(model.dyntie_layers)
    tie_init = resolve_tie_init(model, args)
    policy_class = POLICIES[args.tie_policy]
    start_map = start_map_of(model, tie_init, num_layers)
    if tie_init == "model" and policy_class.dynamic:
        if args.tie_budget is not None and num_unique_layers(model.tie_map) > args.tie_budget and not policy_class.starts_above_budget:
            origin = weights_origin(model) or "the model"
            raise ValueError(
                f"the model's own tie map {model.tie_map} (weights from {origin}) has "
                f"{num_unique_layers(model.tie_map)} unique layers, more than tie_budget={args.tie_budget}; pass "
                f"tie_init='all_tied' (drops its trained layers) or an explicit map within the budget"
            )
    if args.tie_unique_layers is not None and not getattr(policy_class, "needs_unique_layers", False):
        logger.warning_once(
            f"tie_unique_layers={args.tie_unique_layers} is ignored: tie_policy={args.tie_policy!r} does not use it "
            f"({', '.join(NEEDS_UNIQUE_LAYERS)} do)"
        )
    if args.tie_init not in TIE_INITS and not policy_class.dynamic:
        logger.warning_once(f"tie_init={args.tie_init!r} is ignored: tie_policy={args.tie_policy!r} has a fixed map")
    policy = make_policy(args.tie_policy, num_layers, args.policy_config(start_map))
    initial = policy.initial_tie_map()  # the start map, or a static policy's fixed one; valid by construction
    if not policy_class.starts_above_budget:
        check_budget(initial, args.tie_budget, "initial tie map")
    relaxed = args.tie_lora_rank or (args.tie_lora_rank is None and model.config.tie_lora_rank)
    if args.tie_lora_init == "svd" and not relaxed:
        raise ValueError("tie_lora_init='svd' needs relaxed ties: pass tie_lora_rank > 0")
    for flag in ("tie_lora_vectors", "tie_lora_roots"):
        if getattr(args, flag) and not relaxed:
            raise ValueError(f"{flag} needs relaxed ties: pass tie_lora_rank > 0")
    problem = policy.schedule_problem(args.max_steps) if args.max_steps > 0 else None
    if problem is not None:
        message, refuse = problem
        if refuse:
            raise ValueError(message)
        logger.warning_once(message)
    _check_parallelism(args, policy)
    return policy, tie_init, initial


def start_map_of(model: DynTieMixin, tie_init: str, num_layers: int) -> list[int] | None:
    """The map a dynamic policy starts from, as a list: the model's own (``'model'``), a named map, or an
    explicit ``'0,0,2,0'`` (a one-line ``ValueError`` when it does not fit the model). ``None``: 'all_tied'
    for most policies, the policy's own start for the others (shrink: untied; replay: its recorded map)."""
    if tie_init == "model":
        return list(model.tie_map)
    if tie_init in NAMED_MAPS:
        return named_map(tie_init, num_layers)
    return normalize_tie_map([int(part) for part in tie_init.split(",")], num_layers)


def check_eval_data(policy: TyingPolicy, args: DynTieTrainingArguments, has_eval: bool, how: str = "") -> None:
    """Refuse a run whose policy or reward needs held-out data when there is none. ``how``: where a user
    gets some (the scripts name their flags)."""
    if has_eval:
        return
    how = how or "pass an eval_dataset"
    if args.tie_reward_source == "eval_batch" and policy.dynamic:
        raise ValueError(f"tie_reward_source='eval_batch' draws held-out batches: {how}")
    if policy.needs_scorer:
        raise ValueError(f"tie_policy={args.tie_policy!r} (tie_reward={args.tie_reward!r}) scores maps on held-out data: {how}")


def requested_fsdp(args: DynTieTrainingArguments) -> tuple[bool, str | None]:
    """Whether the run asks for FSDP, from the arguments or from ``accelerate launch``'s environment, and which
    version (``None`` when unsaid)."""
    config = args.fsdp_config or {}
    from_env = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    fsdp = bool(args.fsdp) or bool(config.get("fsdp_version")) or from_env
    version = config.get("fsdp_version") or os.environ.get("FSDP_VERSION")
    return fsdp, (str(version) if version is not None else None)


def _check_parallelism(args: DynTieTrainingArguments, policy: TyingPolicy) -> None:
    checkpointing = getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False)
    kwargs = getattr(args, "activation_checkpointing_kwargs", None)
    reentrant = isinstance(kwargs, dict) and kwargs.get("use_reentrant", False)
    if args.world_size > 1 and checkpointing and reentrant:
        raise ValueError(
            "Reentrant activation checkpointing cannot run under DDP with find_unused_parameters, which tied "
            "layers need (their parameters get no gradient). Use {'use_reentrant': False} (the default)."
        )
    fsdp, version = requested_fsdp(args)
    if fsdp and (args.use_cpu or not torch.cuda.is_available()):
        raise ValueError("FSDP was asked for, but this run is on the CPU, where accelerate silently trains with DDP "
                         "instead; shard on GPUs, or drop the FSDP settings to train with DDP.")
    if fsdp and str(version) != "2":
        raise ValueError("DynTie models shard with FSDP2 only (tied layers run inside their root's unit): set "
                         "fsdp_version: 2 in the FSDP config (examples/fsdp2.yaml).")
    if fsdp and getattr(args, "torch_compile", False):
        raise ValueError("torch_compile cannot be combined with FSDP2 for DynTie models yet: drop --torch_compile.")
    if args.deepspeed:
        raise ValueError(
            "DeepSpeed flattens parameters into its own buffers, which breaks the sharing of tied layers; shard "
            "with FSDP2 instead (accelerate launch --config_file examples/fsdp2.yaml; README, 'Sharded training')."
        )


def say_how_tying_starts(
    origin: str | None, args: DynTieTrainingArguments, tie_init: str, dynamic: bool, current: list[int], initial: list[int]
) -> None:
    """One warning when the model's weights came from ``origin``: which map training starts from, and the
    positions whose trained weights that start discards, if any."""
    if origin is None or not args.should_log:
        return
    dropped = dropped_positions(current, initial)
    if args.tie_init == "auto" and tie_init == "model" and dynamic:
        logger.warning(
            f"DynTieTrainer: the weights came from {origin}, so tying starts from the model's own map "
            f"{format_tie_map(current)} (tie_init='auto'); pass tie_init='all_tied' for the paper's all-tied start"
        )
    elif dropped:
        logger.warning(
            f"DynTieTrainer: the weights came from {origin}, and the initial map {format_tie_map(initial)} "
            f"(tie_policy={args.tie_policy!r}, tie_init={args.tie_init!r}) ties layer(s) {dropped}, "
            f"{what_a_tie_keeps(args, dynamic)}"
        )


def what_a_tie_keeps(args: DynTieTrainingArguments, dynamic: bool) -> str:
    """How the start's ties treat the trained weights of the positions they tie, as the warning says it."""
    kept = []
    if args.tie_merge == "average":
        kept.append("merging each group into its mean (tie_merge='average')")
    if args.tie_lora_rank and args.tie_lora_init == "svd":
        kept.append(f"keeping each tied position's residual as a rank-{args.tie_lora_rank} SVD delta")
    if kept:
        return " and ".join(kept)
    keep = "tie_merge='average' or SVD deltas (tie_lora_rank, tie_lora_init='svd') keep part of them"
    return f"discarding their trained weights; {keep}" + ("; tie_init='model' all of them" if dynamic else "")
