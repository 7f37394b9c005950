"""Stage 1 of a script: its arguments (three dataclasses, like transformers' run_clm.py), logging, the machine,
and every check that needs no model, data or network, so that bad input fails in a second, not mid-run."""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
import transformers
from transformers import HfArgumentParser, PretrainedConfig, PreTrainedModel

from .. import families
from ..training.training_args import DynTieTrainingArguments
from . import UsageError, first_line

logger = transformers.utils.logging.get_logger(__name__)


# ---- the task: which model classes a script trains --------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """What differs between the two scripts, as data: the model class per architecture family."""

    script: str
    model_classes: dict[str, type[PreTrainedModel]]  # family ("gpt2", "llama", ...) -> DynTie class with the head


def _heads(auto_class: str) -> dict[str, type[PreTrainedModel]]:
    """Family name -> its DynTie class for ``auto_class``, for every family of the table that has one."""
    return {f.name: f.dyntie_class(f.head(auto_class)) for f in families.FAMILIES if f.head(auto_class)}


# every family with a causal LM head; BERT as a causal LM (is_decoder=True) is how the paper trained BERT
CAUSAL_LM = Task(script="run_clm_dyntie.py", model_classes=_heads(families.CAUSAL_LM))
MASKED_LM = Task(script="run_mlm_dyntie.py", model_classes=_heads(families.MASKED_LM))

# --model_type values and config model types -> architecture family. The stock names mean the DynTie version.
MODEL_FAMILIES = {name: f.name for f in families.FAMILIES for name in (f.model_type, f.name)}
DYNTIE_CONFIGS: dict[str, type[PretrainedConfig]] = {f.name: f.config_class() for f in families.FAMILIES}


def model_types(task: Task) -> list[str]:
    return [name for name, family in MODEL_FAMILIES.items() if family in task.model_classes]


# ---- arguments -------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    """Which model, config and tokenizer to start from, or which architecture to build from scratch."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A checkpoint to start from: a DynTie checkpoint (continues with its tie map) or a stock GPT-2 / "
            "BERT / Llama / Qwen2 / Mistral one (brought in untied, same weights and outputs, then the policy ties "
            "it). Leave unset to train from scratch with --model_type."
        },
    )
    model_type: str | None = field(
        default=None,
        metadata={
            "help": "Architecture to train from scratch: "
            + ", ".join(families.model_types())
            + " (the stock names, gpt2, llama, ..., mean the same). run_clm_dyntie.py takes every one (bert as a "
            "causal LM), run_mlm_dyntie.py the encoders: "
            + ", ".join(families.model_types(families.MASKED_LM))
            + "."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "From scratch only: override config fields, e.g. "
            + "; ".join(f"{f.small} ({f.name})" for f in families.FAMILIES if f.name in ("gpt2", "bert", "llama"))
            + "."
        },
    )
    config_name: str | None = field(
        default=None,
        metadata={"help": "A config (name or path) to build a fresh model from, if not model_name_or_path's."},
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "A tokenizer (name or path), if not model_name_or_path's. Needed from scratch."},
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where to store models, tokenizers and datasets downloaded from the Hub."}
    )
    use_fast_tokenizer: bool = field(
        default=True, metadata={"help": "Use a fast tokenizer (backed by the tokenizers library) when there is one."}
    )
    model_revision: str = field(
        default="main", metadata={"help": "Model version on the Hub: a branch name, tag name or commit id."}
    )
    token: str | None = field(
        default=None,
        metadata={"help": "Hub token for private models and datasets; unset: the one `hf auth login` stored."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Allow code from the Hub (configs, tokenizers) to run on this machine. Only for repositories "
            "whose code you have read and trust."
        },
    )
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "Load the model in this dtype ('auto': the checkpoint's own dtype).",
            "choices": ["auto", "bfloat16", "float16", "float32"],
        },
    )

    def hub_kwargs(self) -> dict[str, Any]:
        """The ``from_pretrained`` options every Hub download (config, tokenizer, model) takes."""
        return {
            "cache_dir": self.cache_dir,
            "revision": self.model_revision,
            "token": self.token,
            "trust_remote_code": self.trust_remote_code,
        }


