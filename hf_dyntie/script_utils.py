"""What ``run_clm_dyntie.py`` and ``run_mlm_dyntie.py`` share: arguments, data, model building, results, card.

The two scripts follow transformers' ``run_clm.py`` / ``run_mlm.py`` (same flags, same three argument
dataclasses, same data processing) and differ only in the task: the model head, how a batch is labelled
and what "accuracy" means. Everything else lives here, so each script reads top to bottom as its pipeline.

Bad input is reported as a :class:`UsageError`: ``run_script`` prints it as one line on stderr and exits
with status 1, and every check that can fail runs before any data work starts (the tying arguments are
checked against the model right after it is built, before tokenization). A run whose training loss turns
NaN or infinite stops with one ``error:`` line too, and exit status 3.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import transformers
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, load_dataset
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    HfArgumentParser,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from . import families
from .convert import to_dyntie_config
from .tie_map import format_tie_map
from .trainer import (
    CheckpointError,
    NonFiniteLossError,
    build_policy,
    check_eval_data,
    read_tying_state,
    resolve_checkpoint,
)
from .training_args import DynTieTrainingArguments

logger = transformers.utils.logging.get_logger(__name__)


class UsageError(Exception):
    """Bad input (arguments, files, model/tokenizer mismatch): reported as one line, exit status 1."""


EXIT_USAGE = 1  # bad input, found before any data work
EXIT_DIVERGED = 3  # the training loss turned NaN or infinite: stopped, nothing saved from the bad step


def run_script(main: Callable[[], None]) -> None:
    """Entry point of a script: run ``main``. A :class:`UsageError` (or a checkpoint that cannot be resumed)
    becomes ``error: ...`` on stderr and exit status 1; a diverged run (:class:`NonFiniteLossError`) the same
    with exit status 3."""
    try:
        main()
    except (UsageError, CheckpointError) as err:
        print(f"error: {_first_line(err)}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except NonFiniteLossError as err:
        print(f"\nerror: {_first_line(err)}", file=sys.stderr)  # on its own line, after the progress bar
        sys.exit(EXIT_DIVERGED)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---- the task: which model classes a script trains --------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """What differs between the two scripts, as data: the model class per architecture family."""

    script: str
    model_classes: dict[str, type[PreTrainedModel]]  # family ("gpt2", "llama", ...) -> DynTie class with the head
    auto_class: str  # how a user reloads the result
    pipeline_tag: str
    accuracy: str  # what eval_accuracy measures, in words


def _heads(auto_class: str) -> dict[str, type[PreTrainedModel]]:
    """Family name -> its DynTie class for ``auto_class``, for every family of the table that has one."""
    return {f.name: f.dyntie_class(f.head(auto_class)) for f in families.FAMILIES if f.head(auto_class)}


CAUSAL_LM = Task(
    script="run_clm_dyntie.py",
    # every family with a causal LM head; BERT as a causal LM (is_decoder=True) is how the paper trained BERT
    model_classes=_heads(families.CAUSAL_LM),
    auto_class="AutoModelForCausalLM",
    pipeline_tag="text-generation",
    accuracy="next-token accuracy",
)
MASKED_LM = Task(
    script="run_mlm_dyntie.py",
    model_classes=_heads(families.MASKED_LM),
    auto_class="AutoModelForMaskedLM",
    pipeline_tag="fill-mask",
    accuracy="masked-token accuracy",
)

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
        raise UsageError(_first_line(err)) from err


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
    The choice is printed in one line."""
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


_CHECKPOINT_DIR = re.compile(r"^checkpoint-\d+$")


