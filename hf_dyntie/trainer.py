"""``DynTieTrainer``: a ``transformers.Trainer`` that lets a tying policy change the tie map while training.

The data path, one optimizer step at a time::

    first micro-batch of step t, t % k == 0:
        policy.learn(loss the current map reached)      (the reward of the decision made at t - k)
        decision = policy.decide(tie_map)                (the same on every rank)
        model.retie(decision.tie_map)                    (weights: untie copies, tie releases)
        drop optimizer state of the parameters retie reset
    every micro-batch: stock forward / backward (tied positions route to their roots)
    optimizer step (tied parameters have no grad: AdamW leaves them alone, weight decay included)

Decisions happen only at optimizer-step boundaries, so gradient accumulation, ``no_sync`` and clipping
are undisturbed. The parameter set and its order never change, so the optimizer is never rebuilt and
a DDP wrapper stays valid (``find_unused_parameters`` must be on: tied parameters get no gradient).
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import Trainer
from transformers.modeling_utils import unwrap_model
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils import logging

from .memory import torch_optimizer, training_state_bytes
from .modeling_dyntie import DynTieMixin
from .optimizer_state import carry_optimizer_state
from .plotting import plot_tie_map, plot_unique_layers
from .policies import POLICIES, make_policy
from .policies.base import TyingPolicy, scaled_epsilon_decay
from .scoring import HeldOutScorer
from .tie_map import (
    check_budget,
    format_tie_map,
    maps_per_step,
    normalize_tie_map,
    num_unique_layers,
    tied_fraction,
)
from .training_args import DynTieTrainingArguments
from .tying import block_kinds

logger = logging.get_logger(__name__)

POLICY_TENSORS_NAME = "dyntie_policy.safetensors"
STATE_NAME = "dyntie_state.json"
HISTORY_NAME = "tie_history.jsonl"
TIE_MAP_PLOT_NAME = "tie_map.png"
UNIQUE_LAYERS_PLOT_NAME = "unique_layers.png"
# where a model's weights came from when they were not freshly initialised (set by from_stock and by training)
WEIGHTS_ORIGIN_ATTR = "_dyntie_weights_from"


class NonFiniteLossError(RuntimeError):
    """Training stopped because the training loss was NaN or infinite (``tie_max_nonfinite`` such optimizer
    steps). The message is one line: the step, what was kept, and what to try."""


class CheckpointError(ValueError):
    """A checkpoint this run cannot resume from (one line naming the folder and what is wrong)."""


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
    return "model" if weights_origin(model) is not None else "all_tied"


def build_policy(model: DynTieMixin, args: DynTieTrainingArguments) -> tuple[TyingPolicy, str, list[int]]:
    """The run's policy, its resolved ``tie_init`` and the map training starts from, every tying argument
    checked against the model (a one-line ``ValueError`` naming the argument otherwise). Reads no data."""
    num_layers = len(model.dyntie_layers)
    tie_init = resolve_tie_init(model, args)
    policy_class = POLICIES[args.tie_policy]
    config = args.policy_config()
    if tie_init == "model" and policy_class.dynamic:
        if args.tie_budget is not None and num_unique_layers(model.tie_map) > args.tie_budget:
            origin = weights_origin(model) or "the model"
            raise ValueError(
                f"the model's own tie map {model.tie_map} (weights from {origin}) has "
                f"{num_unique_layers(model.tie_map)} unique layers, more than tie_budget={args.tie_budget}; pass "
                f"tie_init='all_tied' (drops its trained layers) or an explicit map within the budget"
            )
        config.init = ",".join(str(r) for r in model.tie_map)
    if args.tie_unique_layers is not None and not getattr(policy_class, "needs_unique_layers", False):
        logger.warning_once(
            f"tie_unique_layers={args.tie_unique_layers} is ignored: tie_policy={args.tie_policy!r} does not use it "
            "(sequence, cycle and cycle_rev do)"
        )
    if args.tie_init not in ("auto", "model", "all_tied", "untied") and not policy_class.dynamic:
        logger.warning_once(f"tie_init={args.tie_init!r} is ignored: tie_policy={args.tie_policy!r} has a fixed map")
    policy = make_policy(args.tie_policy, num_layers, config)
    if tie_init == "model" and policy.dynamic:
        initial = model.tie_map
    else:
        initial = policy.initial_tie_map()
    initial = normalize_tie_map(initial, num_layers)  # bad maps fail here
    check_budget(initial, args.tie_budget, "initial tie map")
    _check_parallelism(args, policy)
    return policy, tie_init, initial


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


def compile_bound(model: DynTieMixin, tie_mode: str) -> int:
    """The most times the layer stack's compiled code compiles in a whole run, however many tie maps it
    visits (``torch_compile=True``, see ``DynTieMixin.compile_layers``).

    Graph kinds: training forwards take one graph (two in follow mode: a tied block's weights are detached,
    so its backward has no weight gradients), every no-grad forward (evaluation, held-out rewards, scoring
    candidate maps) one more. Each kind may compile twice: first for the shapes it meets, then once more
    with dynamic shapes when a batch of another shape comes (a last partial batch, another eval batch
    size). Blocks configured differently per position (``tying.block_kinds``) multiply it. GPT-2, Llama
    and BERT with stock settings: 4 in share mode, 6 in follow mode."""
    kinds = (2 if tie_mode == "follow" else 1) + 1
    return 2 * kinds * block_kinds(model.dyntie_layers)


def _check_parallelism(args: DynTieTrainingArguments, policy: TyingPolicy) -> None:
    checkpointing = getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False)
    kwargs = getattr(args, "activation_checkpointing_kwargs", None)
    reentrant = isinstance(kwargs, dict) and kwargs.get("use_reentrant", False)
    if args.world_size > 1 and checkpointing and reentrant:
        raise ValueError(
            "Reentrant activation checkpointing cannot run under DDP with find_unused_parameters, which tied "
            "layers need (their parameters get no gradient). Use {'use_reentrant': False} (the default)."
        )
    if not policy.dynamic:
        return
    if args.fsdp or args.fsdp_config and args.fsdp_config.get("fsdp_version"):
        raise ValueError(
            "FSDP shards parameters into flat buffers fixed at wrap time, so a tie map cannot change under it. "
            "Use DDP (torchrun / accelerate launch --multi_gpu), or a static tie_policy."
        )
    if args.deepspeed:
        raise ValueError(
            "DeepSpeed partitions parameters and gradients at wrap time, so a tie map cannot change under it. "
            "Use DDP (torchrun / accelerate launch --multi_gpu), or a static tie_policy."
        )


RESUME_LATEST = ("true", "last", "latest")


def resolve_checkpoint(value: str | bool | None, output_dir: str) -> str | None:
    """What ``resume_from_checkpoint`` names: ``None`` (a fresh run), or an existing checkpoint folder.

    ``True`` and the strings ``"True"``, ``"last"``, ``"latest"`` (how a command line spells it) mean the
    latest ``checkpoint-*`` in ``output_dir``; ``"False"``/``""`` mean none. Raises :class:`CheckpointError`.
    """
    if value is None or value is False:
        return None
    if isinstance(value, str) and value.strip().lower() in ("", "false", "none"):
        return None
    if value is True or (isinstance(value, str) and value.strip().lower() in RESUME_LATEST and not os.path.isdir(value)):
        latest = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if latest is None:
            raise CheckpointError(f"resume_from_checkpoint={value!r}: {output_dir} holds no checkpoint-* folder to resume from")
        return latest
    folder = str(value)
    if not os.path.isdir(folder):
        raise CheckpointError(f"resume_from_checkpoint {folder!r} does not exist (or is not a folder)")
    return folder


def checkpoint_weight_keys(folder: str) -> set[str] | None:
    """Tensor names of a checkpoint's safetensors weights, from the file headers only; ``None`` when the
    folder holds no safetensors weights (another format: left to the stock loader)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    try:
        if os.path.isfile(index):
            with open(index) as f:
                return set(json.load(f)["weight_map"])
        if os.path.isfile(single):
            with safe_open(single, "pt") as weights:
                return set(weights.keys())
    except Exception as err:  # OSError, a bad index, safetensors' own error for a truncated or corrupt file
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"checkpoint {folder}: cannot read its weights ({detail})") from None
    return None


