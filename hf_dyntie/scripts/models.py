"""Stage 2 of a script: the tokenizer and the DynTie model (from scratch, from a DynTie checkpoint, or from a
stock one of a family in ``families.py``), then the tying arguments and the checkpoint to resume from, checked
against that model before any data work."""

from __future__ import annotations

import os
import shutil

import torch
import transformers
from safetensors import SafetensorError
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from .. import families
from ..convert import to_dyntie_config
from ..training.accounting import unique_storage_bytes
from ..training.checkpoints import CheckpointError, check_unfinished, read_tying_state, resolve_checkpoint
from ..training.start import build_policy, check_eval_data, relaxed_settings
from ..training.training_args import DynTieTrainingArguments
from . import UsageError, first_line
from .arguments import CAUSAL_LM, DYNTIE_CONFIGS, MASKED_LM, MODEL_FAMILIES, ModelArguments, Task, model_types

logger = transformers.utils.logging.get_logger(__name__)


def load_tokenizer(model_args: ModelArguments, task: Task) -> PreTrainedTokenizerBase:
    """The tokenizer of ``--tokenizer_name``, else of ``--model_name_or_path``."""
    name = model_args.tokenizer_name or model_args.model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, use_fast=model_args.use_fast_tokenizer, **model_args.hub_kwargs())
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load the tokenizer {name!r}: {first_line(err)}") from err
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
            raise UsageError(f"cannot load the config of {source!r}: {first_line(err)}") from err
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
            raise UsageError(f"--config_overrides {model_args.config_overrides!r}: {first_line(err)}") from err
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
            raise UsageError(f"cannot load the model {model_args.model_name_or_path!r}: {first_line(err)}") from err
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
        raise UsageError(f"cannot build a {model_class.__name__} from this config: {first_line(err)}") from err
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


def resolve_checkpoint_or_usage(value: str | bool | None, output_dir: str) -> str | None:
    """:func:`hf_dyntie.training.checkpoints.resolve_checkpoint` with its error as a :class:`UsageError`."""
    try:
        return resolve_checkpoint(value, output_dir)
    except CheckpointError as err:
        raise UsageError(f"--resume_from_checkpoint: {first_line(err)}") from err


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
        raise UsageError(first_line(err)) from err
    if not training_args.do_train:
        training_args.resume_from_checkpoint = None
        return
    resume = resolve_checkpoint_or_usage(training_args.resume_from_checkpoint, training_args.output_dir)
    if resume is not None:
        try:
            budget = None if policy.starts_above_budget else training_args.tie_budget
            read_tying_state(resume, model, training_args.tie_policy, budget, training_args.resume_allow_partial,
                             relaxed_settings(model, training_args))
            check_unfinished(resume, training_args.max_steps, training_args.num_train_epochs)
        except CheckpointError as err:
            raise UsageError(f"--resume_from_checkpoint: {first_line(err)}") from err
    training_args.resume_from_checkpoint = resume


def check_disk_space(model: PreTrainedModel, training_args: DynTieTrainingArguments) -> None:
    """Refuse, before any data work, an ``--output_dir`` on a disk without room for one save: the compact model
    (every parameter at most once, as stored), and with checkpoints also the AdamW moments beside it."""
    if not training_args.do_train or not training_args.should_save:
        return
    stored = unique_storage_bytes(model.parameters())
    needed = stored * (3 if training_args.save_strategy != "no" else 1)
    folder = os.path.abspath(training_args.output_dir)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise UsageError(f"--output_dir {training_args.output_dir!r}: {free / 2**20:.0f} MiB free on its disk, one save "
                         f"needs about {needed / 2**20:.0f} MiB (model{' + optimizer state' if needed > stored else ''})")