def _checkpoints_in(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    names = [n for n in os.listdir(folder) if _CHECKPOINT_DIR.match(n) and os.path.isdir(os.path.join(folder, n))]
    return sorted(names, key=lambda n: int(n.split("-")[1]))


def check_output_dir(training_args: DynTieTrainingArguments) -> None:
    """A training run into an ``--output_dir`` that holds another run's checkpoints would start over and leave
    them beside its own, so that "resume from the latest" later continues the wrong run. Refuse, unless
    ``--resume_from_checkpoint`` continues one of them or ``--overwrite_output_dir`` deletes them first."""
    out = training_args.output_dir
    if not training_args.do_train or out is None:
        return
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--output_dir {out!r} is a file, not a folder")
    if _resume_requested(training_args.resume_from_checkpoint):
        return  # resuming: the folder's checkpoints are this run's (check_tying checks the one named)
    checkpoints = _checkpoints_in(out)
    if not checkpoints:
        return
    if not training_args.overwrite_output_dir:
        shown = ", ".join(checkpoints[:3]) + (f" and {len(checkpoints) - 3} more" if len(checkpoints) > 3 else "")
        raise UsageError(
            f"--output_dir {out!r} holds checkpoints of an earlier run ({shown}): pass --resume_from_checkpoint last "
            "to continue it, --overwrite_output_dir to delete them and start over, or another --output_dir"
        )
    with training_args.main_process_first(desc="clearing the output folder"):
        if training_args.local_process_index == 0:
            for name in _checkpoints_in(out):
                shutil.rmtree(os.path.join(out, name))
            logger.warning(f"--overwrite_output_dir: deleted {len(checkpoints)} checkpoint folder(s) from {out}")


def _resume_requested(value: str | bool | None) -> bool:
    return value is not None and value is not False and str(value).strip().lower() not in ("", "false", "none")


def resolve_checkpoint_or_usage(value: str | bool | None, output_dir: str) -> str | None:
    """:func:`hf_dyntie.trainer.resolve_checkpoint` with its error as a :class:`UsageError`."""
    try:
        return resolve_checkpoint(value, output_dir)
    except CheckpointError as err:
        raise UsageError(f"--resume_from_checkpoint: {_first_line(err)}") from err


def check_tying(model: PreTrainedModel, training_args: DynTieTrainingArguments) -> None:
    """Every tying argument against the model, and the checkpoint to resume from, before any data work: what
    the trainer would refuse after minutes of tokenization is refused here in a second.

    On success ``training_args.resume_from_checkpoint`` holds the checkpoint folder itself (``True`` /
    ``last`` resolved to the latest in ``--output_dir``), or ``None``.
    """
    try:
        policy, _, _ = build_policy(model, training_args)
        check_eval_data(
            policy, training_args, training_args.do_eval,
            how="pass --do_eval (with --validation_file, or a dataset's validation split / --validation_split_percentage)",
        )
    except ValueError as err:
        raise UsageError(_first_line(err)) from err
    if not training_args.do_train:
        training_args.resume_from_checkpoint = None
        return
    resume = resolve_checkpoint_or_usage(training_args.resume_from_checkpoint, training_args.output_dir)
    if resume is not None:
        try:
            read_tying_state(resume, model, training_args.tie_policy)
        except CheckpointError as err:
            raise UsageError(f"--resume_from_checkpoint: {_first_line(err)}") from err
    training_args.resume_from_checkpoint = resume


# ---- tokenizer and model ---------------------------------------------------------------------------------


def load_tokenizer(model_args: ModelArguments, task: Task) -> PreTrainedTokenizerBase:
    """The tokenizer of ``--tokenizer_name``, else of ``--model_name_or_path``."""
    name = model_args.tokenizer_name or model_args.model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, use_fast=model_args.use_fast_tokenizer, **model_args.hub_kwargs())
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load the tokenizer {name!r}: {_first_line(err)}") from err
    if task is MASKED_LM and tokenizer.mask_token is None:
        raise UsageError(f"the tokenizer {name!r} has no mask token, which masked language modeling needs")
    return tokenizer


def load_config(model_args: ModelArguments, task: Task) -> tuple[str, PretrainedConfig]:
    """The architecture family and the DynTie config to build or load the model with."""
    source = model_args.config_name or model_args.model_name_or_path
    if source:
        try:
            config = AutoConfig.from_pretrained(source, **model_args.hub_kwargs())
        except (OSError, ValueError) as err:
            raise UsageError(f"cannot load the config of {source!r}: {_first_line(err)}") from err
        family = MODEL_FAMILIES.get(config.model_type)
        if family not in task.model_classes:
            raise UsageError(
                f"{source!r} is a {config.model_type!r} model; {task.script} trains: {', '.join(model_types(task))}"
            )
        if not isinstance(config, DYNTIE_CONFIGS[family]):
            config = to_dyntie_config(config)  # a stock GPT-2 / Llama / ...: same fields, untied
        return family, config
    family = MODEL_FAMILIES[model_args.model_type]
    config = DYNTIE_CONFIGS[family]()
    if model_args.config_overrides:
        try:
            config.update_from_string(model_args.config_overrides)  # parses each value as its field's type
            # then build the config from the overridden fields alone, so that fields derived from them follow
            # (Qwen2's per-layer layer_types from num_hidden_layers) and the config's own validation runs
            names = [item.split("=", 1)[0].strip() for item in model_args.config_overrides.split(",")]
            config = type(config)(**{name: getattr(config, name) for name in names})
        except (ValueError, TypeError, KeyError) as err:
            raise UsageError(f"--config_overrides {model_args.config_overrides!r}: {_first_line(err)}") from err
    return family, config


