"""What DynTieTrainer writes and reads: the model, metrics and card (with the modeling code), and its
checkpoints (with the tying state). A mixin of the Trainer's save and load hooks, kept apart from the decision
loop in ``trainer.py``; it reads the trainer's ``history``, ``policy`` and ``dyntie_model``.

Every file goes through ``saving.py`` (staged and renamed in, a full disk said in one line), and a resume
refuses a checkpoint it could not continue exactly before it loads anything (``checkpoints.py``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from ..hub import registered_for_auto_class
from ..sharding import full_state_dict
from .checkpoints import check_unfinished, read_tying_state
from .model_card import card_task, model_card
from .optimizer_state import drop_state, fill_idle_state
from .saving import said_if_the_disk_fills, saved_beside, write_atomically

logger = logging.get_logger(__name__)


class SaveLoadHooks:
    """DynTieTrainer's overrides of the Trainer's save and load hooks (see the module docstring)."""

    # ---- the model, metrics and card -----------------------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Stock save, written into a folder beside ``output_dir`` and moved in file by file (``saved_beside``): an
        interrupted or failed save leaves the files that were there whole. With remote code, ``config.json`` gets
        the family's ``auto_map`` and the modeling files are copied. transformers asks the class (``is_remote_code``), so the class is registered for this
        save only and left as it was after it."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        with saved_beside(output_dir) as staging:
            if not self.args.save_remote_code:
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
        if self.args.save_remote_code and self.args.should_save:
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
            remote_code=self.args.save_remote_code,
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
