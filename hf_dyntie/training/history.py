"""The tying history of a training run: one object for what the trainer remembers about its decisions.

``TieHistory`` holds the decision records (also appended to ``tie_history.jsonl`` as they close), the decision
waiting for its reward, the resume state a checkpoint stores (``dyntie_state.json`` beside the policy's
``dyntie_policy.safetensors``), the plots and the run summary. ``DynTieTrainer`` only calls it from its hooks.
Whether a checkpoint can resume at all is ``checkpoints.py``'s question. See docs/design.md ("The trainer").
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from ..tie_map import maps_per_step, num_unique_layers, relaxed_positions
from .plotting import plot_tie_map, plot_unique_layers
from .policies.base import TyingPolicy

POLICY_TENSORS_NAME = "dyntie_policy.safetensors"
STATE_NAME = "dyntie_state.json"
HISTORY_NAME = "tie_history.jsonl"
TIE_MAP_PLOT_NAME = "tie_map.png"
UNIQUE_LAYERS_PLOT_NAME = "unique_layers.png"
RUNNING_SUFFIX = ".running"  # tie_history.jsonl.running: the history of a run still in progress


class TieHistory:
    """Decision records, the pending decision and the resume state of one run (see the module docstring).

    ``should_save``: whether this process writes files (rank 0); every rank keeps the same records.
    """

    def __init__(self, output_dir: str, should_save: bool):
        self.output_dir = Path(output_dir)
        self.should_save = should_save
        self.reset()

    def reset(self) -> None:
        self.records: list[dict[str, Any]] = []  # one per decision, reward filled in when known
        self.start_record: dict[str, Any] | None = None  # a dynamic run's start map (step 0), before any decision
        self.pending: dict[str, Any] | None = None  # the last decision, waiting for its reward
        self.last_decided_step = -1
        self.eval_batches_used = 0  # eval_batch rewards: where to continue the eval set after a resume
        self.last_logs: dict[str, float] = {}  # the last decision's tie/* logs, repeated in every log

    @property
    def path(self) -> Path:
        """Where the running history is written: beside ``tie_history.jsonl``, which it replaces only when the
        run finishes (:meth:`publish`), so a run that fails leaves an earlier run's history as it was."""
        return self.output_dir / (HISTORY_NAME + RUNNING_SUFFIX)

    def publish(self) -> None:
        """Move the finished history into place (an atomic rename, rank 0)."""
        if self.should_save and self.path.exists():
            os.replace(self.path, self.output_dir / HISTORY_NAME)

    # ---- decisions --------------------------------------------------------------------------------

    def start(self, tie_map: list[int], dynamic: bool) -> None:
        """A fresh run: a running history whose first line is the map training starts from, at step 0 (no layer,
        no action), so the plots and the step-weighted means see the start map, not the first decision's, from
        step 0. A static policy's history is that record alone; a dynamic policy's keeps it as ``start_record``, apart
        from its decisions (``records``)."""
        self.reset()
        if self.should_save:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")
        first = {"step": 0, "layer": None, "action": None, "tie_map": tie_map}
        if dynamic:
            self.start_record = {**first, "unique_layers": num_unique_layers(tie_map), "loss": None, "reward": None}
            self._append(self.start_record)
        else:
            self.record(first)

    def timeline(self) -> list[dict[str, Any]]:
        """Every record in step order, the start map first: what the plots and the means read."""
        return ([self.start_record] if self.start_record is not None else []) + self.records

    def _append(self, record: dict[str, Any]) -> None:
        if self.should_save:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def record(self, record: dict[str, Any]) -> None:
        """Close a decision: keep it and append it to ``tie_history.jsonl``."""
        record = {**record, "unique_layers": num_unique_layers(record["tie_map"])}
        record.setdefault("loss", None)
        record.setdefault("reward", None)
        self.records.append(record)
        self._append(record)

    def decided(self, step: int, pending: dict[str, Any] | None) -> None:
        """A decision at ``step``: ``pending`` (``None`` when the policy kept the map) waits for its reward."""
        self.last_decided_step = step
        self.pending = pending

    def close_pending(self, loss: float | None = None, reward: float | None = None) -> None:
        """Record the pending decision with the loss its map reached and the reward the policy drew from it."""
        if self.pending is None:
            return
        if loss is not None:
            self.pending.update(loss=loss if math.isfinite(loss) else None, reward=reward)
        self.record(self.pending)
        self.pending = None

    # ---- the end of a run -------------------------------------------------------------------------

    def plot(self, global_step: int, summary: dict[str, Any]) -> None:
        """The tie map and unique layers over training, to ``output_dir`` (rank 0)."""
        if not (self.should_save and self.timeline()):
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        plot_tie_map(self.timeline(), global_step, self.output_dir / TIE_MAP_PLOT_NAME)
        plot_unique_layers(
            self.timeline(), global_step, self.output_dir / UNIQUE_LAYERS_PLOT_NAME,
            summary["parameters_per_layer"], summary["parameters_outside_layers"],
        )

    def summary(self, model_summary: dict[str, Any], global_step: int) -> dict[str, Any]:
        """Final and step-weighted mean unique layers and trainable parameters (``model_summary``: the model's
        ``tie_summary()``)."""
        records = self.timeline() or [{"step": 0, "tie_map": model_summary["tie_map"]}]
        maps = maps_per_step(records, max(global_step, 1))
        mean_unique = sum(num_unique_layers(m) for m in maps) / len(maps)
        per_layer, outside = model_summary["parameters_per_layer"], model_summary["parameters_outside_layers"]
        roots = model_summary.get("tie_lora_roots", False)  # relaxed deltas on: tied positions (and relaxed roots)
        mean_relaxed = sum(len(relaxed_positions(m, roots)) for m in maps) / len(maps)
        deltas = mean_relaxed * model_summary.get("delta_parameters_per_layer", 0)
        return {
            "num_layers": model_summary["num_layers"],
            "final_tie_map": model_summary["tie_map"],
            "final_unique_layers": model_summary["unique_layers"],
            "mean_unique_layers": mean_unique,
            "final_trainable_parameters": model_summary["trainable_parameters"],
            "mean_trainable_parameters": mean_unique * per_layer + outside + deltas,
            "total_parameters": model_summary["total_parameters"],
            "stored_parameters": model_summary["stored_parameters"],
        }

    # ---- checkpoints ------------------------------------------------------------------------------

    def save(self, folder: str, policy: TyingPolicy, tie_map: list[int], last_step_loss: float | None) -> None:
        """The resume state: the policy's tensors (safetensors) and everything else as JSON."""
        tensors, values = policy.state_dict()
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, os.path.join(folder, POLICY_TENSORS_NAME))
        state = {
            "policy": policy.name,
            "num_layers": len(tie_map),
            "tie_map": tie_map,
            "policy_values": values,
            "records": self.records,
            "start": self.start_record,
            "pending": self.pending,
            "last_decided_step": self.last_decided_step,
            "last_step_loss": last_step_loss,
            "eval_batches_used": self.eval_batches_used,
            "last_logs": self.last_logs,
        }
        with open(os.path.join(folder, STATE_NAME), "w") as f:
            json.dump(state, f)

    def load(self, folder: str, state: dict[str, Any], policy: TyingPolicy) -> float | None:
        """Continue from a checkpoint's state (read by :func:`~hf_dyntie.training.checkpoints.read_tying_state`): the policy, the records (the
        history file restarts from them) and the bookkeeping. Returns the loss of the last step before it."""
        tensors_path = os.path.join(folder, POLICY_TENSORS_NAME)
        tensors = load_file(tensors_path) if os.path.exists(tensors_path) else {}
        policy.load_state_dict(tensors, state["policy_values"])
        self.records = state["records"]
        self.start_record = state.get("start")  # checkpoints written before 2026-12-07 lack it
        self.pending = state["pending"]
        self.last_decided_step = state["last_decided_step"]
        self.eval_batches_used = state["eval_batches_used"]
        self.last_logs = state["last_logs"]
        if self.should_save:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.timeline()))
        return state["last_step_loss"]