def _torch_dtype(name: str | None) -> torch.dtype | str | None:
    return name if name in (None, "auto") else getattr(torch, name)


def build_model(model_args: ModelArguments, tokenizer: PreTrainedTokenizerBase, task: Task) -> PreTrainedModel:
    """The DynTie model to train: loaded from ``--model_name_or_path`` or built from scratch.

    A stock checkpoint of a family in ``families.py`` loads into the DynTie class of the same architecture:
    parameter names are identical, so every weight lands where it was and the untied model computes exactly
    what the stock one did, until the tying policy starts to tie. From scratch the vocabulary follows the tokenizer; a
    loaded model whose embedding is smaller than the tokenizer's vocabulary is refused, since resizing a
    pretrained embedding would hand the new tokens untrained rows.
    """
    family, config = load_config(model_args, task)
    if task is CAUSAL_LM and families.family_named(family).head(families.MASKED_LM) is not None:
        config.is_decoder = True  # an encoder family (BERT) as a left-to-right language model
    model_class = task.model_classes[family]
    if model_args.model_name_or_path:
        try:
            model = model_class.from_pretrained(
                model_args.model_name_or_path, config=config, dtype=_torch_dtype(model_args.dtype),
                **model_args.hub_kwargs(),
            )
        except (OSError, ValueError, SafetensorError) as err:  # missing, corrupt, or not fitting its config.json
            raise UsageError(f"cannot load the model {model_args.model_name_or_path!r}: {_first_line(err)}") from err
        rows = model.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > rows:
            raise UsageError(
                f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {rows} rows; use the "
                f"tokenizer the model was trained with, or train from scratch (--model_type) where the vocabulary "
                f"follows the tokenizer"
            )
        return model
    _fit_config_to_tokenizer(config, tokenizer, model_args)
    try:
        model = model_class(config)
    except ValueError as err:  # e.g. a width that the number of heads does not divide
        raise UsageError(f"cannot build a {model_class.__name__} from this config: {_first_line(err)}") from err
    if model_args.dtype not in (None, "auto"):
        model = model.to(_torch_dtype(model_args.dtype))
    n_params = model.tie_summary()["total_parameters"]
    logger.info(f"Training a new {type(model).__name__} from scratch: {n_params / 1e6:.2f}M parameters")
    return model


def _fit_config_to_tokenizer(
    config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, model_args: ModelArguments
) -> None:
    """From scratch: the vocabulary and special token ids come from the tokenizer, so any tokenizer fits."""
    overridden = {item.split("=", 1)[0].strip() for item in (model_args.config_overrides or "").split(",")}
    if "vocab_size" in overridden:
        if config.vocab_size < len(tokenizer):
            raise UsageError(
                f"--config_overrides vocab_size={config.vocab_size} is smaller than the tokenizer's "
                f"{len(tokenizer)} tokens"
            )
    else:
        config.vocab_size = len(tokenizer)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None:
            setattr(config, name, token_id)


def max_positions(config: PretrainedConfig) -> int:
    """How many positions the model has embeddings for (GPT-2 calls it n_positions, an alias of this)."""
    return config.max_position_embeddings


def sequence_length(
    requested: int | None, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, flag: str
) -> int:
    """The block / sequence length: as requested if the model has the positions for it, else a UsageError."""
    positions = max_positions(config)
    if requested is None:
        return min(positions, tokenizer.model_max_length, 1024)
    if requested < 1:
        raise UsageError(f"{flag} must be a positive number of tokens, got {requested}")
    if requested > positions:
        raise UsageError(
            f"{flag} {requested} is larger than the model's {positions} positions; pass {flag} {positions} or less"
        )
    return requested


# ---- data ------------------------------------------------------------------------------------------------


