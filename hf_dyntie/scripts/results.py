"""Stage 4 of a script: metrics, training and evaluation, ``all_results.json``, and the model card."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import IterableDataset

from .arguments import DataTrainingArguments, ModelArguments, Task
from .models import max_positions


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