@dataclass
class DataTrainingArguments:
    """Which text to train and evaluate on, and how much of it. Shared by both scripts."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "A dataset on the Hub (datasets library), e.g. wikitext."}
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "The dataset's configuration, e.g. wikitext-2-raw-v1."}
    )
    train_file: str | None = field(default=None, metadata={"help": "Training data: a .txt, .csv or .json(l) file."})
    validation_file: str | None = field(
        default=None, metadata={"help": "Evaluation data (perplexity, accuracy): a .txt, .csv or .json(l) file."}
    )
    validation_split_percentage: int = field(
        default=5,
        metadata={"help": "Without a validation split or file: the percentage of the training data held out for it."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only this many training examples (blocks), for debugging or quick runs."}
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={"help": "Keep only this many evaluation examples (blocks), for debugging or quick runs."},
    )
    streaming: bool = field(
        default=False, metadata={"help": "Stream the dataset instead of downloading it whole (needs --max_steps)."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenization and grouping."}
    )
    overwrite_cache: bool = field(
        default=False, metadata={"help": "Redo tokenization and grouping instead of reading the datasets cache."}
    )
    keep_linebreaks: bool = field(
        default=True, metadata={"help": "Keep the line breaks of .txt files (they are tokens of the text)."}
    )


@dataclass
class CausalLMDataArguments(DataTrainingArguments):
    """run_clm_dyntie.py: the text is cut into blocks of ``block_size`` tokens."""

    block_size: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per training block: the text is concatenated and cut into blocks of this length. "
            "Default: the model's positions (at most 1024). Must not exceed them."
        },
    )


@dataclass
class MaskedLMDataArguments(DataTrainingArguments):
    """run_mlm_dyntie.py: sequences of ``max_seq_length`` tokens, a share of them masked."""

    max_seq_length: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per sequence (special tokens included). Default: the model's positions (at most 1024). "
            "Must not exceed them."
        },
    )
    mlm_probability: float = field(
        default=0.15, metadata={"help": "Share of tokens masked for the masked language modeling loss."}
    )
    line_by_line: bool = field(
        default=False,
        metadata={"help": "One sequence per non-empty line (truncated), instead of concatenated text cut in blocks."},
    )
    pad_to_max_length: bool = field(
        default=False,
        metadata={"help": "With --line_by_line: pad every line to max_seq_length, not to the batch's longest line."},
    )


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag's help, and the script's docstring (its examples) kept as written."""


def parse_arguments(
    data_class: type[DataTrainingArguments], argv: Sequence[str], description: str | None = None
) -> tuple[ModelArguments, DataTrainingArguments, DynTieTrainingArguments]:
    """The three dataclasses from the command line, or from a JSON file given as the only argument.

    A value that the dataclasses refuse (their ``__post_init__`` raises ``ValueError``) is bad input,
    reported like every other: as a :class:`UsageError`.
    """
    parser = HfArgumentParser(
        (ModelArguments, data_class, DynTieTrainingArguments), description=description, formatter_class=_HelpFormatter
    )
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            if not os.path.isfile(argv[0]):
                raise UsageError(f"arguments file {argv[0]!r} does not exist")
            return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
        return parser.parse_args_into_dataclasses(args=list(argv))
    except ValueError as err:
        raise UsageError(first_line(err)) from err


