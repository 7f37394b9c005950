"""The output folder of a script: refused before any work when it is unwritable or holds another run, and
cleared (``--overwrite_output_dir``) only after every check has passed."""

from __future__ import annotations

import os
import re
import shutil

import transformers

from ..training.training_args import DynTieTrainingArguments
from . import UsageError

logger = transformers.utils.logging.get_logger(__name__)


_CHECKPOINT_DIR = re.compile(r"^checkpoint-\d+$")


def _checkpoints_in(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    names = [n for n in os.listdir(folder) if _CHECKPOINT_DIR.match(n) and os.path.isdir(os.path.join(folder, n))]
    return sorted(names, key=lambda n: int(n.split("-")[1]))


FINISHED_RUN_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "all_results.json",
                      "tie_history.jsonl")


def check_output_dir(training_args: DynTieTrainingArguments) -> None:
    """Refuse an ``--output_dir`` this run could not write, or whose earlier run it would mix with or silently
    replace: one holding ``checkpoint-*`` folders (a later "resume from the latest" would continue the wrong
    run) or a finished run's model and results, unless ``--resume_from_checkpoint`` continues it or
    ``--overwrite_output_dir`` says to replace it. Deletes nothing: :func:`clear_output_dir` does, once every
    check has passed."""
    out = training_args.output_dir
    if not training_args.do_train or out is None:
        return
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--output_dir {out!r} is a file, not a folder")
    _check_writable(out)
    if _resume_requested(training_args.resume_from_checkpoint) or training_args.overwrite_output_dir:
        return  # resuming: the folder's files are this run's; overwriting: replaced once the new run saves
    checkpoints = _checkpoints_in(out)
    if checkpoints:
        shown = ", ".join(checkpoints[:3]) + (f" and {len(checkpoints) - 3} more" if len(checkpoints) > 3 else "")
        raise UsageError(
            f"--output_dir {out!r} holds checkpoints of an earlier run ({shown}): pass --resume_from_checkpoint last "
            "to continue it, --overwrite_output_dir to delete them and start over, or another --output_dir"
        )
    finished = [n for n in FINISHED_RUN_FILES if os.path.isfile(os.path.join(out, n))]
    if finished:
        raise UsageError(
            f"--output_dir {out!r} holds a finished run ({', '.join(finished)}): pass --overwrite_output_dir to replace "
            "it (its files are replaced only when this run saves), or another --output_dir"
        )


def _check_writable(out: str) -> None:
    """The output folder, or the nearest folder above it that exists, must be writable by us."""
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is" if existing == os.path.abspath(out) else f"would be created in {existing!r}, which is"
        raise UsageError(f"--output_dir {out!r} {what} not writable (read-only or permission denied)")


def clear_output_dir(training_args: DynTieTrainingArguments) -> None:
    """``--overwrite_output_dir``: delete an earlier run's ``checkpoint-*`` folders. Called by the scripts after
    every check (arguments, model, tying, the checkpoint to resume) has passed, right before the data work, so
    a run refused for a bad flag deletes nothing. The earlier run's model and results stay until this run
    saves its own in their place."""
    out = training_args.output_dir
    if not (training_args.do_train and training_args.overwrite_output_dir and out):
        return
    if _resume_requested(training_args.resume_from_checkpoint):
        return
    with training_args.main_process_first(desc="clearing the output folder"):
        if training_args.local_process_index == 0:
            checkpoints = _checkpoints_in(out)
            for name in checkpoints:
                shutil.rmtree(os.path.join(out, name))
            if checkpoints:
                logger.warning(f"--overwrite_output_dir: deleted {len(checkpoints)} checkpoint folder(s) from {out}")


def _resume_requested(value: str | bool | None) -> bool:
    return value is not None and value is not False and str(value).strip().lower() not in ("", "false", "none")
