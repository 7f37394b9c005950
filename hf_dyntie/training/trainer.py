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
The save and load hooks (models, metrics, card, checkpoints) are in ``trainer_files.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer
from transformers.modeling_utils import unwrap_model
from transformers.utils import logging

from .accounting import training_state_bytes
from .compiling import compile_for_training
from .checkpoints import resolve_checkpoint
from .history import TieHistory
from ..modeling_dyntie import WEIGHTS_ORIGIN_ATTR, DynTieMixin
from .nonfinite import NonFiniteLossError, stop_message, weights_message
from .optimizer_state import carry_optimizer_state
from .policies.base import TyingPolicy
from .saving import DiskFullError
from .scoring import HeldOutScorer, score_metrics, scoring_batches, summed_lr
from .start import (
    build_policy,
    check_eval_data,
    relaxed_settings,
    say_how_tying_starts,
    weights_origin,
)
from ..tie_map import tied_fraction
from .trainer_files import SaveLoadHooks
from .training_args import DynTieTrainingArguments

logger = logging.get_logger(__name__)


class DynTieTrainer(SaveLoadHooks, Trainer):
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
        self.policy, self.tie_init, initial = build_policy(dyn, args)  # every tying argument checked here
        self._initial_map = initial
        relaxed = bool(args.tie_lora_rank if args.tie_lora_rank is not None else dyn.config.tie_lora_rank)
        never_idle = not self.policy.dynamic and initial == list(range(len(initial))) and not relaxed
        if never_idle:  # a fixed untied map: every parameter gets a gradient, DDP need not look (nor warn)
            args.ddp_find_unused_parameters = False
        else:
            if args.ddp_find_unused_parameters is False:
                logger.warning("DynTieTrainer turns ddp_find_unused_parameters on: tied parameters receive no gradient")
            args.ddp_find_unused_parameters = True
        if args.tie_mode is not None:
            dyn.tie_mode = args.tie_mode  # re-routes the leaves under the new gradient mode
        if args.tie_lora_rank is not None or args.tie_lora_vectors or args.tie_lora_roots:  # before the optimizer exists
            device = next(dyn.parameters()).device  # the deltas' random start follows --seed, nothing else moves
            with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
                torch.manual_seed(args.seed)
                dyn.relax_ties(*relaxed_settings(dyn, args))  # new parameters
        super().__init__(model, args, *pargs, **kwargs)
        check_eval_data(self.policy, args, self.eval_dataset is not None)
        self._compile_no_cache = False
        if args.torch_compile:
            self._compile_no_cache = compile_for_training(dyn, args.torch_compile_backend, args.torch_compile_mode)
        self._last_checkpoint: str | None = None  # the newest checkpoint this trainer wrote or resumed from
        self._reset_tying_state()

    # ---- setup -------------------------------------------------------------------------------------

    def _build_accelerator_args(self, **kwargs) -> dict[str, Any]:
        """The stock accelerator arguments, except that with ``torch_compile`` accelerate must not compile the
        whole model (compiling.py: one compilation per tie map, then eager); the layers are compiled instead."""
        accelerator_args = super()._build_accelerator_args(**kwargs)
        if self.args.torch_compile and "dynamo_plugin" in accelerator_args:
            from accelerate.utils import TorchDynamoPlugin

            accelerator_args["dynamo_plugin"] = TorchDynamoPlugin(backend="no")
        return accelerator_args

    def _prepare_inputs(self, inputs):
        """With compiled layers, forwards run without a KV cache (``use_cache=False``) where the model takes
        one: a cache is per position, so a block carrying one runs eagerly. Training reads no cache, and
        evaluation drops it from its outputs anyway."""
        inputs = super()._prepare_inputs(inputs)
        if self._compile_no_cache and isinstance(inputs, Mapping) and "use_cache" not in inputs:
            inputs = {**inputs, "use_cache": False}
        return inputs

    def _reset_tying_state(self) -> None:
        self.history = TieHistory(self.args.output_dir, self.args.should_save)
        self._seen_step = -1
        self._step_loss = 0.0  # sum of this step's micro-batch losses (= the step's mean loss)
        self._last_step_loss: torch.Tensor | float | None = None
        self._eval_iterator = None
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
        initial = self._initial_map
        say_how_tying_starts(self._weights_origin, self.args, self.tie_init, self.policy.dynamic, model.tie_map, initial)
        if self._weights_origin is not None:  # trained layers: tie_merge and tie_lora_init say what they leave
            model.tie_trained(initial, merge=self.args.tie_merge, delta_init=self.args.tie_lora_init)
        else:
            model.retie(initial)
        self.history.start(initial, self.policy.dynamic)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        resume_from_checkpoint = resolve_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if resume_from_checkpoint is None:
            self._start_tying()
        finished = False
        try:
            output = super().train(resume_from_checkpoint, *args, **kwargs)
            self._refuse_nonfinite_weights("at the end of training")
            finished = True
            return output
        except (NonFiniteLossError, DiskFullError):
            self._close_progress_bar()  # so that the error is the last thing on the terminal, not a redrawn bar
            raise
        finally:
            if self.state.global_step > 0:  # the weights are trained now: a later trainer keeps them by default
                self.dyntie_model.__dict__[WEIGHTS_ORIGIN_ATTR] = "an earlier DynTieTrainer run"
            self._finish_tying(finished)

    # ---- the decision loop -------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        step = self.state.global_step
        if step != self._seen_step:  # first micro-batch of a new optimizer step
            if self._seen_step >= 0:
                self._last_step_loss = self._step_loss  # kept as a tensor until a reward needs it
            self._seen_step, self._step_loss = step, 0.0
            if self.policy.dynamic and step % self.args.tie_interval == 0 and step != self.history.last_decided_step:
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
            raise NonFiniteLossError(stop_message(self.args, step, value, self._nonfinite_steps, self._last_checkpoint))
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
            raise NonFiniteLossError(weights_message(
                self.args, where, self.state.global_step, bad[0], self._nonfinite_steps, self._last_checkpoint
            ))

    def _will_log_after(self, step: int) -> bool:
        """Whether the Trainer logs after this optimizer step (or it is the last): counting the training
        state is cheap but not free, so it is done only when someone will read it."""
        every = max(1, int(getattr(self.state, "logging_steps", 0) or 1))
        return not self._state_bytes or (step + 1) % every == 0 or step + 1 >= self.state.max_steps

    def _decide(self, step: int) -> None:
        if not self._run_begun:
            problem = self.policy.schedule_problem(self.state.max_steps)
            if problem is not None:  # a run sized by epochs: known only now, past the data work: said, not refused
                logger.warning(problem[0])
            self.policy.begin_run(self.state.max_steps)
            self._run_begun = True
        scorer = self._get_scorer() if self.policy.needs_scorer else None
        history = self.history
        if history.pending is not None:
            loss = self._reward_loss()
            learned = self.policy.learn(loss, scorer)
            history.close_pending(loss, learned.get("reward"))
            history.last_logs.update({f"tie/{k}": float(v) for k, v in learned.items() if v is not None})
        decision = self.policy.decide(self.dyntie_model.tie_map, step, scorer)
        if decision is None:
            history.decided(step, None)
            return
        tie_map = self._same_on_all_ranks(decision.tie_map)
        report = self.dyntie_model.tie_trained(tie_map, merge=self.args.tie_merge, delta_init=self.args.tie_lora_init)
        carry_optimizer_state(self.optimizer, report.moves)
        pending = {"step": step, "layer": decision.layer, "action": decision.action, "tie_map": tie_map}
        if decision.scores is not None:
            pending["scores"] = decision.scores
            history.last_logs.update(score_metrics(decision.scores, tie_map))
        history.decided(step, pending)

    def _get_scorer(self) -> HeldOutScorer:
        """The held-out scorer, built at the first scored decision: ``tie_score_tokens`` worth of the eval
        dataset's first batches, the same at every decision (and after a resume)."""
        if self._scorer is None:
            batches = scoring_batches(
                (self._prepare_inputs(batch) for batch in self.get_eval_dataloader()), self.args.tie_score_tokens
            )
            model = self.dyntie_model

            def loss_of(inputs):
                with self.compute_loss_context_manager():
                    return model(**inputs).loss

            def horizon_lr() -> float:
                return summed_lr(self.optimizer, self.lr_scheduler, self.state.global_step, self.args.tie_interval,
                                 self.state.max_steps)

            reduce = (lambda t: self.accelerator.reduce(t.to(self.args.device), reduction="mean").cpu()) \
                if self.accelerator.num_processes > 1 else (lambda t: t)
            self._scorer = HeldOutScorer(model, batches, loss_of, horizon_lr, reduce)
        return self._scorer

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
            for _ in range(self.history.eval_batches_used):  # resume: continue where the checkpoint was
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
            self.history.eval_batches_used += 1
        return batch

    def _same_on_all_ranks(self, tie_map: list[int]) -> list[int]:
        """Rank 0's map everywhere (every rank runs the same policy on the same rewards; this makes sure)."""
        if self.accelerator.num_processes > 1 and dist.is_available() and dist.is_initialized():
            holder = [list(tie_map)]
            dist.broadcast_object_list(holder, src=0)
            tie_map = holder[0]
        return list(tie_map)

    # ---- what a user sees --------------------------------------------------------------------------

    def tie_metrics(self) -> dict[str, float]:
        """The live tying metrics (also merged into every Trainer log)."""
        summary = self.dyntie_model.tie_summary()
        metrics = {
            "tie/unique_layers": float(summary["unique_layers"]),
            "tie/tied_fraction": tied_fraction(summary["tie_map"]),
            "tie/trainable_parameters": float(summary["trainable_parameters"]),
            **{f"tie/{k}": float(v) for k, v in self.policy.metrics().items()},
            **self.history.last_logs,
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

    def _finish_tying(self, finished: bool = True) -> None:
        """Close the last decision's record; when the run finished, move its history into place and draw the plots
        (rank 0). A run that failed leaves an earlier run's history and plots as they were."""
        self.history.close_pending()
        if not finished:
            return
        self.history.publish()
        if self.args.tie_plots:
            self.history.plot(self.state.global_step, self.dyntie_model.tie_summary())

    def dyntie_summary(self) -> dict[str, Any]:
        """Final and step-weighted mean unique layers and trainable parameters, and the training state."""
        return {
            **self.history.summary(self.dyntie_model.tie_summary(), self.state.global_step),
            "training_state_bytes": self._state_bytes.get("total", 0),
            "tie_budget": self.args.tie_budget,
        }