def load_raw_datasets(
    model_args: ModelArguments, data_args: DataTrainingArguments
) -> DatasetDict | IterableDatasetDict:
    """Train and validation splits from the Hub or from local files; without a validation split, the first
    ``validation_split_percentage`` percent of the training data becomes one."""
    try:
        if data_args.dataset_name is not None:
            raw = load_dataset(
                data_args.dataset_name,
                data_args.dataset_config_name,
                cache_dir=model_args.cache_dir,
                token=model_args.token,
                streaming=data_args.streaming,
            )
        else:
            files = {"train": data_args.train_file, "validation": data_args.validation_file}
            files = {split: path for split, path in files.items() if path is not None}
            builder = DATA_EXTENSIONS[next(iter(files.values())).rsplit(".", 1)[-1].lower()]
            options = {"keep_linebreaks": data_args.keep_linebreaks} if builder == "text" else {}
            raw = load_dataset(
                builder, data_files=files, cache_dir=model_args.cache_dir, streaming=data_args.streaming, **options
            )
    except (OSError, ValueError, FileNotFoundError) as err:
        raise UsageError(f"cannot load the data: {_first_line(err)}") from err
    if "validation" not in raw and "train" in raw:
        raw["train"], raw["validation"] = _split_off_validation(raw["train"], data_args.validation_split_percentage)
    return raw


def _split_off_validation(train: Dataset | IterableDataset, percentage: int):
    """(train, validation): every example whose index mod 100 is below ``percentage`` goes to validation.
    Index-based, so it is the same split for a streamed dataset as for a downloaded one."""
    if isinstance(train, IterableDataset):
        held_out = train.filter(lambda _, i: i % 100 < percentage, with_indices=True)
        kept = train.filter(lambda _, i: i % 100 >= percentage, with_indices=True)
        return kept, held_out
    indices = np.arange(len(train))
    return train.select(indices[indices % 100 >= percentage]), train.select(indices[indices % 100 < percentage])


def text_column(raw: DatasetDict | IterableDatasetDict) -> tuple[str, list[str]]:
    """The column holding the text ("text", else the first) and all column names."""
    split = raw["train"] if "train" in raw else raw["validation"]
    names = split.column_names or list(next(iter(split)))  # a streamed dataset may not know its columns upfront
    return ("text" if "text" in names else names[0]), names


def map_options(data_args: DataTrainingArguments, desc: str) -> dict[str, Any]:
    """``Dataset.map`` keywords; a streamed dataset takes none of them (it maps lazily, in one process)."""
    if data_args.streaming:
        return {}
    return {
        "num_proc": data_args.preprocessing_num_workers,
        "load_from_cache_file": not data_args.overwrite_cache,
        "desc": desc,
    }


def tokenize(examples: dict[str, list], tokenizer: PreTrainedTokenizerBase, column: str, **kwargs) -> dict[str, list]:
    """Tokenize one batch of texts (a module-level function, so ``map`` can cache and pickle it)."""
    return tokenizer(examples[column], **kwargs)


def tokenize_lines(
    examples: dict[str, list], tokenizer: PreTrainedTokenizerBase, column: str, **kwargs
) -> dict[str, list]:
    """``--line_by_line``: tokenize each non-empty line as its own sequence."""
    lines = [line for line in examples[column] if line and not line.isspace()]
    return tokenizer(lines, **kwargs)


def group_texts(examples: dict[str, list], block_size: int, add_labels: bool) -> dict[str, list]:
    """Concatenate a batch of tokenized texts and cut it into blocks of ``block_size`` tokens.

    The remainder shorter than a block is dropped (no padding needed). For causal LM the labels are the
    inputs themselves: the model shifts them by one position inside its loss.
    """
    concatenated = {key: list(chain.from_iterable(values)) for key, values in examples.items()}
    total = len(next(iter(concatenated.values()))) // block_size * block_size
    blocks = {key: [seq[i : i + block_size] for i in range(0, total, block_size)] for key, seq in concatenated.items()}
    if add_labels:
        blocks["labels"] = [list(block) for block in blocks["input_ids"]]
    return blocks


def select_splits(
    lm_datasets: DatasetDict | IterableDatasetDict,
    data_args: DataTrainingArguments,
    training_args: DynTieTrainingArguments,
    length: int,
) -> tuple[Dataset | IterableDataset | None, Dataset | IterableDataset | None]:
    """The training and evaluation sets the run needs, truncated to ``--max_*_samples``."""

    def pick(split: str, limit: int | None, flag: str):
        if split not in lm_datasets:
            raise UsageError(f"{flag} needs a {split} split, and the data has none")
        dataset = lm_datasets[split]
        if data_args.streaming:
            return dataset if limit is None else dataset.take(limit)
        if len(dataset) == 0:
            raise UsageError(f"the {split} data is shorter than one sequence of {length} tokens")
        return dataset if limit is None else dataset.select(range(min(limit, len(dataset))))

    train = pick("train", data_args.max_train_samples, "--do_train") if training_args.do_train else None
    evaluation = pick("validation", data_args.max_eval_samples, "--do_eval") if training_args.do_eval else None
    return train, evaluation


