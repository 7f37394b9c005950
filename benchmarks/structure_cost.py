"""Cost of a structure change with its optimizer state carried along (issue: untie that keeps what was learned).

On the memory benchmark's 48 x 512 GPT-2 (vocab 50,257, seq 32, batch 1, AdamW, fp32) at a 75%-tied
``sequence`` map: time one training step, then time each structure event as ``DynTieTrainer`` performs it
(``model.retie`` + ``carry_optimizer_state``): a grow-style untie (split a group, the new root copies the
root's weights and AdamW moments), a tie with ``merge="discard"`` and one with ``merge="average"``. After
each event and one more training step, the training state (parameters, gradients, optimizer state, by
unique storage) must equal the analytic roots-only figure: no leaked copies. Step and event times are
measured side by side in one process; quote their ratio, not absolute times.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, md_table, set_threads, write_results  # noqa: E402
from memory import add_model_arguments, analytic, build, train_and_measure  # noqa: E402
from stats import median  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--repeats", type=int, default=3, help="timed events of each kind")
    args = p.parse_args()
    if args.quick:
        args.layers, args.embd, args.heads, args.vocab_size, args.repeats = 8, 64, 4, 256, 2
    set_threads(args.threads)

    from hf_dyntie.training.optimizer_state import carry_optimizer_state
    from hf_dyntie.training.policies.static import sequence_map
    from hf_dyntie.tie_map import root_layers, split_group

    L = args.layers
    start = sequence_map(L, max(4, L // 4))
    model = build(args, start)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    train_and_measure(model, opt, args, 2)  # AdamW state exists for every root
    step_times = []
    for _ in range(3):
        t0 = time.perf_counter()
        train_and_measure(model, opt, args, 1)
        step_times.append(time.perf_counter() - t0)
    step = median(step_times)

    def event(new_map: list[int], merge: str) -> float:
        t0 = time.perf_counter()
        report = model.retie(new_map, merge=merge)
        carry_optimizer_state(opt, report.moves)
        return time.perf_counter() - t0

    rows = []
    for kind in ("untie (grow split)", "tie, merge=discard", "tie, merge=average"):
        times, checks = [], []
        for _ in range(args.repeats):
            current = model.tie_map
            if kind.startswith("untie"):
                p_ = next(i for i, r in enumerate(current) if r != i)
                movers = [q for q in range(p_ + 1, L) if current[q] == current[p_]]
                new_map = split_group(current, p_, movers)
            else:
                roots = root_layers(current)
                new_map = [roots[-2] if r == roots[-1] else r for r in current]
            times.append(event(new_map, "average" if "average" in kind else "discard"))
            state = train_and_measure(model, opt, args, 1)
            minimum = analytic(model, model.tie_map, L)["min_bytes"]
            checks.append(state["total"] / minimum)
        rows.append({
            "event": kind, "median_event_s": median(times), "step_s": step,
            "event_over_step": median(times) / step,
            "state_over_analytic_min": max(checks), "unique_layers_after": len(root_layers(model.tie_map)),
        })
        print(rows[-1], flush=True)
    info = machine_info()
    payload = {"machine": info, "settings": vars(args) | {"output": str(args.output)}, "start_map": start, "rows": rows,
               "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    table = md_table(rows, ["event", "median_event_s", "step_s", "event_over_step", "state_over_analytic_min",
                            "unique_layers_after"],
                     ["event", "event (s)", "training step (s)", "event / step", "training state / roots-only minimum",
                      "unique layers after"])
    name = "structure_cost_quick" if args.quick else "structure_cost"
    json_path, _ = write_results(args.output, name, payload, table)
    print(table)
    print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