def read_tying_state(folder: str, model: DynTieMixin, policy_name: str) -> dict[str, Any]:
    """The tying state of a checkpoint this model and policy can resume from, or a :class:`CheckpointError`
    that says why not. Reads JSON and the weights' headers only, so a script can check it before any data work."""
    path = os.path.join(folder, STATE_NAME)
    if not os.path.exists(path):
        raise CheckpointError(f"{folder} has no {STATE_NAME}: it was not written by DynTieTrainer and cannot resume tying")
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} cannot be read ({err}); the checkpoint is damaged") from None
    num_layers = len(model.dyntie_layers)
    if state.get("policy") != policy_name:
        raise CheckpointError(
            f"checkpoint {folder} was written by tie_policy={state.get('policy')!r}, this run uses {policy_name!r}"
        )
    if state.get("num_layers") != num_layers:
        raise CheckpointError(f"checkpoint {folder} has {state.get('num_layers')} layers, this model has {num_layers}")
    try:
        tie_map = normalize_tie_map(state["tie_map"], num_layers)
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"checkpoint {folder}: its {STATE_NAME} holds no valid tie map ({err})") from None
    keys = checkpoint_weight_keys(folder)
    if keys is not None:
        prefix = model._dyntie_layers_path
        lacking = [
            i for i, r in enumerate(tie_map) if r == i
            if any(f"{prefix}.{i}.{name}" not in keys for name, _ in model.dyntie_layers[i].named_parameters())
        ]
        if lacking:
            raise CheckpointError(
                f"checkpoint {folder} lacks the weights of layer(s) {lacking}, which its tie map "
                f"{format_tie_map(tie_map)} trains on their own; refusing to resume with them randomly initialised"
            )
    return state