# ---- masked LM: a repeatable evaluation ------------------------------------------------------------------


def _mask_example(
    example: dict[str, list], index: int, masker: DataCollatorForLanguageModeling, seed: int
) -> dict[str, list]:
    masker.generator = torch.Generator().manual_seed(seed + index)
    inputs, labels = masker.torch_mask_tokens(
        torch.tensor([example["input_ids"]]), special_tokens_mask=torch.tensor([example["special_tokens_mask"]])
    )
    return {"input_ids": inputs[0].tolist(), "labels": labels[0].tolist()}


def mask_eval_dataset(
    dataset: Dataset | IterableDataset, tokenizer: PreTrainedTokenizerBase, mlm_probability: float, seed: int
) -> Dataset | IterableDataset:
    """Mask the evaluation set once, at preprocessing time, with the training collator's rule.

    Random masking at evaluation time would give a different loss on every call. Each example is masked
    with a generator seeded by ``seed + index``, so the masks do not depend on batch size, worker count or
    the number of processes, and two evaluations (even in two runs) see the same masked tokens. The
    examples need their ``special_tokens_mask`` (tokenize with ``return_special_tokens_mask=True``): special
    tokens are never masked.
    """
    masker = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm_probability=mlm_probability)
    return dataset.map(
        _mask_example,
        with_indices=True,
        fn_kwargs={"masker": masker, "seed": seed},
        remove_columns=["special_tokens_mask"],
        **({} if isinstance(dataset, IterableDataset) else {"desc": "Masking the evaluation set once"}),
    )


@dataclass
class MaskedLMCollator:
    """Masks training batches on the fly (a fresh mask every epoch), and pads already-masked evaluation
    examples (they carry ``labels``) without touching their masks."""

    tokenizer: PreTrainedTokenizerBase
    mlm_probability: float = 0.15
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        self.masker = DataCollatorForLanguageModeling(
            tokenizer=self.tokenizer, mlm_probability=self.mlm_probability, pad_to_multiple_of=self.pad_to_multiple_of
        )

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if "labels" not in features[0]:
            return self.masker(features)
        labels = [list(f["labels"]) for f in features]
        inputs = [{k: v for k, v in f.items() if k != "labels"} for f in features]
        batch = self.tokenizer.pad(inputs, return_tensors="pt", pad_to_multiple_of=self.pad_to_multiple_of)
        width = batch["input_ids"].shape[1]
        left = self.tokenizer.padding_side == "left"
        padded = [[-100] * (width - len(x)) + x if left else x + [-100] * (width - len(x)) for x in labels]
        batch["labels"] = torch.tensor(padded, dtype=torch.long)
        return batch


# ---- metrics ---------------------------------------------------------------------------------------------


def argmax_logits(logits: torch.Tensor | tuple, labels: torch.Tensor) -> torch.Tensor:
    """Keep only the predicted token ids: evaluation then gathers (batch, length) ids, not vocabulary-wide logits."""
    if isinstance(logits, tuple):  # extra outputs (e.g. past key values) follow the logits
        logits = logits[0]
    return logits.argmax(dim=-1)


