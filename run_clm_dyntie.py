#!/usr/bin/env python
r"""Train a causal language model with Dynamic Layer Tying: the DynTie sibling of transformers' run_clm.py.

While the model trains, a tying policy (by default `grow`: share first, then untie towards the budget) decides
steps whether each layer trains its own weights or reuses an earlier layer's. Same flags as run_clm.py,
plus the --tie_* options of DynTieTrainingArguments.

    # offline quickstart: a small DynTie GPT-2 on Python's own documentation, a few minutes on a CPU
    python run_clm_dyntie.py

    # from scratch on the Hub's WikiText-2
    python run_clm_dyntie.py --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1 \
        --tokenizer_name gpt2 --model_type dyntie_gpt2 --config_overrides n_layer=12,n_embd=256,n_head=4 \
        --output_dir runs/wikitext2 --do_train --do_eval

    # from a stock GPT-2 checkpoint (loaded untied, same outputs; then the policy ties it), on local files
    python run_clm_dyntie.py --model_name_or_path gpt2 --train_file train.txt --validation_file valid.txt \
        --output_dir runs/gpt2-dyntie --do_train --do_eval

Launchers: `accelerate launch run_clm_dyntie.py ...`, `torchrun --nproc_per_node 2 run_clm_dyntie.py ... --use_cpu`.
"""

from __future__ import annotations

import sys
from functools import partial

from transformers import default_data_collator, set_seed

from hf_dyntie import DynTieTrainer
from hf_dyntie.scripts import run_script
from hf_dyntie.scripts.arguments import (
    CAUSAL_LM,
    CausalLMDataArguments,
    check_arguments,
    parse_arguments,
)
from hf_dyntie.scripts.machine import fit_to_machine, setup_logging
from hf_dyntie.scripts.output_dir import clear_output_dir
from hf_dyntie.scripts.data import group_texts, load_raw_datasets, map_options, select_splits, text_column, tokenize
from hf_dyntie.scripts.models import build_model, check_disk_space, check_tying, load_tokenizer, sequence_length
from hf_dyntie.scripts.quickstart import QUICKSTART_DATA, prepare_quickstart, print_quickstart_report, quickstart_args
from hf_dyntie.scripts.results import (
    argmax_logits,
    card_kwargs,
    describe_data,
    next_token_accuracy,
    train_and_evaluate,
)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    quickstart = len(argv) == 0
    model_args, data_args, training_args = parse_arguments(CausalLMDataArguments, argv or quickstart_args(), __doc__)
    setup_logging(training_args)
    fit_to_machine(training_args)
    if quickstart:
        prepare_quickstart(data_args, model_args, training_args)
    check_arguments(model_args, data_args, training_args, CAUSAL_LM)
    set_seed(training_args.seed)

    # Tokenizer and model: from scratch, from a DynTie checkpoint, or from a stock GPT-2 / BERT one.
    tokenizer = load_tokenizer(model_args, CAUSAL_LM)
    model = build_model(model_args, tokenizer, CAUSAL_LM)
    check_tying(model, training_args)  # the tying arguments and the checkpoint to resume, before any data work
    check_disk_space(model, training_args)
    clear_output_dir(training_args)  # only now, with every check passed
    block_size = sequence_length(data_args.block_size, model.config, tokenizer, "--block_size")

    # Data: tokenize every text, concatenate, cut into blocks of block_size tokens (labels = inputs).
    raw_datasets = load_raw_datasets(model_args, data_args)
    column, columns = text_column(raw_datasets)
    with training_args.main_process_first(desc="tokenizing and grouping"):
        tokenized = raw_datasets.map(
            partial(tokenize, tokenizer=tokenizer, column=column),
            batched=True,
            remove_columns=columns,
            **map_options(data_args, "Running tokenizer on dataset"),
        )
        lm_datasets = tokenized.map(
            partial(group_texts, block_size=block_size, add_labels=True),
            batched=True,
            **map_options(data_args, f"Grouping texts in blocks of {block_size}"),
        )
    train_dataset, eval_dataset = select_splits(lm_datasets, data_args, training_args, block_size)

    trainer = DynTieTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=next_token_accuracy if training_args.do_eval else None,
        preprocess_logits_for_metrics=argmax_logits if training_args.do_eval else None,
    )
    results = train_and_evaluate(trainer, train_dataset, eval_dataset, data_args, training_args)

    # The DynTie model card; with --push_to_hub one upload of the folder, modeling code included.
    if training_args.do_train:
        kwargs = card_kwargs(model_args, data_args, QUICKSTART_DATA if quickstart else describe_data(data_args))
        if training_args.push_to_hub:
            trainer.push_to_hub(**kwargs)
        else:
            trainer.create_model_card(**kwargs)
    if quickstart:
        print_quickstart_report(trainer, results)


if __name__ == "__main__":
    run_script(main)
