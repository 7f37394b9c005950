"""What the scored controller costs: ``greedy`` against a static map, paired A/B in one process.

The evidence regime of ``charlm.py`` (char-level Tiny Shakespeare, 8 positions x d 64, seq 128, batch 16,
AdamW 3e-3), both arms through ``DynTieTrainer`` from the same init and data: arm A is ``greedy`` under
budget 4 at its default cadence, starting from the ``sequence`` map at the budget (the steady state, where
every decision scores all tie and move candidates), arm B keeps that map (``replay`` of it). The arms run
in alternation, ``--pairs`` times, and the overhead is the median ratio of their training wall times
(evaluation excluded), so machine load hits both alike. It also times the scorer's parts (one forward
candidate, one per-position gradient pass) against a training step, which gives the overhead at any
cadence: ``(candidates * forward + gradient pass) / (interval * step)``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from charlm_cell import make_training_args  # noqa: E402
from charlm_rows import QUICK, REGIME  # noqa: E402
from common import DEFAULT_OUTPUT, gpt2_config_kwargs, machine_info, md_table, set_threads, write_results  # noqa: E402
from data import Blocks, Windows, load_chars, window_offsets  # noqa: E402
from stats import median  # noqa: E402


def build_model(regime, vocab_size: int, seed: int):
    from hf_dyntie import DynTieGPT2Config, DynTieGPT2LMHeadModel

    torch.manual_seed(seed)
    kw = gpt2_config_kwargs(8, regime["embd"], regime["heads"], regime["seq_len"], vocab_size)
    return DynTieGPT2LMHeadModel(DynTieGPT2Config(**kw))


def run_arm(tie: dict, regime, data, steps: int, out: Path, seed: int = 0):
    from transformers import PrinterCallback, default_data_collator

    from hf_dyntie import DynTieTrainer

    row = {"steps": steps, "tie": dict(tie)}
    args = make_training_args(row, regime, seed, eval_every=10**9, out_dir=out)
    args.eval_strategy = "no"
    offsets = window_offsets(seed, steps * regime["batch_size"], len(data["train"]), regime["seq_len"])
    trainer = DynTieTrainer(
        model=build_model(regime, data["vocab_size"], seed), args=args,
        train_dataset=Windows(data["train"], offsets, regime["seq_len"]), eval_dataset=Blocks(data["val"]),
        data_collator=default_data_collator,
    )
    trainer.remove_callback(PrinterCallback)
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0, trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--budget", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = p.parse_args()
    regime = QUICK if args.quick else REGIME
    if args.quick:
        args.steps, args.pairs = 24, 1
    set_threads(args.threads)
    data = load_chars(regime)
    from hf_dyntie.training.policies.static import sequence_map
    from hf_dyntie.training.policies import POLICIES

    start = sequence_map(8, args.budget)
    history = Path("/tmp/controller_cost") / "static.jsonl"
    history.parent.mkdir(parents=True, exist_ok=True)
    history.write_text(json.dumps({"step": 0, "tie_map": start}) + "\n")
    greedy = {"tie_policy": "greedy", "tie_budget": args.budget, "tie_init": ",".join(map(str, start)), "tie_mode": "share"}
    if args.quick:
        greedy["tie_interval"] = 8
    static = {"tie_policy": "replay", "tie_replay_file": str(history), "tie_mode": "share"}
    ratios, pairs = [], []
    for k in range(args.pairs):
        t_a, trainer = run_arm(greedy, regime, data, args.steps, Path("/tmp/controller_cost") / "a")
        t_b, _ = run_arm(static, regime, data, args.steps, Path("/tmp/controller_cost") / "b")
        ratios.append(t_a / t_b)
        pairs.append({"greedy_s": t_a, "static_s": t_b, "ratio": t_a / t_b,
                      "decisions": len(trainer.history.records), "final_map": trainer.dyntie_model.tie_map})
        print(pairs[-1], flush=True)

    # the scorer's parts against one training step, on the last greedy trainer's model
    scorer = trainer._get_scorer()
    model = trainer.dyntie_model
    candidates, _ = trainer.policy.candidates(model.tie_map)
    t0 = time.perf_counter()
    scorer.loss_deltas(candidates)
    per_candidate = (time.perf_counter() - t0) / (len(candidates) + 1)  # + the current map's own forward
    t0 = time.perf_counter()
    scorer.position_gradients()
    gradient_pass = time.perf_counter() - t0
    step_s = min(pair["static_s"] for pair in pairs) / args.steps
    interval = trainer.args.tie_interval
    row = {
        "interval": interval, "score_tokens": trainer.args.tie_score_tokens, "candidates": len(candidates),
        "median_time_ratio": median(ratios), "forward_per_candidate_s": per_candidate,
        "gradient_pass_s": gradient_pass, "train_step_s": step_s,
        "predicted_overhead": ((len(candidates) + 1) * per_candidate) / (interval * step_s),
        "predicted_overhead_with_unties": ((len(candidates) + 1) * per_candidate + gradient_pass) / (interval * step_s),
    }
    print(row)
    payload = {"machine": machine_info(), "settings": {**vars(args), "output": str(args.output),
               "default_interval": POLICIES["greedy"].default_interval}, "pairs": pairs, "summary": row}
    table = md_table([row], list(row))
    write_results(args.output, "controller_cost_quick" if args.quick else "controller_cost", payload, table)
    print(table)


if __name__ == "__main__":
    main()