def _accuracy(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    scored = labels != -100  # padding, unmasked (MLM) and process-padding positions carry -100
    if not scored.any():
        return {"accuracy": float("nan")}
    return {"accuracy": float((predictions[scored] == labels[scored]).mean())}


def next_token_accuracy(eval_prediction) -> dict[str, float]:
    """Causal LM: the prediction at position t is scored against the token at t + 1."""
    predictions, labels = eval_prediction
    return _accuracy(predictions[:, :-1], labels[:, 1:])


def masked_token_accuracy(eval_prediction) -> dict[str, float]:
    """Masked LM: only the masked positions (labels != -100) are scored."""
    predictions, labels = eval_prediction
    return _accuracy(predictions, labels)


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


# ---- train, evaluate, report -----------------------------------------------------------------------------

TIE_RESULT_KEYS = (
    "final_tie_map",
    "final_unique_layers",
    "mean_unique_layers",
    "final_trainable_parameters",
    "mean_trainable_parameters",
    "num_layers",
    "stored_parameters",
    "total_parameters",
    "training_state_bytes",
)


def _count(dataset, limit: int | None) -> int:
    if isinstance(dataset, IterableDataset):
        return limit if limit is not None else -1  # unknown until streamed
    return len(dataset)


def train_and_evaluate(trainer, train_dataset, eval_dataset, data_args, training_args) -> dict[str, Any]:
    """Train (then save the compact model with its tokenizer), evaluate, and write ``all_results.json``.

    The results hold the Trainer's metrics, ``perplexity = exp(eval_loss)`` and the tying summary of the run.
    """
    results: dict[str, Any] = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()  # compact: roots only, with the tokenizer
        metrics = dict(train_result.metrics, train_samples=_count(train_dataset, data_args.max_train_samples))
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        results.update(metrics)
    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = _count(eval_dataset, data_args.max_eval_samples)
        metrics["perplexity"] = perplexity(metrics["eval_loss"])
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)
    summary = trainer.dyntie_summary()
    if not training_args.do_train:  # nothing trained: only the model's own map means anything
        summary = {k: v for k, v in summary.items() if not k.startswith("mean_") and k != "training_state_bytes"}
    results.update({key: summary[key] for key in TIE_RESULT_KEYS if key in summary})
    trainer.save_metrics("all", results)
    return results


