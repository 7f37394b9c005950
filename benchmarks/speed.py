"""Speed benchmark: what tying costs (or saves) per training step, and what the policy costs in a Trainer.

Part 1 (steps): stock ``GPT2LMHeadModel`` against ``DynTieGPT2LMHeadModel`` (``--family llama``:
``LlamaForCausalLM`` against ``DynTieLlamaForCausalLM``) with the same config, weights and batches, each
with its own AdamW. Steps alternate A, B, A, B, ... so both see the same background
load; we report the median of the per-pair ratios B/A (and the ratio of medians). Absolute times are
only indicative (a shared CPU); the ratios are the result.

Part 2 (trainer): ``DynTieTrainer`` with the Q-learning policy against the same trainer replaying the
very maps that run produced (``tie_policy=replay``): same model, data, maps and retie work; only the
decisions, rewards and Q updates (and, for ``eval_batch``, the held-out forward) differ. Runs alternate
Q, R, Q, R. We also time ``DynTieTrainer._decide`` directly and the per-step training-state accounting.

    python benchmarks/speed.py              # ~10 min on 2 CPU cores
    python benchmarks/speed.py --family llama --skip-trainer   # the Llama rows (speed_llama.json)
    python benchmarks/speed.py --quick      # seconds
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DEFAULT_OUTPUT,
    FAMILIES,
    family_models,
    machine_info,
    median,
    md_table,
    set_threads,
    write_results,
)

from hf_dyntie import DynTieTrainer, DynTieTrainingArguments  # noqa: E402
from hf_dyntie.accounting import training_state_bytes  # noqa: E402
from hf_dyntie.policies.static import sequence_map  # noqa: E402
from transformers import PrinterCallback, TrainerCallback, default_data_collator  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

# ------------------------------------------------------------------------------------- part 1: steps


def make_pair(args: argparse.Namespace, tie_map: list[int], tie_mode: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A stock model and a DynTie model with identical starting weights (tied positions run their root's)."""
    stock_config, dyntie_config, stock_class, dyntie_class = family_models(
        args.family, args.layers, args.embd, args.heads, args.seq_len, args.vocab_size, tie_mode
    )
    torch.manual_seed(0)
    stock = stock_class(stock_config)
    dyn = dyntie_class(dyntie_config)
    dyn.load_state_dict(stock.state_dict())
    dyn.retie(tie_map)
    return stock, dyn


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: torch.Tensor) -> tuple[float, float]:
    """Forward + backward + AdamW step; returns (wall seconds, this process's CPU seconds). With one torch
    thread the CPU time is the work done, which other processes on a shared machine disturb far less."""
    t0, c0 = time.perf_counter(), time.process_time()
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, time.process_time() - c0


def time_pair(args: argparse.Namespace, label: str, tie_map: list[int], tie_mode: str) -> dict[str, Any]:
    stock, dyn = make_pair(args, tie_map, tie_mode)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (stock, dyn)]
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), generator=gen) for _ in range(8)]
    a_times, b_times, a_cpu, b_cpu = [], [], [], []
    total = args.warmup + args.steps
    for i in tqdm(range(total), desc=label, leave=False):
        batch = batches[i % len(batches)]
        order = [(0, a_times, a_cpu), (1, b_times, b_cpu)]
        for which, sink, cpu_sink in order if i % 2 == 0 else order[::-1]:  # alternate who goes first
            seconds, cpu_seconds = train_step((stock, dyn)[which], opts[which], batch)
            if i >= args.warmup:
                sink.append(seconds)
                cpu_sink.append(cpu_seconds)
    ratios = [b / a for a, b in zip(a_times, b_times)]
    return {
        "row": label,
        "tie_map": tie_map,
        "tie_mode": tie_mode,
        "unique_layers": len(set(tie_map)),
        "stock_median_s": median(a_times),
        "dyntie_median_s": median(b_times),
        "ratio_median_of_pairs": median(ratios),
        "ratio_of_medians": median(b_times) / median(a_times),
        "overhead_pct": 100.0 * (median(ratios) - 1.0),
        "cpu_ratio_median_of_pairs": median([b / a for a, b in zip(a_cpu, b_cpu)]),
        "steps": len(ratios),
    }


