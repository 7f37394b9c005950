"""Stage 1 of a script: its arguments (three dataclasses, like transformers' run_clm.py) and every check that
needs no model, data or network, so that bad input fails in a second, not mid-run (the output folder's checks
in ``output_dir.py``, the machine's in ``machine.py``)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import transformers
from transformers import HfArgumentParser, PretrainedConfig, PreTrainedModel

from .. import families
from ..training.training_args import DynTieTrainingArguments
from . import UsageError, first_line
from .machine import warn_if_one_process_was_started
from .output_dir import check_output_dir

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
    warn_if_one_process_was_started(task.script)


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
