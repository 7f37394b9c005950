"""Stage 3 of a script: the data. Raw datasets from the Hub or local files, tokenized, concatenated and cut
into blocks (or one sequence per line); for masked LM, an evaluation set masked once, and a collator that
masks training batches afresh and only pads the evaluation ones."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, load_dataset
from transformers import DataCollatorForLanguageModeling, DataCollatorForTokenClassification, PreTrainedTokenizerBase

from ..training.training_args import DynTieTrainingArguments
from . import UsageError, first_line
from .arguments import DATA_EXTENSIONS, DataTrainingArguments, ModelArguments


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
        raise UsageError(f"cannot load the data: {first_line(err)}") from err
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
    column = "text" if "text" in names else names[0]
    feature = (split.features or {}).get(column)
    if feature is not None and getattr(feature, "dtype", "string") not in ("string", "large_string"):
        raise UsageError(f"the text column {column!r} of the data holds {getattr(feature, 'dtype', feature)}, not text: "
                         "name the text column 'text' (or put it first)")
    return column, names


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
    if not lines:  # a batch of empty lines: no sequences, the same columns
        return {key: [] for key in tokenizer("x", **kwargs)}
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
    examples (they carry ``labels``, padded with -100) without touching their masks."""

    tokenizer: PreTrainedTokenizerBase
    mlm_probability: float = 0.15
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        self.masker = DataCollatorForLanguageModeling(
            tokenizer=self.tokenizer, mlm_probability=self.mlm_probability, pad_to_multiple_of=self.pad_to_multiple_of
        )
        self.padder = DataCollatorForTokenClassification(self.tokenizer, pad_to_multiple_of=self.pad_to_multiple_of)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if "labels" not in features[0]:
            return self.masker(features)
        return self.padder(features)
