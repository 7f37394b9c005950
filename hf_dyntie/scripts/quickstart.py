"""The offline quickstart: ``python run_clm_dyntie.py`` without arguments trains a small DynTie GPT-2 on
Python's own documentation (``pydoc_data.topics``), with a tokenizer trained here, in a few minutes on a CPU."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..training.model_card import format_count
from ..tie_map import format_tie_map
from . import UsageError
from .arguments import DataTrainingArguments, ModelArguments


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
        "--overwrite_output_dir",  # the quickstart is meant to be run again: its earlier result is replaced
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

