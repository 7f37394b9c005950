"""The model card (``README.md``) of a DynTie training run, written by ``DynTieTrainer.create_model_card``.

The stock Trainer card knows nothing about tying; this one says what the model is, how it ended up tied
(a static policy's fixed map, or a dynamic policy's start and final map), what it was trained and evaluated
on, and how to load it: with ``trust_remote_code=True`` where the folder carries its code (the default when
pushing), else with ``import hf_dyntie``. See docs/design.md ("Checkpoints") for the remote-code form.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import families
from .policies.rewards import perplexity

PLOTS = (("tie_map.png", "Tie map over training"), ("unique_layers.png", "Unique layers over training"))
INSTALL_LINE = 'pip install "transformers>=5,<6" torch'


@dataclass(frozen=True)
class CardTask:
    """What a card says about the head: the Hub's pipeline tag, the Auto class and what accuracy measures."""

    pipeline_tag: str
    auto_class: str
    accuracy: str


CARD_TASKS = {
    families.CAUSAL_LM: CardTask("text-generation", families.CAUSAL_LM, "next-token accuracy"),
    families.MASKED_LM: CardTask("fill-mask", families.MASKED_LM, "masked-token accuracy"),
}


def card_task(model) -> CardTask:
    """The task of a DynTie model, from its head in ``families.py`` (a base model: ``AutoModel``)."""
    found = families.family_of_class(type(model))
    auto_class = found[1].auto_class if found else "AutoModel"
    return CARD_TASKS.get(auto_class, CardTask("feature-extraction", auto_class, "accuracy"))


def format_count(n: float) -> str:
    """1234567 -> '1.23M', 45600 -> '45.6K'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def tie_map_text(tie_map: Sequence[int]) -> str:
    return "[" + " ".join(str(r) for r in tie_map) + "]"


def run_results(output_dir: str, log_history: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any]:
    """What the card reports: the last evaluation the Trainer logged, ``all_results.json`` where the scripts
    wrote one (sample counts, perplexity), and the run's tying summary."""
    results: dict[str, Any] = {}
    for entry in log_history:
        if "eval_loss" in entry:
            results.update(entry)
    path = Path(output_dir) / "all_results.json"
    if path.exists():
        results.update(json.loads(path.read_text()))
    if "eval_loss" in results and "perplexity" not in results:
        results["perplexity"] = perplexity(results["eval_loss"])
    return {**results, **summary}


def tying_sentence(policy_name: str, dynamic: bool, interval: int, initial: str, first_map: Sequence[int]) -> str:
    """How the map came about, truthfully: a static policy's map is fixed from step 0; a dynamic one starts
    from ``initial`` and changes every ``interval`` optimizer steps."""
    if not dynamic:
        return f"Tying: the static policy `{policy_name}` fixed the map `{tie_map_text(first_map)}` from step 0"
    return f"Tying: policy `{policy_name}`, a decision every {interval} optimizer steps, initial map `{initial}`"


def usage_lines(repo: str, auto_class: str, remote_code: bool) -> list[str]:
    """The card's "How to use": remote code needs transformers only; otherwise hf_dyntie registers the models."""
    if remote_code:
        code = [
            f"from transformers import {auto_class}, AutoTokenizer",
            "",
            f'model = {auto_class}.from_pretrained("{repo}", trust_remote_code=True)',
        ]
        install = f"The folder carries its modeling code, so transformers is all it needs: `{INSTALL_LINE}`."
    else:
        code = [
            "import hf_dyntie  # registers the DynTie models with the Auto classes",
            f"from transformers import {auto_class}, AutoTokenizer",
            "",
            f'model = {auto_class}.from_pretrained("{repo}")',
        ]
        install = "Loading needs the hf-dyntie package (`pip install -e .` in its repository)."
    return [
        "## How to use",
        "",
        install,
        "",
        "```python",
        *code,
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        "print(model.tie_map, model.tie_summary())",
        "```",
        "",
        "The checkpoint is compact: it stores each independently trained layer once; loading rebuilds the tied "
        "positions as views of their root layers. For transformers 4.x or tools that take no remote code, "
        "`python -m hf_dyntie expand` writes a plain stock folder with every layer materialised.",
        "",
    ]


