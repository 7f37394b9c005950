"""Stage 4 of a script: metrics, training and evaluation, ``all_results.json``, and the data sentence of the
model card (the card itself is ``DynTieTrainer.create_model_card``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import IterableDataset

from ..training.policies.rewards import perplexity
from .arguments import DataTrainingArguments, ModelArguments


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
        if not training_args.push_to_hub:  # a push saves the model itself, once, at the end, with the card
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


def card_kwargs(model_args: ModelArguments, data_args: DataTrainingArguments, data_description: str) -> dict[str, Any]:
    """What ``DynTieTrainer.create_model_card`` / ``push_to_hub`` are told about the run (like run_clm.py's)."""
    kwargs: dict[str, Any] = {"finetuned_from": model_args.model_name_or_path, "data_description": data_description}
    if data_args.dataset_name is not None:
        kwargs["dataset"] = data_args.dataset_name
    return kwargs
