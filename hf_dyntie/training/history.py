"""The tying history of a training run: one object for what the trainer remembers about its decisions.

``TieHistory`` holds the decision records (also appended to ``tie_history.jsonl`` as they close), the decision
waiting for its reward, the resume state a checkpoint stores (``dyntie_state.json`` beside the policy's
``dyntie_policy.safetensors``), the plots and the run summary. ``DynTieTrainer`` only calls it from its hooks.
This module also reads checkpoints before a run resumes (:func:`read_tying_state`), so that a script can refuse
a bad one before any data work. See docs/design.md ("The trainer").
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers.trainer_utils import get_last_checkpoint

from transformers.utils import logging

from ..modeling_dyntie import DynTieMixin
from .plotting import plot_tie_map, plot_unique_layers
from .policies.base import TyingPolicy, canonical_policy_name
from ..tie_map import format_tie_map, maps_per_step, normalize_tie_map, num_unique_layers

POLICY_TENSORS_NAME = "dyntie_policy.safetensors"
STATE_NAME = "dyntie_state.json"
HISTORY_NAME = "tie_history.jsonl"
TIE_MAP_PLOT_NAME = "tie_map.png"
UNIQUE_LAYERS_PLOT_NAME = "unique_layers.png"
RESUME_LATEST = ("true", "last", "latest")
RUNNING_SUFFIX = ".running"
logger = logging.get_logger(__name__)  # tie_history.jsonl.running: the history of a run still in progress


class CheckpointError(ValueError):
    """A checkpoint this run cannot resume from (one line naming the folder and what is wrong)."""


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
        mean_tied = model_summary["num_layers"] - mean_unique
        deltas = mean_tied * model_summary.get("delta_parameters_per_layer", 0)  # relaxed ties' own deltas
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
        """Continue from a checkpoint's state (read by :func:`read_tying_state`): the policy, the records (the
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


CHECKPOINT_FILES = {  # what a DynTieTrainer checkpoint must hold to resume exactly; alternatives in a tuple
    "weights": ("model.safetensors", "model.safetensors.index.json", "pytorch_model_fsdp_0"),
    "trainer state": ("trainer_state.json",),
    "tying state": (STATE_NAME,),
    "optimizer state": ("optimizer.pt", "optimizer_0"),
    "learning-rate schedule": ("scheduler.pt",),
}
PARTIAL_OK = ("optimizer state", "learning-rate schedule")  # what --resume_allow_partial lets restart


def missing_parts(folder: str) -> list[str]:
    """The parts of a checkpoint that are absent or empty (what a save interrupted half way leaves)."""
    def present(name: str) -> bool:
        path = os.path.join(folder, name)
        return os.path.isdir(path) or (os.path.isfile(path) and os.path.getsize(path) > 0)

    return [part for part, names in CHECKPOINT_FILES.items() if not any(present(n) for n in names)]


def latest_complete_checkpoint(output_dir: str) -> tuple[str | None, list[str]]:
    """The newest ``checkpoint-*`` of ``output_dir`` with every part, and the newer ones skipped as incomplete."""
    last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    if last is None:
        return None, []
    names = [n for n in os.listdir(output_dir) if n.startswith("checkpoint-") and n.split("-")[-1].isdigit()]
    skipped = []
    for name in sorted(names, key=lambda n: int(n.split("-")[-1]), reverse=True):
        folder = os.path.join(output_dir, name)
        if not os.path.isdir(folder):
            continue
        if not missing_parts(folder):
            return folder, skipped
        skipped.append(folder)
    return None, skipped


def check_complete(folder: str, allow_partial: bool) -> list[str]:
    """Raise a :class:`CheckpointError` when ``folder`` lacks a part a resume needs; with ``allow_partial`` the
    optimizer state and the schedule may be missing (returned, so the caller can say what restarts)."""
    missing = missing_parts(folder)
    hard = [m for m in missing if not (allow_partial and m in PARTIAL_OK)]
    if hard:
        restart = all(m in PARTIAL_OK for m in hard)
        hint = ("; pass --resume_allow_partial to resume anyway with them restarted" if restart
                else "; it was not saved completely (an interrupted save?): resume from an earlier checkpoint")
        raise CheckpointError(f"checkpoint {folder} lacks its {', '.join(hard)}{hint}")
    return missing


def check_unfinished(folder: str, max_steps: int, num_train_epochs: float) -> None:
    """Raise a :class:`CheckpointError` when the checkpoint already reached the end of this run: the stock
    Trainer would train one step past it and overwrite the final model. The end is ``max_steps`` when set, else
    the step count the checkpoint's own run computed, when this run asks for the same number of epochs."""
    path = os.path.join(folder, "trainer_state.json")
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} cannot be read ({err}); the checkpoint is damaged") from None
    step = int(state.get("global_step", 0))
    end = max_steps if max_steps > 0 else None
    if end is None and state.get("num_train_epochs") == num_train_epochs:
        end = state.get("max_steps")
    if end is not None and step >= end:
        flag = "--max_steps" if max_steps > 0 else "--num_train_epochs"
        raise CheckpointError(
            f"checkpoint {folder} is at step {step}, the end of this run ({end} steps): there is nothing left to "
            f"train (the stock Trainer would train one step more and overwrite the final model); raise {flag} to go on"
        )


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
        latest, skipped = latest_complete_checkpoint(output_dir)
        if latest is None:
            what = f"only incomplete ones ({', '.join(map(os.path.basename, skipped))})" if skipped else "no checkpoint-* folder"
            raise CheckpointError(f"resume_from_checkpoint={value!r}: {output_dir} holds {what} to resume from")
        if skipped:
            logger.warning(f"resuming from {latest}: the newer {', '.join(skipped)} is incomplete (an interrupted save)")
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


def read_tying_state(
    folder: str, model: DynTieMixin, policy_name: str, budget: int | None = None, allow_partial: bool = False
) -> dict[str, Any]:
    """The tying state of a checkpoint this model, policy and budget can resume from exactly, or a
    :class:`CheckpointError` that says why not (``allow_partial``: a missing optimizer state or schedule may
    restart, with a warning). Reads JSON and the weights' headers only, so a script can check it before any data
    work."""
    for part in check_complete(folder, allow_partial):
        logger.warning(f"--resume_allow_partial: checkpoint {folder} lacks its {part}; it restarts from scratch")
    path = os.path.join(folder, STATE_NAME)
    if not os.path.exists(path):
        raise CheckpointError(f"{folder} has no {STATE_NAME}: it was not written by DynTieTrainer and cannot resume tying")
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} cannot be read ({err}); the checkpoint is damaged") from None
    num_layers = len(model.dyntie_layers)
    if canonical_policy_name(str(state.get("policy")), warn=False) != policy_name:
        raise CheckpointError(
            f"checkpoint {folder} was written by tie_policy={state.get('policy')!r}, this run uses {policy_name!r}"
        )
    if state.get("num_layers") != num_layers:
        raise CheckpointError(f"checkpoint {folder} has {state.get('num_layers')} layers, this model has {num_layers}")
    try:
        tie_map = normalize_tie_map(state["tie_map"], num_layers)
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"checkpoint {folder}: its {STATE_NAME} holds no valid tie map ({err})") from None
    if budget is not None and num_unique_layers(tie_map) > budget:
        raise CheckpointError(
            f"checkpoint {folder} has {num_unique_layers(tie_map)} unique layers ({format_tie_map(tie_map)}), more than "
            f"this run's tie_budget {budget}: resume with the budget it was written with (or a larger one)"
        )
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
