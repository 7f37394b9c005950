"""Part 2 of ``speed.py``: what the policy costs inside a Trainer.

``DynTieTrainer`` with the Q-learning policy against the same trainer replaying the very maps that run
produced (``tie_policy=replay``): same model, data, maps and retie work; only the decisions, rewards and Q
updates (and, for ``eval_batch``, the held-out forward) differ. Runs alternate Q, R, Q, R. We also time
``DynTieTrainer._decide`` directly and the per-step training-state accounting.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from common import family_models
from data import random_blocks
from stats import median

from hf_dyntie import DynTieTrainer, DynTieTrainingArguments
from hf_dyntie.training.accounting import training_state_bytes
from transformers import PrinterCallback, TrainerCallback, default_data_collator


class StepClock(TrainerCallback):
    """Per-step wall times (step begin to step end)."""

    def __init__(self):
        self.times: list[float] = []
        self._t0 = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t0)


def run_trainer(args: argparse.Namespace, workdir: Path, policy: str, source: str, replay_file: str | None = None
                ) -> dict[str, Any]:
    """One training run of ``policy``: total, step and ``_decide`` seconds, and the accounting's cost."""
    _, config, _, dyntie_class = family_models(
        args.family, args.trainer_layers, args.embd, args.heads, args.seq_len, args.vocab_size
    )
    torch.manual_seed(0)
    model = dyntie_class(config)
    targs = DynTieTrainingArguments(
        output_dir=str(workdir), max_steps=args.trainer_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=1e-4, save_strategy="no", report_to=[],
        logging_steps=10_000, use_cpu=True, disable_tqdm=True, seed=0, tie_policy=policy, tie_interval=4,
        tie_reward="neg_loss", tie_reward_source=source, tie_replay_file=replay_file, tie_plots=False,
        tie_replay_size=64, tie_replay_batch=16, tie_target_update=8, tie_bootstrap="next_layer",
    )
    clock = StepClock()
    trainer = DynTieTrainer(model=model, args=targs, train_dataset=random_blocks(256, args.seq_len, args.vocab_size, 2),
                            eval_dataset=random_blocks(64, args.seq_len, args.vocab_size, 2),
                            data_collator=default_data_collator, callbacks=[clock])
    trainer.remove_callback(PrinterCallback)
    decide_seconds = [0.0]
    original = trainer._decide

    def timed_decide(step: int) -> None:
        t0 = time.perf_counter()
        original(step)
        decide_seconds[0] += time.perf_counter() - t0

    trainer._decide = timed_decide
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    steps = sum(clock.times)
    # what the per-step accounting (training_state_bytes, called every optimizer step) costs
    t0 = time.perf_counter()
    for _ in range(20):
        training_state_bytes(trainer.dyntie_model, trainer.optimizer)
    accounting = (time.perf_counter() - t0) / 20
    return {"train_seconds": total, "step_seconds": steps, "decide_seconds": decide_seconds[0],
            "median_step_s": median(clock.times), "accounting_s_per_step": accounting,
            "decisions": len(trainer.history.records)}


def trainer_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Q-learning against the replay of its own maps, for each reward source: medians over the repeats."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for source in ("train_batch", "eval_batch"):
            q_runs, r_runs = [], []
            # a first Q-learning run writes the history the replay runs follow (all Q runs are identical:
            # same seeds, so they take the same decisions)
            q_runs.append(run_trainer(args, Path(tmp) / f"q_{source}_0", "qlearning", source))
            history = str(Path(tmp) / f"q_{source}_0" / "tie_history.jsonl")
            for rep in tqdm(range(args.trainer_repeats), desc=f"trainer {source}", leave=False):
                r_runs.append(run_trainer(args, Path(tmp) / f"r_{source}_{rep}", "replay", "train_batch", history))
                if rep + 1 < args.trainer_repeats:
                    q_runs.append(run_trainer(args, Path(tmp) / f"q_{source}_{rep + 1}", "qlearning", source))
            q_total = median([r["train_seconds"] for r in q_runs])
            r_total = median([r["train_seconds"] for r in r_runs])
            q_decide = median([r["decide_seconds"] / r["train_seconds"] for r in q_runs])
            r_decide = median([r["decide_seconds"] / r["train_seconds"] for r in r_runs])
            rows.append({
                "row": f"qlearning vs replay, reward from {source}",
                "reward_source": source,
                "qlearning_train_s_median": q_total,
                "replay_train_s_median": r_total,
                "train_time_ratio": q_total / r_total,
                "decide_share_qlearning_pct": 100 * q_decide,
                "decide_share_replay_pct": 100 * r_decide,
                "policy_cost_share_pct": 100 * (q_decide - r_decide),
                "median_step_s": median([r["median_step_s"] for r in q_runs]),
                "accounting_share_pct": 100 * q_runs[0]["accounting_s_per_step"] / q_runs[0]["median_step_s"],
                "decisions": q_runs[0]["decisions"],
                "runs": {"qlearning": q_runs, "replay": r_runs},
            })
            row = rows[-1]
            print(f"  {row['row']}: policy {row['policy_cost_share_pct']:.2f}% of train time, "
                  f"whole-train ratio {row['train_time_ratio']:.3f}", flush=True)
    return rows