def step_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    L = args.layers
    maps = {
        "identity": list(range(L)),
        "50% tied": sequence_map(L, max(1, L // 2)),
        f"{100 * (1 - max(1, L // 4) / L):.0f}% tied": sequence_map(L, max(1, L // 4)),
        "all shared": [0] * L,
    }
    rows = [time_pair(args, "identity / share", maps["identity"], "share")]
    for name, tie_map in list(maps.items())[1:]:
        for mode in ("share", "follow"):
            rows.append(time_pair(args, f"{name} / {mode}", tie_map, mode))
            print(f"  {rows[-1]['row']}: {rows[-1]['ratio_median_of_pairs']:.3f}x stock", flush=True)
    return rows


# ----------------------------------------------------------------------------------- part 2: trainer


class StepClock(TrainerCallback):
    """Per-step wall times (step begin to step end)."""

    def __init__(self):
        self.times: list[float] = []
        self._t0 = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t0)


class Blocks(torch.utils.data.Dataset):
    def __init__(self, n: int, seq_len: int, vocab: int):
        self.data = torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(2))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i], "labels": self.data[i]}


def run_trainer(args: argparse.Namespace, workdir: Path, policy: str, source: str, replay_file: str | None = None
                ) -> dict[str, Any]:
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
    trainer = DynTieTrainer(model=model, args=targs, train_dataset=Blocks(256, args.seq_len, args.vocab_size),
                            eval_dataset=Blocks(64, args.seq_len, args.vocab_size),
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model and few steps (seconds)")
    p.add_argument("--family", choices=FAMILIES, default="gpt2",
                   help="architecture of the step rows (llama: GQA with half the heads for keys/values, SwiGLU)")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--embd", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="timed steps per model per row (after warm-up)")
    p.add_argument("--trainer-layers", type=int, default=12)
    p.add_argument("--trainer-steps", type=int, default=60)
    p.add_argument("--trainer-repeats", type=int, default=2)
    p.add_argument("--skip-trainer", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared 2-core CPU)")
    args = p.parse_args()
    if args.quick:
        args.layers, args.embd, args.heads, args.seq_len, args.batch_size, args.vocab_size = 4, 32, 2, 16, 2, 128
        args.warmup, args.steps, args.trainer_layers, args.trainer_steps, args.trainer_repeats = 1, 4, 4, 8, 1
    hf_logging.set_verbosity_error()
    set_threads(args.threads)

    print("part 1: training steps, DynTie vs stock (alternating, same weights and batches)")
    steps = step_rows(args)
    trainer = [] if args.skip_trainer else trainer_rows(args)
    name = ("speed" if args.family == "gpt2" else f"speed_{args.family}") + ("_quick" if args.quick else "")
    shape = "GPT-2" if args.family == "gpt2" else "Llama (key/value heads = heads / 2, SwiGLU 8/3 n_embd)"
    md = (
        f"Model: {shape}, {args.layers} layers, n_embd {args.embd}, seq {args.seq_len}, batch {args.batch_size}, vocab "
        f"{args.vocab_size}, {args.threads} torch thread(s); {args.steps} timed steps per model after {args.warmup} warm-up, A/B alternating. "
        "Ratio = median over steps of (DynTie step time / stock step time in the same pair); the CPU-time ratio is "
        "the same with this process's CPU time, which other processes on a shared CPU disturb far less.\n\n"
        + md_table(steps, ["row", "unique_layers", "stock_median_s", "dyntie_median_s", "ratio_median_of_pairs",
                           "ratio_of_medians", "overhead_pct", "cpu_ratio_median_of_pairs"],
                   ["map / mode", "unique layers", "stock median (s)", "DynTie median (s)", "ratio (median of pairs)",
                    "ratio of medians", "overhead %", "CPU-time ratio (median of pairs)"])
    )
    if trainer:
        md += (
            f"\n\nTrainer: {args.trainer_layers} layers, {args.trainer_steps} steps, decisions every 4 steps, "
            f"{args.trainer_repeats} runs of each, alternating. Policy share = time inside `_decide` (Q-learning) "
            "minus time inside `_decide` (replay of the same maps), over the whole train() time.\n\n"
            + md_table(trainer, ["row", "decisions", "median_step_s", "policy_cost_share_pct", "decide_share_qlearning_pct",
                                 "decide_share_replay_pct", "train_time_ratio", "accounting_share_pct"],
                       ["comparison", "decisions", "median step (s)", "policy cost % of train", "_decide % (Q)",
                        "_decide % (replay)", "whole train() Q / replay", "state accounting % of a step"])
        )
    payload = {"machine": machine_info(), "args": vars(args), "steps": steps, "trainer": trainer}
    write_results(args.output, name, payload, md)
    print(md)


if __name__ == "__main__":
    main()