def setup_logging(training_args: DynTieTrainingArguments) -> None:
    """Log like transformers' scripts: to stdout, at the level the training arguments ask for."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def cpu_threads(cores: int, load: float, processes: int, default: int) -> int:
    """Math threads per process: the idle cores (``cores`` minus the 1-minute ``load``, at least one) shared
    among this machine's ``processes``, never more than torch's ``default``."""
    idle = max(1, round(cores - load))
    return max(1, min(default, idle // max(1, processes)))


def fit_to_machine(training_args: DynTieTrainingArguments) -> None:
    """CPU runs: no pinned memory (it only speeds up copies to a GPU, and torch warns about it on every
    DataLoader), and, unless ``OMP_NUM_THREADS`` is set, as many math threads as there are idle cores.

    On a CPU that other processes keep busy, torch's default (one thread per core) makes its threads wait
    for each other: one thread per idle core is several times faster there, and the same on an idle machine.
    The choice is printed in one line.

    Several processes: transformers' ``average_tokens_across_devices`` (on by default) scales each rank's loss
    by the world size, which is right for the gradients of a training step but doubled the masked-LM
    *evaluation* loss at world size 2 (12.18 against one process's 6.10); the scripts turn it off, so every
    process count reports the same loss."""
    if training_args.world_size > 1 and training_args.average_tokens_across_devices:
        training_args.average_tokens_across_devices = False
    if training_args.device.type != "cpu":
        return
    training_args.dataloader_pin_memory = False
    if os.environ.get("OMP_NUM_THREADS"):
        return
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]  # processes wanting a core, averaged over the last minute
    except (AttributeError, OSError):  # not on every platform
        load = 0.0
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    threads = cpu_threads(cores, load, processes, torch.get_num_threads())
    torch.set_num_threads(threads)
    if training_args.should_log:
        share = f", {processes} processes" if processes > 1 else ""
        print(f"CPU threads: {threads} per process ({cores} cores, load {load:.1f}{share}); set OMP_NUM_THREADS to choose")


DATA_EXTENSIONS = {"txt": "text", "csv": "csv", "json": "json", "jsonl": "json"}


def _check_data_file(path: str, flag: str) -> str:
    """The ``load_dataset`` builder for ``path``, or a UsageError saying what is wrong with it."""
    if not os.path.exists(path):
        raise UsageError(f"{flag} {path!r} does not exist")
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path!r} is not a file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{flag} {path!r} is not readable (permission denied)")
    extension = path.rsplit(".", 1)[-1].lower()
    if extension not in DATA_EXTENSIONS:
        raise UsageError(f"{flag} {path!r}: expected a .txt, .csv, .json or .jsonl file")
    if os.path.getsize(path) == 0:
        raise UsageError(f"{flag} {path!r} is empty")
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if b"\x00" in head:
        raise UsageError(f"{flag} {path!r} is not a text file (it holds NUL bytes)")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 4:  # not just a character cut at the end of the sample
            raise UsageError(f"{flag} {path!r} is not UTF-8 text (byte {err.start}: {err.reason})") from None
    return DATA_EXTENSIONS[extension]


def _looks_like_path(name: str) -> bool:
    """A local path rather than a Hub id ("org/name" never starts with "/", "." or "~")."""
    return name.startswith(("/", ".", "~"))


def check_arguments(
    model_args: ModelArguments,
    data_args: DataTrainingArguments,
    training_args: DynTieTrainingArguments,
    task: Task,
) -> None:
    """Every check that needs no model, data or network, so that bad input fails in a second, not mid-run."""
    for flag, value in (
        ("--model_name_or_path", model_args.model_name_or_path),
        ("--config_name", model_args.config_name),
        ("--tokenizer_name", model_args.tokenizer_name),
    ):
        if value and _looks_like_path(value) and not os.path.exists(os.path.expanduser(value)):
            raise UsageError(f"{flag} {value!r} does not exist")
    if not (training_args.do_train or training_args.do_eval):
        raise UsageError("nothing to do: pass --do_train and/or --do_eval")
    if data_args.dataset_name is None and data_args.train_file is None and data_args.validation_file is None:
        raise UsageError("no data: pass --dataset_name, or --train_file and/or --validation_file")
    if data_args.dataset_name is None:
        builders = set()
        if data_args.train_file is not None:
            builders.add(_check_data_file(data_args.train_file, "--train_file"))
        elif training_args.do_train:
            raise UsageError("--do_train needs --train_file (or --dataset_name)")
        if data_args.validation_file is not None:
            builders.add(_check_data_file(data_args.validation_file, "--validation_file"))
        if len(builders) > 1:
            raise UsageError("--train_file and --validation_file must have the same format (.txt, .csv or .json)")
    if not 0 < data_args.validation_split_percentage < 100:
        percentage = data_args.validation_split_percentage
        raise UsageError(f"--validation_split_percentage must lie in 1..99, got {percentage}")
    if data_args.streaming and training_args.do_train and training_args.max_steps <= 0:
        raise UsageError("--streaming needs --max_steps: a streamed dataset has no length to count epochs with")
    if model_args.config_overrides is not None and (model_args.config_name or model_args.model_name_or_path):
        raise UsageError("--config_overrides is for training from scratch: drop --config_name/--model_name_or_path")
    if not (model_args.model_name_or_path or model_args.config_name):
        if model_args.model_type is None:
            types = ", ".join(model_types(task))
            raise UsageError(f"no model: pass --model_name_or_path, or --model_type ({types}) to train from scratch")
        if MODEL_FAMILIES.get(model_args.model_type) not in task.model_classes:
            raise UsageError(
                f"unknown --model_type {model_args.model_type!r}; {task.script} trains {', '.join(model_types(task))}"
            )
    if not (model_args.tokenizer_name or model_args.model_name_or_path):
        raise UsageError("no tokenizer: pass --tokenizer_name (a folder or Hub id), or --model_name_or_path")
    if isinstance(data_args, MaskedLMDataArguments) and not 0.0 < data_args.mlm_probability < 1.0:
        raise UsageError(f"--mlm_probability must lie in (0, 1), got {data_args.mlm_probability}")
    if training_args.tie_replay_file and not os.path.isfile(training_args.tie_replay_file):
        raise UsageError(f"--tie_replay_file {training_args.tie_replay_file!r} does not exist")
    check_output_dir(training_args)
    check_hub(training_args)
    warn_if_one_process_was_started(task)


def processes_asked_of_accelerate() -> int | None:
    """How many processes ``accelerate launch`` was asked for when it started this one with its one-process
    launcher (``--cpu`` makes it ignore ``--num_processes``): read from the launcher's command line, since it
    passes the number on to no variable. None when that launcher did not start us (or ``/proc`` is absent)."""
    if "WORLD_SIZE" in os.environ or "ACCELERATE_USE_CPU" not in os.environ:
        return None
    try:
        argv = open(f"/proc/{os.getppid()}/cmdline", "rb").read().decode(errors="replace").split("\0")
    except OSError:
        return None
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--num_processes=") else None
        if arg == "--num_processes" and i + 1 < len(argv):
            value = argv[i + 1]
        if value is not None and value.isdigit():
            return int(value)
    return None


def warn_if_one_process_was_started(task: Task) -> None:
    """``accelerate launch --num_processes 2 --cpu`` trains in one process without a word; say so, and how to
    start two."""
    asked = processes_asked_of_accelerate()
    if asked is not None and asked > 1:
        logger.warning(
            f"accelerate launch --cpu started one process, not the {asked} asked for (--num_processes); this run "
            f"trains in one. For {asked} CPU processes: accelerate launch --multi_gpu --num_processes {asked} "
            f"{task.script} ... --use_cpu (or torchrun --nproc_per_node {asked} {task.script} ... --use_cpu)"
        )


def check_hub(training_args: DynTieTrainingArguments) -> None:
    """``--push_to_hub``: the Hub must answer and know who we are before any data work, not after training."""
    if not training_args.push_to_hub:
        return
    from huggingface_hub import HfApi

    try:
        HfApi().whoami(token=training_args.hub_token)
    except Exception as err:  # offline, no token, a bad token, no network: whatever it is, say it in one line
        raise UsageError(
            f"--push_to_hub: the Hub cannot be reached with this token ({first_line(err)}); log in with "
            "`hf auth login` or pass --hub_token, or drop --push_to_hub"
        ) from None


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