class DynTieTrainer(Trainer):
    """A ``Trainer`` for DynTie models that runs a tying policy (``args.tie_policy``) while it trains.

    Everything else is the stock Trainer: arguments, callbacks, ``report_to``, evaluation, saving. On top
    it logs ``tie/*`` metrics, writes ``tie_history.jsonl`` (one line per decision) and two plots to
    ``output_dir``, and stores the policy state in every checkpoint (safetensors + JSON) so that
    ``resume_from_checkpoint`` continues exactly.
    """

    def __init__(self, model=None, args: DynTieTrainingArguments | None = None, *pargs, **kwargs):
        if args is None:
            raise ValueError("DynTieTrainer needs DynTieTrainingArguments (it holds the tying settings)")
        if not isinstance(args, DynTieTrainingArguments):
            raise TypeError(f"DynTieTrainer needs DynTieTrainingArguments, got {type(args).__name__}")
        if not isinstance(unwrap_model(model), DynTieMixin):
            raise TypeError(
                f"DynTieTrainer trains DynTie models (e.g. DynTieGPT2LMHeadModel), got {type(model).__name__}; "
                "bring a stock model in with hf_dyntie.convert.from_stock()"
            )
        dyn = unwrap_model(model)
        self._weights_origin = weights_origin(dyn)
        self.policy: TyingPolicy
        self.policy, self.tie_init, _ = build_policy(dyn, args)  # every tying argument checked here
        if args.ddp_find_unused_parameters is False:
            logger.warning("DynTieTrainer turns ddp_find_unused_parameters on: tied parameters receive no gradient")
        args.ddp_find_unused_parameters = True
        if args.tie_mode is not None and args.tie_mode != dyn.config.tie_mode:
            dyn.config.tie_mode = args.tie_mode
            dyn.retie(dyn.tie_map)  # re-route the leaves under the new gradient mode
        super().__init__(model, args, *pargs, **kwargs)
        check_eval_data(self.policy, args, self.eval_dataset is not None)
        if args.torch_compile:
            self._compile_layers(dyn)
        self._last_checkpoint: str | None = None  # the newest checkpoint this trainer wrote or resumed from
        self._reset_tying_state()

    # ---- setup -------------------------------------------------------------------------------------

    def _build_accelerator_args(self, **kwargs) -> dict[str, Any]:
        """The stock accelerator arguments, except that with ``torch_compile`` accelerate must not compile the
        whole model: a whole-model graph specialises on the tie map (one compilation per map, then dynamo's
        eager fall-back). ``_compile_layers`` compiles the layer stack instead."""
        accelerator_args = super()._build_accelerator_args(**kwargs)
        if self.args.torch_compile and "dynamo_plugin" in accelerator_args:
            from accelerate.utils import TorchDynamoPlugin

            accelerator_args["dynamo_plugin"] = TorchDynamoPlugin(backend="no")
        return accelerator_args

    def _compile_layers(self, model: DynTieMixin) -> None:
        """``torch_compile=True``: compile the blocks with the routing outside the graph, and warn when this
        run's settings could compile more often than dynamo allows before it falls back to eager."""
        import torch._dynamo

        bound = compile_bound(model, model.config.tie_mode)
        limit = int(torch._dynamo.config.recompile_limit)
        kinds = block_kinds(model.dyntie_layers)
        if bound > limit:
            logger.warning(
                f"torch_compile: this model may compile its layers up to {bound} times ({kinds} differently "
                f"configured block(s), tie_mode={model.config.tie_mode!r}), more than torch._dynamo.config."
                f"recompile_limit={limit}: past it dynamo runs the layers eagerly. Raise recompile_limit to {bound}."
            )
        mode = self.args.torch_compile_mode
        if mode in ("reduce-overhead", "max-autotune") and torch.cuda.is_available():
            logger.warning(
                f"torch_compile_mode={mode!r} records CUDA graphs on the weights' addresses; a tied position reads its "
                "root's weights, so a new tie map re-records them. Prefer the default mode with dynamic tying."
            )
        self._compile_no_cache = "use_cache" in inspect.signature(type(model).forward).parameters
        model.compile_layers(backend=self.args.torch_compile_backend or "inductor", mode=mode)
        logger.info(f"torch_compile: layers compiled with the routing outside the graph (at most {bound} compilations)")

    def _prepare_inputs(self, inputs):
        """With compiled layers, forwards run without a KV cache (``use_cache=False``) where the model takes
        one: a cache is per position, so a block carrying one runs eagerly. Training reads no cache, and
        evaluation drops it from its outputs anyway."""
        inputs = super()._prepare_inputs(inputs)
        if getattr(self, "_compile_no_cache", False) and isinstance(inputs, Mapping) and "use_cache" not in inputs:
            inputs = {**inputs, "use_cache": False}
        return inputs

    def _reset_tying_state(self) -> None:
        self._records: list[dict[str, Any]] = []  # one per decision, reward filled in when known
        self._pending: dict[str, Any] | None = None  # the last decision, waiting for its reward
        self._last_decided_step = -1
        self._seen_step = -1
        self._step_loss = 0.0  # sum of this step's micro-batch losses (= the step's mean loss)
        self._last_step_loss: torch.Tensor | float | None = None
        self._eval_batches_used = 0
        self._eval_iterator = None
        self._last_logs: dict[str, float] = {}
        self._state_bytes: dict[str, int] = {}
        self._scorer: HeldOutScorer | None = None
        self._run_begun = False
        self._nonfinite_steps = 0  # optimizer steps whose training loss was NaN or infinite

    @property
    def dyntie_model(self) -> DynTieMixin:
        return unwrap_model(self.model)

    def _start_tying(self) -> None:
        """A fresh run: the policy's initial map, before the optimizer and any wrapper exist."""
        self._reset_tying_state()
        model = self.dyntie_model
        initial = normalize_tie_map(self._initial_tie_map(model, self.args), len(model.dyntie_layers))
        self._say_how_tying_starts(model.tie_map, initial)
        model.retie(initial)
        if self.args.should_save:
            self._history_path().parent.mkdir(parents=True, exist_ok=True)
            self._history_path().write_text("")
        if not self.policy.dynamic:
            self._record({"step": 0, "layer": None, "action": None, "tie_map": initial})

    def _initial_tie_map(self, model: DynTieMixin, args: DynTieTrainingArguments) -> list[int]:
        if self.policy.dynamic and self.tie_init == "model":
            return model.tie_map
        return self.policy.initial_tie_map()

    def _say_how_tying_starts(self, current: list[int], initial: list[int]) -> None:
        """One warning when the model's weights came from somewhere: which map training starts from, and the
        positions whose trained weights that start discards, if any."""
        origin = self._weights_origin
        if origin is None or not self.args.should_log:
            return
        dropped = dropped_positions(current, initial)
        if self.args.tie_init == "auto" and self.tie_init == "model" and self.policy.dynamic:
            logger.warning(
                f"DynTieTrainer: the weights came from {origin}, so tying starts from the model's own map "
                f"{format_tie_map(current)} (tie_init='auto'); pass tie_init='all_tied' for the paper's all-tied start"
            )
        elif dropped:
            logger.warning(
                f"DynTieTrainer: the weights came from {origin}, and the initial map {format_tie_map(initial)} "
                f"(tie_policy={self.args.tie_policy!r}, tie_init={self.args.tie_init!r}) ties layer(s) {dropped}, "
                f"discarding their trained weights; tie_init='model' keeps them"
            )

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        resume_from_checkpoint = resolve_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if resume_from_checkpoint is None:
            self._start_tying()
        try:
            output = super().train(resume_from_checkpoint, *args, **kwargs)
            self._refuse_nonfinite_weights("at the end of training")
            return output
        except NonFiniteLossError:
            self._close_progress_bar()  # so that the error is the last thing on the terminal, not a redrawn bar
            raise
        finally:
            if self.state.global_step > 0:  # the weights are trained now: a later trainer keeps them by default
                self.dyntie_model.__dict__[WEIGHTS_ORIGIN_ATTR] = "an earlier DynTieTrainer run"
            self._finish_tying()

    # ---- the decision loop -------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        step = self.state.global_step
        if step != self._seen_step:  # first micro-batch of a new optimizer step
            if self._seen_step >= 0:
                self._last_step_loss = self._step_loss  # kept as a tensor until a reward needs it
            self._seen_step, self._step_loss = step, 0.0
            if self.policy.dynamic and step % self.args.tie_interval == 0 and step != self._last_decided_step:
                self._decide(step)
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_loss = self._step_loss + loss.detach().float()  # a tensor: no device sync per step
        if self.accelerator.sync_gradients and self.args.tie_max_nonfinite > 0:  # the step's last micro-batch
            self._check_step_loss(step)
        if self.accelerator.sync_gradients and self._will_log_after(step):  # grads exist only now
            self._state_bytes = training_state_bytes(self.dyntie_model, self.optimizer)
        return loss

    def _check_step_loss(self, step: int) -> None:
        """Before the optimizer step: stop at the ``tie_max_nonfinite``-th step whose loss is not finite (on any
        rank), and skip the update of the ones before it. (The stock Trainer only hides such losses from its
        logs, and the update that follows turns every weight into NaN.)"""
        bad = (~torch.isfinite(torch.as_tensor(self._step_loss))).float().reshape(())
        if self.accelerator.num_processes > 1:  # every rank takes the same way out
            bad = self.accelerator.reduce(bad.to(self.args.device), reduction="sum")
        if not bool(bad):
            return
        self._nonfinite_steps += 1
        value = float(self._step_loss)
        limit = self.args.tie_max_nonfinite
        if self._nonfinite_steps >= limit:
            raise NonFiniteLossError(self._nonfinite_message(step, value))
        logger.warning(
            f"training loss is {value} at optimizer step {step + 1}: skipping its update "
            f"({self._nonfinite_steps} of tie_max_nonfinite={limit} non-finite steps)"
        )
        if getattr(self.accelerator, "scaler", None) is None:  # a grad scaler skips non-finite steps by itself
            self.model.zero_grad(set_to_none=True)  # no gradient: the optimizer leaves every weight alone

    def _close_progress_bar(self) -> None:
        for callback in self.callback_handler.callbacks:
            bar = getattr(callback, "training_bar", None)
            if bar is not None:
                bar.close()
                callback.training_bar = None

    def _refuse_nonfinite_weights(self, where: str) -> None:
        """After a tolerated non-finite step (``tie_max_nonfinite`` > 1): never hand back or save NaN weights."""
        if self._nonfinite_steps == 0:
            return
        bad = [name for name, p in self.dyntie_model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            kept = f"the last checkpoint is {self._last_checkpoint}" if self._last_checkpoint else "no checkpoint was written"
            raise NonFiniteLossError(
                f"the weights are not finite {where} (step {self.state.global_step}, e.g. {bad[0]}) after "
                f"{self._nonfinite_steps} non-finite training loss(es): nothing saved; {kept}. Try a lower learning_rate "
                f"(now {self.args.learning_rate:g}) or gradient clipping (max_grad_norm)."
            )

    def _nonfinite_message(self, step: int, value: float) -> str:
        args = self.args
        count = f" (non-finite step {self._nonfinite_steps} of tie_max_nonfinite={args.tie_max_nonfinite})" \
            if args.tie_max_nonfinite > 1 else ""
        kept = f"the last checkpoint is {self._last_checkpoint}" if self._last_checkpoint else "no checkpoint was written"
        tries = [f"a lower learning_rate (now {args.learning_rate:g})"]
        if args.max_grad_norm is None or args.max_grad_norm <= 0:
            tries.append("gradient clipping (max_grad_norm 1.0)")
        else:
            tries.append(f"a smaller max_grad_norm (now {args.max_grad_norm:g})")
        if args.fp16:
            tries.append("bf16 instead of fp16")
        elif args.bf16:
            tries.append("fp32 (no bf16)")
        else:
            tries.append("a longer warmup (warmup_steps)")
        return (
            f"training loss is {value} at optimizer step {step + 1}{count}: training stopped there, before its update, "
            f"and no model was saved as the result; {kept}. Try {', '.join(tries[:-1])} or {tries[-1]}."
        )

    def _will_log_after(self, step: int) -> bool:
        """Whether the Trainer logs after this optimizer step (or it is the last): counting the training
        state is cheap but not free, so it is done only when someone will read it."""
        every = max(1, int(getattr(self.state, "logging_steps", 0) or 1))
        return not self._state_bytes or (step + 1) % every == 0 or step + 1 >= self.state.max_steps

    def _decide(self, step: int) -> None:
        if not self._run_begun:
            self.policy.begin_run(self.state.max_steps)
            self._run_begun = True
        if self.args.tie_epsilon_decay is None:  # scaled to this run (same value on resume: same max_steps)
            self.policy.config.epsilon_decay = scaled_epsilon_decay(
                self.args.tie_epsilon_start, self.args.tie_epsilon_min, self.state.max_steps,
                self.args.tie_interval, len(self.dyntie_model.dyntie_layers),
            )
        scorer = self._get_scorer() if self.policy.needs_scorer else None
        if self._pending is not None:
            loss = self._reward_loss()
            learned = self.policy.learn(loss, scorer)
            self._pending.update(loss=loss if math.isfinite(loss) else None, reward=learned.get("reward"))
            self._record(self._pending)
            self._last_logs.update({f"tie/{k}": float(v) for k, v in learned.items() if v is not None})
            self._pending = None
        decision = self.policy.decide(self.dyntie_model.tie_map, step, scorer)
        self._last_decided_step = step
        if decision is None:
            return
        tie_map = self._same_on_all_ranks(decision.tie_map)
        report = self.dyntie_model.retie(tie_map, merge=self.args.tie_merge)
        carry_optimizer_state(self.optimizer, report.moves)
        self._pending = {"step": step, "layer": decision.layer, "action": decision.action, "tie_map": tie_map}
        if decision.scores is not None:
            self._pending["scores"] = decision.scores
            self._last_logs.update(score_metrics(decision.scores, tie_map))

    def _get_scorer(self) -> HeldOutScorer:
        """The held-out scorer, built at the first scored decision: ``tie_score_tokens`` worth of the eval
        dataset's first batches, the same at every decision (and after a resume)."""
        if self._scorer is None:
            batches, tokens = [], 0
            for batch in self.get_eval_dataloader():
                batch = self._prepare_inputs(batch)
                rows = int(batch["input_ids"].shape[0])
                per_row = int(batch["input_ids"].numel()) // max(1, rows)
                keep = min(rows, -(-(self.args.tie_score_tokens - tokens) // max(1, per_row)))  # rows still needed
                if keep < rows:  # the scoring set is tie_score_tokens, not a whole eval batch more
                    batch = {k: v[:keep] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.items()}
                batches.append(batch)
                tokens += keep * per_row
                if tokens >= self.args.tie_score_tokens:
                    break
            model = self.dyntie_model

            def loss_of(inputs):
                with self.compute_loss_context_manager():
                    return model(**inputs).loss

            reduce = (lambda t: self.accelerator.reduce(t.to(self.args.device), reduction="mean").cpu()) \
                if self.accelerator.num_processes > 1 else (lambda t: t)
            self._scorer = HeldOutScorer(model, batches, loss_of, self._horizon_lr, reduce)
        return self._scorer

    def _horizon_lr(self) -> float:
        """Sum of the learning rates of the next ``tie_interval`` optimizer steps, from the schedule."""
        step, horizon = self.state.global_step, self.args.tie_interval
        group = torch_optimizer(self.optimizer).param_groups[0]
        lambdas = getattr(self.lr_scheduler, "lr_lambdas", None)
        if not lambdas or "initial_lr" not in group:  # not a LambdaLR: assume the current rate holds
            return float(group["lr"]) * horizon
        end = min(step + horizon, max(step + 1, self.state.max_steps))
        return float(sum(group["initial_lr"] * lambdas[0](s) for s in range(step, end)))

    def _reward_loss(self) -> float:
        """Mean loss the current map reached, one number for all ranks."""
        if self.args.tie_reward_source == "eval_batch":
            local = self._held_out_loss()
        else:
            local = float(self._last_step_loss) if self._last_step_loss is not None else float("nan")
        value = torch.tensor(local, dtype=torch.float64, device=self.args.device)
        if self.accelerator.num_processes > 1:
            value = self.accelerator.reduce(value, reduction="mean")
        return float(value)

    @torch.no_grad()
    def _held_out_loss(self) -> float:
        """One batch of the eval set, eval mode, current map (the paper code's reward measurement)."""
        if self._eval_iterator is None:
            self._eval_iterator = iter(self.get_eval_dataloader())
            for _ in range(self._eval_batches_used):  # resume: continue where the checkpoint was
                self._next_eval_batch(count=False)
        inputs = self._prepare_inputs(self._next_eval_batch())
        model = self.model
        was_training = model.training
        model.eval()
        try:
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs)
        finally:
            model.train(was_training)
        return float(loss.mean())

    def _next_eval_batch(self, count: bool = True):
        try:
            batch = next(self._eval_iterator)
        except StopIteration:
            self._eval_iterator = iter(self.get_eval_dataloader())
            batch = next(self._eval_iterator)
        if count:
            self._eval_batches_used += 1
        return batch

    def _same_on_all_ranks(self, tie_map: list[int]) -> list[int]:
        """Rank 0's map everywhere (every rank runs the same policy on the same rewards; this makes sure)."""
        if self.accelerator.num_processes > 1 and dist.is_available() and dist.is_initialized():
            holder = [list(tie_map)]
            dist.broadcast_object_list(holder, src=0)
            tie_map = holder[0]
        return list(tie_map)

    # ---- what a user sees --------------------------------------------------------------------------

    def _record(self, record: dict[str, Any]) -> None:
        record = {**record, "unique_layers": num_unique_layers(record["tie_map"])}
        record.setdefault("loss", None)
        record.setdefault("reward", None)
        self._records.append(record)
        if self.args.should_save:
            with self._history_path().open("a") as f:
                f.write(json.dumps(record) + "\n")

    def _history_path(self) -> Path:
        return Path(self.args.output_dir) / HISTORY_NAME

    def tie_metrics(self) -> dict[str, float]:
        """The live tying metrics (also merged into every Trainer log)."""
        summary = self.dyntie_model.tie_summary()
        metrics = {
            "tie/unique_layers": float(summary["unique_layers"]),
            "tie/tied_fraction": tied_fraction(summary["tie_map"]),
            "tie/trainable_parameters": float(summary["trainable_parameters"]),
            **{f"tie/{k}": float(v) for k, v in self.policy.metrics().items()},
            **self._last_logs,
        }
        if self._state_bytes:
            metrics["tie/training_state_bytes"] = float(self._state_bytes["total"])
        if self.args.tie_budget is not None:
            metrics["tie/budget"] = float(self.args.tie_budget)
        return metrics

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if not any(k.startswith("eval_") or k.startswith("test_") for k in logs):
            logs = {**logs, **self.tie_metrics()}
        super().log(logs, *args, **kwargs)

    def _finish_tying(self) -> None:
        """Close the last decision's record and draw the plots (rank 0)."""
        if self._pending is not None:
            self._record(self._pending)
            self._pending = None
        if not (self.args.should_save and self.args.tie_plots and self._records):
            return
        summary = self.dyntie_model.tie_summary()
        out = Path(self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        plot_tie_map(self._records, self.state.global_step, out / TIE_MAP_PLOT_NAME)
        plot_unique_layers(
            self._records, self.state.global_step, out / UNIQUE_LAYERS_PLOT_NAME,
            summary["parameters_per_layer"], summary["parameters_outside_layers"],
        )

    def dyntie_summary(self) -> dict[str, Any]:
        """Final and step-weighted mean unique layers and trainable parameters, and the training state."""
        summary = self.dyntie_model.tie_summary()
        records = self._records or [{"step": 0, "tie_map": summary["tie_map"]}]
        maps = maps_per_step(records, max(self.state.global_step, 1))
        mean_unique = sum(num_unique_layers(m) for m in maps) / len(maps)
        per_layer, outside = summary["parameters_per_layer"], summary["parameters_outside_layers"]
        return {
            "num_layers": summary["num_layers"],
            "final_tie_map": summary["tie_map"],
            "final_unique_layers": summary["unique_layers"],
            "mean_unique_layers": mean_unique,
            "final_trainable_parameters": summary["trainable_parameters"],
            "mean_trainable_parameters": mean_unique * per_layer + outside,
            "total_parameters": summary["total_parameters"],
            "stored_parameters": summary["stored_parameters"],
            "training_state_bytes": self._state_bytes.get("total", 0),
            "tie_budget": self.args.tie_budget,
        }

    # ---- checkpoints -------------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial) -> None:
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        self._refuse_nonfinite_weights(f"at checkpoint {folder}")
        if self.args.should_save:
            os.makedirs(folder, exist_ok=True)
            self._save_tying_state(folder)
        super()._save_checkpoint(model, trial)
        self._last_checkpoint = folder

    def _save_tying_state(self, folder: str) -> None:
        tensors, values = self.policy.state_dict()
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, os.path.join(folder, POLICY_TENSORS_NAME))
        state = {
            "policy": self.policy.name,
            "num_layers": len(self.dyntie_model.dyntie_layers),
            "tie_map": self.dyntie_model.tie_map,
            "policy_values": values,
            "records": self._records,
            "pending": self._pending,
            "last_decided_step": self._last_decided_step,
            "last_step_loss": self._loss_after_last_step(),
            "eval_batches_used": self._eval_batches_used,
            "last_logs": self._last_logs,
        }
        with open(os.path.join(folder, STATE_NAME), "w") as f:
            json.dump(state, f)

    def _loss_after_last_step(self) -> float | None:
        """The loss of the step that just finished (what the next decision's reward will read)."""
        loss = self._step_loss if self._seen_step == self.state.global_step - 1 else self._last_step_loss
        return None if loss is None else float(loss)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Resume: the checkpoint's tie map first (so its compact weights land on the right layers), then
        the weights (stock), then the policy and the decision bookkeeping."""
        state = read_tying_state(resume_from_checkpoint, self.dyntie_model, self.policy.name)  # refuse first
        self._reset_tying_state()
        self._last_checkpoint = resume_from_checkpoint
        self.dyntie_model.retie(state["tie_map"])
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        tensors_path = os.path.join(resume_from_checkpoint, POLICY_TENSORS_NAME)
        tensors = load_file(tensors_path) if os.path.exists(tensors_path) else {}
        self.policy.load_state_dict(tensors, state["policy_values"])
        self._records = state["records"]
        self._pending = state["pending"]
        self._last_decided_step = state["last_decided_step"]
        self._last_step_loss = state["last_step_loss"]
        self._seen_step = -1
        self._eval_batches_used = state["eval_batches_used"]
        self._last_logs = state["last_logs"]
        if self.args.should_save:  # the history file restarts from the checkpoint's records
            self._history_path().parent.mkdir(parents=True, exist_ok=True)
            self._history_path().write_text("".join(json.dumps(r) + "\n" for r in self._records))

    def _load_best_model(self) -> None:
        """Best checkpoint: its tie map first, then its weights."""
        best = self.state.best_model_checkpoint
        config_path = os.path.join(best, "config.json")
        if os.path.exists(config_path):
            with open(config_path) as f:
                tie_map = json.load(f).get("tie_map")
            self.dyntie_model.retie(tie_map if tie_map is not None else list(range(len(self.dyntie_model.dyntie_layers))))
        super()._load_best_model()

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        """A compact checkpoint lacks tied positions and the tied output embedding by design."""
        model = self.dyntie_model
        expected = set(model.tied_parameter_names()) | set(getattr(model, "all_tied_weights_keys", {}) or {})
        missing = [k for k in load_result.missing_keys if k not in expected]
        if missing:
            logger.warning(f"There were missing keys in the checkpoint model loaded: {missing}.")
        if load_result.unexpected_keys:
            logger.warning(f"There were unexpected keys in the checkpoint model loaded: {load_result.unexpected_keys}.")
        model.tie_weights()


def score_metrics(scores: list[dict[str, Any]], chosen: list[int]) -> dict[str, float]:
    """``tie/score_*`` logs of one scored decision: how many candidates, the best score of each kind and
    the chosen map's (0 for keeping the current map)."""
    out = {"tie/score_candidates": float(len(scores))}
    for kind in ("tie", "move", "untie"):
        values = [e["score"] for e in scores if e["kind"] == kind]
        if values:
            out[f"tie/score_best_{kind}"] = float(min(values))
    out["tie/score_chosen"] = next((float(e["score"]) for e in scores if e["tie_map"] == chosen), 0.0)
    return out