def format_count(n: float) -> str:
    """1234567 -> '1.23M', 45600 -> '45.6K'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def _tie_map_text(tie_map: Sequence[int]) -> str:
    return "[" + " ".join(str(r) for r in tie_map) + "]"


def describe_data(data_args: DataTrainingArguments) -> str:
    """One sentence on what the model was trained and evaluated on, for the model card."""
    if data_args.dataset_name:
        name = f"`{data_args.dataset_name}`"
        if data_args.dataset_config_name:
            name += f" (`{data_args.dataset_config_name}`)"
        return f"Trained and evaluated on the {name} dataset."
    train = f"`{Path(data_args.train_file).name}`" if data_args.train_file else "no training file"
    if data_args.validation_file:
        return f"Trained on {train}, evaluated on `{Path(data_args.validation_file).name}`."
    return f"Trained on {train}, evaluated on {data_args.validation_split_percentage}% of it held out."


def _samples_sentence(samples: int) -> str:
    return f" {samples:,} training sequences." if samples >= 0 else ""  # -1: streamed, count unknown


def model_card(
    trainer, results: dict[str, Any], model_args: ModelArguments, data_sentence: str, task: Task,
    dataset_tag: str | None = None,
) -> str:
    """The README.md of the output folder: what the model is, how it ended up tied, what it was trained and
    evaluated on, and how to load it (the stock Trainer card knows nothing about tying)."""
    args, config = trainer.args, trainer.model.config
    tie_map = results["final_tie_map"]
    layers, unique = len(tie_map), results["final_unique_layers"]
    stored, total = results["stored_parameters"], results["total_parameters"]
    repo = args.hub_model_id if args.push_to_hub and args.hub_model_id else args.output_dir
    width = getattr(config, "n_embd", None) or config.hidden_size
    heads = getattr(config, "n_head", None) or config.num_attention_heads
    start = f"from `{model_args.model_name_or_path}`" if model_args.model_name_or_path else "from scratch"
    tags = ["dyntie", "dynamic-layer-tying", config.model_type]
    lines = ["---", "library_name: transformers", f"pipeline_tag: {task.pipeline_tag}", "tags:"]
    lines += [f"- {tag}" for tag in tags] + (["datasets:", f"- {dataset_tag}"] if dataset_tag else []) + ["---", ""]
    lines += [
        f"# {Path(str(repo)).name}",
        "",
        f"A {layers}-layer {type(trainer.model).__name__} (hidden size {width}, {heads} heads, vocabulary "
        f"{config.vocab_size}, {max_positions(config)} positions, tie_mode `{config.tie_mode}`) trained {start} with "
        f"Dynamic Layer Tying (David-Hay & Wolf, ICLR 2024): while it trained, a `{args.tie_policy}` policy decided "
        f"every {args.tie_interval} optimizer steps whether each layer trains its own weights or reuses an earlier "
        "layer's.",
        "",
        "## Final tie map",
        "",
        f"`{_tie_map_text(tie_map)}`: position *i* runs the weights of layer `tie_map[i]`; {unique} of {layers} "
        "layers train their own weights.",
        "",
        "| parameters | count |",
        "|---|---|",
        f"| stored in this checkpoint | {stored:,} ({format_count(stored)}) |",
        f"| total, as if untied | {total:,} ({format_count(total)}) |",
        f"| trainable, mean over training | {format_count(results['mean_trainable_parameters'])} |",
        "",
        "## Training data",
        "",
        data_sentence + _samples_sentence(results.get("train_samples", -1)),
        "",
        "## Evaluation",
        "",
    ]
    if "eval_loss" in results:
        lines += [
            f"| eval loss | perplexity | {task.accuracy} |",
            "|---|---|---|",
            f"| {results['eval_loss']:.4f} | {results['perplexity']:.2f} | {results['eval_accuracy']:.4f} |",
            "",
        ]
    else:
        lines += ["Not evaluated.", ""]
    lines += [
        "## Training procedure",
        "",
        f"{trainer.state.global_step} optimizer steps, learning rate {args.learning_rate}, batch size "
        f"{args.per_device_train_batch_size} per device, seed {args.seed}. Tying: policy `{args.tie_policy}`, "
        f"interval {args.tie_interval}, reward `{args.tie_reward}` ({args.tie_reward_source}), initial map "
        f"`{getattr(trainer, 'tie_init', args.tie_init)}`; the decisions are in `tie_history.jsonl`.",
        "",
    ]
    plots = (("tie_map.png", "Tie map over training"), ("unique_layers.png", "Unique layers over training"))
    for plot, title in plots:
        if (Path(args.output_dir) / plot).exists():
            lines += [f"![{title}]({plot})", ""]
    lines += [
        "## How to use",
        "",
        "```python",
        "import hf_dyntie  # registers the DynTie models with the Auto classes",
        f"from transformers import {task.auto_class}, AutoTokenizer",
        "",
        f'model = {task.auto_class}.from_pretrained("{repo}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        "print(model.tie_map, model.tie_summary())",
        "```",
        "",
        "The checkpoint is compact: it stores each independently trained layer once; loading rebuilds the tied "
        "positions as views of their root layers.",
        "",
    ]
    return "\n".join(lines)


def write_model_card_and_push(trainer, card: str) -> None:
    """Write the DynTie model card (main process), and with ``--push_to_hub`` upload the output folder.

    ``Trainer.push_to_hub`` regenerates README.md through ``create_model_card`` right before uploading, which
    would replace this card with the stock one; that call is pointed at the DynTie card instead.
    """
    path = Path(trainer.args.output_dir) / "README.md"

    def write_card(**_ignored) -> None:
        if trainer.is_world_process_zero():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(card, encoding="utf-8")

    write_card()
    if trainer.args.push_to_hub:
        trainer.create_model_card = write_card
        trainer.push_to_hub(commit_message="End of training")


# ---- the offline quickstart -----------------------------------------------------------------------------


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, masked_lm: bool = False, model_max_length: int | None = None
) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer trained on ``texts`` (seconds for a few hundred KB), as a fast tokenizer.

    Byte-level BPE covers every string without an unknown token. GPT-2 style: one special token,
    ``<|endoftext|>``, as bos/eos. ``masked_lm``: BERT-style ``[PAD] [UNK] [CLS] [SEP] [MASK]`` and every
    sequence framed as ``[CLS] ... [SEP]``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if masked_lm else ["<|endoftext|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    extra = {} if model_max_length is None else {"model_max_length": model_max_length}
    if not masked_lm:
        return PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>", **extra
        )
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", **extra,
    )


QUICKSTART_DIR = "runs/quickstart"
QUICKSTART_STEPS = 360  # ~3 minutes of training on two free CPU cores (~0.5 s per step)
QUICKSTART_STEPS_ENV = "DYNTIE_QUICKSTART_STEPS"
QUICKSTART_VOCAB = 4096
QUICKSTART_DATA = (
    "Trained on Python's bundled documentation text (`pydoc_data.topics`, ~465 KB), evaluated on every 12th "
    "topic, held out."
)


def quickstart_args(output_dir: str = QUICKSTART_DIR) -> list[str]:
    """The command line that ``python run_clm_dyntie.py`` (no arguments) runs: a small DynTie GPT-2 on
    Python's own documentation, offline, in a few minutes on a laptop CPU.

    ``DYNTIE_QUICKSTART_STEPS=8`` cuts the run short (CI).
    """
    steps = os.environ.get(QUICKSTART_STEPS_ENV, str(QUICKSTART_STEPS))
    if not steps.isdigit() or int(steps) < 1:
        raise UsageError(f"{QUICKSTART_STEPS_ENV} must be a positive number of steps, got {steps!r}")
    data = f"{output_dir}/data"
    return [
        "--train_file", f"{data}/train.txt",
        "--validation_file", f"{data}/validation.txt",
        "--tokenizer_name", f"{data}/tokenizer",
        "--model_type", "dyntie_gpt2",
        "--config_overrides", "n_layer=6,n_embd=128,n_head=4,n_positions=128",
        "--block_size", "128",
        "--output_dir", output_dir,
        "--do_train", "--do_eval",
        "--max_steps", steps,
        "--per_device_train_batch_size", "16",
        "--per_device_eval_batch_size", "16",
        "--learning_rate", "2e-3",
        "--warmup_steps", "20",
        "--lr_scheduler_type", "cosine",
        "--logging_steps", "40",
        "--save_strategy", "no",
        "--report_to", "none",
        "--dataloader_pin_memory", "false",  # CPU quickstart: pinning only helps host-to-GPU copies
        "--seed", "42",
        "--tie_policy", "grow",
        "--tie_budget", "3",
        # grow (the best tying row of docs/RESULTS.md): all positions start on layer 0; groups split in two,
        # weights and optimizer state copied, until 3 unique layers at 25% of the run
    ]  # fmt: skip


def pydoc_corpus(eval_every: int = 12) -> tuple[list[str], list[str]]:
    """Python's documentation topics (~465 KB, shipped with every CPython) as (train, validation) texts.

    Whole topics are held out (every ``eval_every``-th in sorted order, ~8% of the text), so evaluation
    measures text the model has not seen, not the other half of a paragraph it has.
    """
    from pydoc_data.topics import topics

    names = sorted(topics)
    train = [topics[n] for i, n in enumerate(names) if i % eval_every != 0]
    validation = [topics[n] for i, n in enumerate(names) if i % eval_every == 0]
    return train, validation


def prepare_quickstart(data_args: DataTrainingArguments, model_args: ModelArguments, training_args) -> None:
    """Write the quickstart's corpus (train.txt, validation.txt) and train its tokenizer on the training text,
    at the paths ``quickstart_args`` points to. Under a launcher only the first local process writes."""
    with training_args.main_process_first(desc="quickstart corpus and tokenizer"):
        if training_args.local_process_index != 0:
            return
        train, validation = pydoc_corpus()
        for path, texts in ((data_args.train_file, train), (data_args.validation_file, validation)):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text("\n\n".join(texts) + "\n", encoding="utf-8")
        tokenizer = train_tokenizer(train, QUICKSTART_VOCAB, model_max_length=128)
        tokenizer.save_pretrained(model_args.tokenizer_name)


def generate_sample(folder: str, prompt: str = "The", seed: int = 0, max_new_tokens: int = 40) -> str:
    """Reload the saved folder the way a user would and sample a continuation of ``prompt`` (one line)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer(prompt, return_tensors="pt")
    torch.manual_seed(seed)
    output = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=True, top_k=40, pad_token_id=tokenizer.eos_token_id
    )
    return " ".join(tokenizer.decode(output[0], skip_special_tokens=True).split())