def model_card(
    trainer,
    *,
    remote_code: bool,
    finetuned_from: str | None = None,
    data_description: str | None = None,
    dataset: str | None = None,
    extra_tags: Sequence[str] = (),
    language: str | None = None,
    license: str | None = None,
) -> str:
    """The README.md of a finished ``DynTieTrainer`` run (see the module docstring)."""
    args, model = trainer.args, trainer.dyntie_model
    config = model.config
    task = card_task(model)
    results = run_results(args.output_dir, trainer.state.log_history, trainer.dyntie_summary())
    tie_map = results["final_tie_map"]
    layers, unique = len(tie_map), results["final_unique_layers"]
    stored, total = results["stored_parameters"], results["total_parameters"]
    repo = args.hub_model_id if args.push_to_hub and args.hub_model_id else args.output_dir
    width = getattr(config, "n_embd", None) or config.hidden_size
    heads = getattr(config, "n_head", None) or config.num_attention_heads
    start = f"from `{finetuned_from}`" if finetuned_from else "from scratch"
    family = families.family_named(config.model_type)
    tags = ["dyntie", "dynamic-layer-tying", config.model_type] + ([family.name] if family else [])
    tags += ["custom_code"] if remote_code else []
    tags += [tag for tag in extra_tags if tag not in tags]
    lines = ["---", "library_name: transformers", f"pipeline_tag: {task.pipeline_tag}"]
    lines += [f"{key}: {value}" for key, value in (("language", language), ("license", license)) if value]
    lines += ["tags:"]
    lines += [f"- {tag}" for tag in tags] + (["datasets:", f"- {dataset}"] if dataset else []) + ["---", ""]
    policy = trainer.policy
    relaxed = f", relaxed ties: each tied position adds its own rank-{config.tie_lora_rank} delta" if config.tie_lora_rank else ""
    relaxed += " and its own norm and bias offsets" if getattr(config, "tie_lora_vectors", False) else ""
    relaxed += " (a group's root position too)" if getattr(config, "tie_lora_roots", False) else ""
    lines += [
        f"# {Path(str(repo)).name}",
        "",
        f"A {layers}-layer {type(model).__name__} (hidden size {width}, {heads} heads, vocabulary "
        f"{config.vocab_size}, {config.max_position_embeddings} positions, tie_mode `{config.tie_mode}`{relaxed}) trained "
        f"{start} with Dynamic Layer Tying (David-Hay & Wolf, ICLR 2024): "
        + (
            f"while it trained, a `{policy.name}` policy decided every {args.tie_interval} optimizer steps whether "
            "each layer trains its own weights or reuses an earlier layer's."
            if policy.dynamic
            else f"its layers were tied by the fixed map of the static `{policy.name}` policy for the whole run."
        ),
        "",
        "## Final tie map",
        "",
        f"`{tie_map_text(tie_map)}`: position *i* runs the weights of layer `tie_map[i]`; {unique} of {layers} "
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
        (data_description or "Not described.") + _samples_sentence(results.get("train_samples", -1)),
        "",
        "## Evaluation",
        "",
    ]
    if "eval_loss" in results:
        accuracy = results.get("eval_accuracy")
        lines += [
            f"| eval loss | perplexity | {task.accuracy} |",
            "|---|---|---|",
            f"| {results['eval_loss']:.4f} | {results['perplexity']:.2f} | "
            + (f"{accuracy:.4f} |" if accuracy is not None else "- |"),
            "",
        ]
    else:
        lines += ["Not evaluated.", ""]
    records = trainer.history.records
    first_map = records[0]["tie_map"] if records else tie_map
    lines += [
        "## Training procedure",
        "",
        f"{trainer.state.global_step} optimizer steps, learning rate {args.learning_rate}, batch size "
        f"{args.per_device_train_batch_size} per device, seed {args.seed}. "
        + tying_sentence(policy.name, policy.dynamic, args.tie_interval, trainer.tie_init, first_map)
        + (f", reward `{args.tie_reward}` ({args.tie_reward_source})" if policy.dynamic else "")
        + "; the decisions are in `tie_history.jsonl`.",
        "",
    ]
    for plot, title in PLOTS:
        if (Path(args.output_dir) / plot).exists():
            lines += [f"![{title}]({plot})", ""]
    lines += usage_lines(str(repo), task.auto_class, remote_code)
    return "\n".join(lines)


def _samples_sentence(samples: int) -> str:
    return f" {samples:,} training sequences." if samples >= 0 else ""  # -1: streamed, count unknown
