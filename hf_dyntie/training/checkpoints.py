"""Which checkpoint a run resumes from, and whether it can: complete, not already finished, written by this
policy for this model, holding every root its tie map trains.

Everything here reads JSON and the safetensors headers only (through :mod:`hf_dyntie.checkpoint_files`, the
reader ``python -m hf_dyntie inspect`` uses too), so a script refuses a bad checkpoint in one line before any
data work, and a resume never starts from randomly initialised roots. What a checkpoint's tying state holds
is written and read back by :class:`~hf_dyntie.training.history.TieHistory`. See docs/design.md ("The trainer").
"""

from __future__ import annotations

import json
import os
from typing import Any

from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from ..checkpoint_files import first_line, weight_keys
from ..modeling_dyntie import DynTieMixin
from ..tie_map import format_tie_map, normalize_tie_map, num_unique_layers
from .history import STATE_NAME
from .policies.base import canonical_policy_name

RESUME_LATEST = ("true", "last", "latest")  # how a command line spells "the latest checkpoint"
CHECKPOINT_FILES = {  # what a DynTieTrainer checkpoint must hold to resume exactly; alternatives in a tuple
    "weights": ("model.safetensors", "model.safetensors.index.json", "pytorch_model_fsdp_0"),
    "trainer state": ("trainer_state.json",),
    "tying state": (STATE_NAME,),
    "optimizer state": ("optimizer.pt", "optimizer_0"),
    "learning-rate schedule": ("scheduler.pt",),
}
PARTIAL_OK = ("optimizer state", "learning-rate schedule")  # what --resume_allow_partial lets restart
logger = logging.get_logger(__name__)


class CheckpointError(ValueError):
    """A checkpoint this run cannot resume from (one line naming the folder and what is wrong)."""


# ---- which checkpoint ----------------------------------------------------------------------------------------


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


# ---- whether it can resume -----------------------------------------------------------------------------------


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
    state = _read_json(os.path.join(folder, "trainer_state.json"))
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


def _read_json(path: str) -> dict[str, Any]:
    """A checkpoint's JSON file, or a :class:`CheckpointError` saying the checkpoint is damaged."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} cannot be read ({err}); the checkpoint is damaged") from None


def checkpoint_weight_keys(folder: str) -> set[str] | None:
    """Tensor names of a checkpoint's safetensors weights, from the file headers only; ``None`` when the
    folder holds no safetensors weights (another format: left to the stock loader)."""
    try:
        return weight_keys(folder)
    except Exception as err:  # OSError, a bad index, a truncated or corrupt file
        raise CheckpointError(f"checkpoint {folder}: cannot read its weights ({first_line(err)})") from None


def read_tying_state(
    folder: str, model: DynTieMixin, policy_name: str, budget: int | None = None, allow_partial: bool = False,
    relaxed: tuple[int, bool, bool] | None = None,
) -> dict[str, Any]:
    """The tying state of a checkpoint this model, policy and budget can resume from exactly, or a
    :class:`CheckpointError` that says why not (``allow_partial``: a missing optimizer state or schedule may
    restart, with a warning). ``relaxed``: the run's ``(tie_lora_rank, tie_lora_vectors, tie_lora_roots)``
    (default: the model's); the checkpoint must have been written with the same, since deltas of every position
    are stored either way and a different setting would load them and silently switch some on or off. Reads
    JSON and the weights' headers only, so a script can check it before any data work."""
    for part in check_complete(folder, allow_partial):
        logger.warning(f"--resume_allow_partial: checkpoint {folder} lacks its {part}; it restarts from scratch")
    path = os.path.join(folder, STATE_NAME)
    if not os.path.exists(path):
        raise CheckpointError(f"{folder} has no {STATE_NAME}: it was not written by DynTieTrainer and cannot resume tying")
    state = _read_json(path)
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
    _check_roots_stored(folder, model, tie_map)
    _check_relaxed_settings(folder, model, relaxed)
    return state


def _check_relaxed_settings(folder: str, model: DynTieMixin, relaxed: tuple[int, bool, bool] | None) -> None:
    """A :class:`CheckpointError` when the checkpoint's config was written with other relaxed-tie settings than
    the run's (a checkpoint without a config.json is not checked)."""
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        return
    config = _read_json(path)
    saved = (config.get("tie_lora_rank", 0), config.get("tie_lora_vectors", False), config.get("tie_lora_roots", False))
    run = relaxed or (model.config.tie_lora_rank, model.config.tie_lora_vectors, model.config.tie_lora_roots)
    if tuple(saved) != tuple(run):
        names = "(tie_lora_rank, tie_lora_vectors, tie_lora_roots)"
        raise CheckpointError(f"checkpoint {folder} was written with relaxed ties {names} = {tuple(saved)}, this run "
                              f"uses {tuple(run)}: resume with the settings it was written with")


def _check_roots_stored(folder: str, model: DynTieMixin, tie_map: list[int]) -> None:
    """A :class:`CheckpointError` when the weights lack a parameter of a layer ``tie_map`` trains on its own:
    it would start randomly initialised. Weights in another format than safetensors are not checked."""
    keys = checkpoint_weight_keys(folder)
    if keys is None:
        return
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