def print_quickstart_report(trainer, results: dict[str, Any]) -> None:
    """The quickstart's closing summary, one fact per line with a stable prefix (tests assert on them)."""
    if not trainer.is_world_process_zero():
        return
    out = trainer.args.output_dir
    tie_map = results["final_tie_map"]
    stored, total = results["stored_parameters"], results["total_parameters"]
    plots = [str(Path(out) / name) for name in ("tie_map.png", "unique_layers.png") if (Path(out) / name).exists()]
    print()
    print(f"perplexity: {results['perplexity']:.1f}")
    print(f"accuracy: {results['eval_accuracy']:.3f} (next-token, held-out topics)")
    print(
        f"unique layers: {results['final_unique_layers']} of {results['num_layers']} (final), "
        f"{results['mean_unique_layers']:.1f} mean"
    )
    print(f"tie map: {format_tie_map(tie_map)}")
    print(
        f"parameters: {format_count(stored)} stored of {format_count(total)} total ({stored / total:.0%}), "
        f"{format_count(results['mean_trainable_parameters'])} trainable on average"
    )
    print(f"plots: {', '.join(plots) if plots else 'none'}")
    print(f"model: {out} (README.md, all_results.json, tie_history.jsonl)")
    print(f"sample: {generate_sample(out, seed=trainer.args.seed)}")

