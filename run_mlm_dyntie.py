#!/usr/bin/env python
r"""Train a masked language model with Dynamic Layer Tying: the DynTie sibling of transformers' run_mlm.py.

While the model trains, a tying policy (by default `grow`: share first, then untie towards the budget) decides
steps whether each layer trains its own weights or reuses an earlier layer's. Same flags as run_mlm.py,
plus the --tie_* options of DynTieTrainingArguments.

    # from scratch on the Hub's WikiText-2
    python run_mlm_dyntie.py --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1 \
        --tokenizer_name bert-base-uncased --model_type dyntie_bert \
        --config_overrides num_hidden_layers=12,hidden_size=256,num_attention_heads=4,intermediate_size=1024 \
        --max_seq_length 128 --output_dir runs/wikitext2-mlm --do_train --do_eval

    # from a stock BERT checkpoint (loaded untied, same outputs; then the policy ties it), on local files
    python run_mlm_dyntie.py --model_name_or_path bert-base-uncased --train_file train.txt \
        --validation_file valid.txt --output_dir runs/bert-dyntie --do_train --do_eval

The evaluation set is masked once, deterministically (seeded per example), so every evaluation of a
model reports the same loss. Launchers: `accelerate launch`, `torchrun --nproc_per_node N ... [--use_cpu]`.
"""

from __future__ import annotations

import sys
from functools import partial

from transformers import set_seed

from hf_dyntie import DynTieTrainer
from hf_dyntie.scripts import UsageError, run_script
from hf_dyntie.scripts.arguments import (
    MASKED_LM,
    MaskedLMDataArguments,
    check_arguments,
    parse_arguments,
)
from hf_dyntie.scripts.machine import fit_to_machine, setup_logging
from hf_dyntie.scripts.output_dir import clear_output_dir
from hf_dyntie.scripts.data import (
    MaskedLMCollator,
    group_texts,
    load_raw_datasets,
    map_options,
    mask_eval_dataset,
    select_splits,
    text_column,
    tokenize,
    tokenize_lines,
)
from hf_dyntie.scripts.models import build_model, check_disk_space, check_tying, load_tokenizer, sequence_length
from hf_dyntie.scripts.results import (
    argmax_logits,
    card_kwargs,
    describe_data,
    masked_token_accuracy,
    train_and_evaluate,
)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        raise UsageError("no arguments: see --help (the offline quickstart is `python run_clm_dyntie.py`)")
    model_args, data_args, training_args = parse_arguments(MaskedLMDataArguments, argv, __doc__)
    setup_logging(training_args)
    fit_to_machine(training_args)
    check_arguments(model_args, data_args, training_args, MASKED_LM)
    set_seed(training_args.seed)

    # Tokenizer and model: from scratch, from a DynTie checkpoint, or from a stock BERT one.
    tokenizer = load_tokenizer(model_args, MASKED_LM)
    model = build_model(model_args, tokenizer, MASKED_LM)
    check_tying(model, training_args)  # the tying arguments and the checkpoint to resume, before any data work
    check_disk_space(model, training_args)
    clear_output_dir(training_args)  # only now, with every check passed
    max_seq_length = sequence_length(data_args.max_seq_length, model.config, tokenizer, "--max_seq_length")

    # Data: one sequence per line (--line_by_line), or concatenated text cut into max_seq_length blocks.
    # The special-tokens mask keeps [CLS]/[SEP]/[PAD] from being masked.
    raw_datasets = load_raw_datasets(model_args, data_args)
    column, columns = text_column(raw_datasets)
    with training_args.main_process_first(desc="tokenizing"):
        if data_args.line_by_line:
            lm_datasets = raw_datasets.map(
                partial(
                    tokenize_lines,
                    tokenizer=tokenizer,
                    column=column,
                    padding="max_length" if data_args.pad_to_max_length else False,
                    truncation=True,
                    max_length=max_seq_length,
                    return_special_tokens_mask=True,
                ),
                batched=True,
                remove_columns=columns,
                **map_options(data_args, "Running tokenizer on dataset line by line"),
            )
        else:
            tokenized = raw_datasets.map(
                partial(tokenize, tokenizer=tokenizer, column=column, return_special_tokens_mask=True),
                batched=True,
                remove_columns=columns,
                **map_options(data_args, "Running tokenizer on dataset"),
            )
            lm_datasets = tokenized.map(
                partial(group_texts, block_size=max_seq_length, add_labels=False),
                batched=True,
                **map_options(data_args, f"Grouping texts in blocks of {max_seq_length}"),
            )
    train_dataset, eval_dataset = select_splits(lm_datasets, data_args, training_args, max_seq_length)
    if eval_dataset is not None:
        with training_args.main_process_first(desc="masking the evaluation set"):
            eval_dataset = mask_eval_dataset(eval_dataset, tokenizer, data_args.mlm_probability, training_args.seed)

    # Training batches are masked afresh each time; evaluation batches arrive masked and are only padded.
    mixed_precision = training_args.fp16 or training_args.bf16
    pad_to_multiple_of_8 = data_args.line_by_line and mixed_precision and not data_args.pad_to_max_length
    data_collator = MaskedLMCollator(
        tokenizer=tokenizer,
        mlm_probability=data_args.mlm_probability,
        pad_to_multiple_of=8 if pad_to_multiple_of_8 else None,
    )

    trainer = DynTieTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=data_collator,
        compute_metrics=masked_token_accuracy if training_args.do_eval else None,
        preprocess_logits_for_metrics=argmax_logits if training_args.do_eval else None,
    )
    train_and_evaluate(trainer, train_dataset, eval_dataset, data_args, training_args)

    # The DynTie model card; with --push_to_hub one upload of the folder, modeling code included.
    if training_args.do_train:
        kwargs = card_kwargs(model_args, data_args, describe_data(data_args))
        if training_args.push_to_hub:
            trainer.push_to_hub(**kwargs)
        else:
            trainer.create_model_card(**kwargs)


if __name__ == "__main__":
    run_script(main)
