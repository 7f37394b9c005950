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

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer
from transformers.modeling_utils import unwrap_model
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .accounting import training_state_bytes
from .compiling import compile_for_training
from .checkpoints import check_unfinished, read_tying_state, resolve_checkpoint
from .history import TieHistory
from .model_card import card_task, model_card
from ..hub import registered_for_auto_class
from ..modeling_dyntie import DynTieMixin
from ..sharding import full_state_dict
from .nonfinite import NonFiniteLossError, stop_message, weights_message
from .optimizer_state import carry_optimizer_state, drop_state, fill_idle_state
from .policies.base import TyingPolicy
from .saving import DiskFullError, said_if_the_disk_fills, saved_beside, write_atomically
from .scoring import HeldOutScorer, score_metrics, scoring_batches, summed_lr
from .start import (
    WEIGHTS_ORIGIN_ATTR,
    build_policy,
    check_eval_data,
    say_how_tying_starts,
    weights_origin,
)
from ..tie_map import tied_fraction
from .training_args import DynTieTrainingArguments

logger = logging.get_logger(__name__)


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
        if args.tie_lora_rank is not None:
            dyn.relax_ties(args.tie_lora_rank)  # before the optimizer exists: the deltas are new parameters
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

    # ---- the Hub -----------------------------------------------------------------------------------

    def saves_remote_code(self) -> bool:
        """Whether saves carry the modeling code (unless ``save_remote_code`` is off): a saved or pushed folder
        then loads where hf_dyntie is not installed (``trust_remote_code=True``), and without it transformers
        names ``trust_remote_code`` instead of calling the architecture unknown."""
        return self.args.save_remote_code

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Stock save, written into a folder beside ``output_dir`` and moved in file by file (``saved_beside``): an
        interrupted or failed save leaves the files that were there whole. With remote code, ``config.json`` gets
        the family's ``auto_map`` and the modeling files are copied. transformers asks the class (``is_remote_code``), so the class is registered for this
        save only and left as it was after it."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        with saved_beside(output_dir) as staging:
            if not self.saves_remote_code():
                super()._save(staging, state_dict)
                return
            with registered_for_auto_class(type(self.dyntie_model), card_task(self.dyntie_model).auto_class):
                super()._save(staging, state_dict)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Stock ``save_model``; under FSDP2 with sharded checkpoints the stock final save writes no model at all,
        so the final model (not the checkpoints, whose sharded state resumes the run) is gathered and saved as
        the compact safetensors a single process writes."""
        if _internal_call:  # a checkpoint's model: _save_checkpoint says what a full disk leaves
            super().save_model(output_dir, _internal_call)
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        last = self._last_checkpoint
        whole = "the files there before are whole" + (f", and {last} holds the model of step "
                                                      f"{last.rsplit('-', 1)[-1]}" if last else "")
        with said_if_the_disk_fills("the model", output_dir, whole, "save again"):
            sharded_checkpoints = self.is_fsdp_enabled and "FULL_STATE_DICT" not in str(
                self.accelerator.state.fsdp_plugin.state_dict_type)
            if not sharded_checkpoints:
                super().save_model(output_dir, _internal_call)
                return
            state_dict = full_state_dict(self.model)  # every rank takes part in the gather
            if self.args.should_save:
                self._save(output_dir, state_dict=state_dict)

    def save_metrics(self, split: str, metrics: dict[str, Any], combined: bool = True) -> None:
        """Stock ``save_metrics`` (``{split}_results.json``, merged into ``all_results.json``), each file written
        beside its target and renamed into place, so an interrupted write never leaves half a file."""
        if not self.is_world_process_zero():
            return
        files = {f"{split}_results.json": metrics}
        if combined:
            path = os.path.join(self.args.output_dir, "all_results.json")
            merged = json.loads(Path(path).read_text()) if os.path.exists(path) else {}
            files["all_results.json"] = {**merged, **metrics}
        for name, values in files.items():
            write_atomically(os.path.join(self.args.output_dir, name), json.dumps(values, indent=4, sort_keys=True))

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """The stock push of a checkpoint (``hub_strategy``) copies its weights and config to ``output_dir``;
        the modeling files its ``auto_map`` names go along, so every pushed revision loads."""
        if self.saves_remote_code() and self.args.should_save:
            for path in Path(checkpoint_folder).glob("*.py"):
                shutil.copy(path, Path(self.args.output_dir) / path.name)
        super()._push_from_checkpoint(checkpoint_folder)

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
        data_description: str | None = None,
    ) -> None:
        """Write the DynTie card (``hf_dyntie/model_card.py``) to ``output_dir/README.md`` instead of the stock
        one, which knows nothing about tying. ``push_to_hub`` calls this right before its one upload.
        ``data_description``: a sentence on the training data; the other arguments are the stock ones (the
        card takes its title from the output folder or ``hub_model_id``, its task from the model's head)."""
        if not self.is_world_process_zero():
            return
        card = model_card(
            self,
            remote_code=self.saves_remote_code(),
            finetuned_from=finetuned_from,
            data_description=data_description,
            dataset=dataset if isinstance(dataset, str) else None,
            extra_tags=[tags] if isinstance(tags, str) else list(tags or []),
            language=language,
            license=license,
        )
        path = Path(self.args.output_dir) / "README.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(card, encoding="utf-8")

    # ---- checkpoints -------------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial) -> None:
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        self._refuse_nonfinite_weights(f"at checkpoint {folder}")
        whole = f"the earlier checkpoints are whole (the last: {self._last_checkpoint})" if self._last_checkpoint \
            else "no checkpoint was saved before it"
        then = "resume with --resume_from_checkpoint last" if self._last_checkpoint else "run again"
        with said_if_the_disk_fills(f"checkpoint {self.state.global_step}", folder, whole, then):
            if self.args.should_save:
                os.makedirs(folder, exist_ok=True)
                self.history.save(folder, self.policy, self.dyntie_model.tie_map, self._loss_after_last_step())
            super()._save_checkpoint(model, trial)
        self._last_checkpoint = folder

    def _loss_after_last_step(self) -> float | None:
        """The loss of the step that just finished (what the next decision's reward will read)."""
        loss = self._step_loss if self._seen_step == self.state.global_step - 1 else self._last_step_loss
        return None if loss is None else float(loss)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Resume: the checkpoint's tie map first (so its compact weights land on the right layers), then
        the weights (stock), then the policy and the decision bookkeeping."""
        budget = None if self.policy.starts_above_budget else self.args.tie_budget
        state = read_tying_state(resume_from_checkpoint, self.dyntie_model, self.policy.name,  # refuse first
                                 budget, self.args.resume_allow_partial)
        check_unfinished(resume_from_checkpoint, self.args.max_steps, self.args.num_train_epochs)
        self._reset_tying_state()
        self._last_checkpoint = resume_from_checkpoint
        self.dyntie_model.retie(state["tie_map"])
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._last_step_loss = self.history.load(resume_from_checkpoint, state, self.policy)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Under FSDP2 the optimizer is saved with torch.distributed.checkpoint, whose strict load asks for state
        of every parameter: idle ones (tied leaves, untied deltas) get zero state for the save only."""
        filled = fill_idle_state(self.optimizer, self.dyntie_model.idle_parameters()) if self.is_fsdp_enabled else []
        try:
            super()._save_optimizer_and_scheduler(output_dir)
        finally:
            drop_state(self.optimizer, filled)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Stock load; under FSDP2 the idle parameters' state the load template gave them is dropped again."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.is_fsdp_enabled:
            drop_state(self.optimizer, self.dyntie_model.idle_parameters())

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
