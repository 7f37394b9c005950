"""What a conversion keeps of the teacher before any uptraining: validation bits/char by init, delta rank and
budget, on the compress harness's saved teachers (issue 23, parts 1-2, on a trained model rather than a test's
random one).

For each seed's teacher (``compress_teacher``: trained once, reused; trained here if missing) and each budget u,
``from_stock`` ties it to the static ``sequence`` map with ``init="root"`` or ``"average"``, plain (rank 0) and
with SVD-started deltas and vector offsets at each rank of ``--ranks`` (the full rank d included), and
``"average"`` with relaxed roots (``tie_lora_roots``: the group's root position gets its own delta too), and
Relaxed Recursive Transformers' ``"stepwise"`` sources (8 layers to 4 groups: layers 0, 2, 5, 7) with and without
relaxed roots, and
scores the validation blocks. The figure plots bits/char against rank, one line per (init, budget), the teacher as a
horizontal line. It answers whether "a better start" (what ``--tie_lora_init svd`` promises) holds for each init.

    python benchmarks/compress_start.py --seeds 0,1 --budgets 4,2       # the saved teachers of compress.py
    python benchmarks/compress_start.py --quick --output /tmp/s         # seconds, a 40-step teacher
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from charlm_family import DEFAULT_FAMILY  # noqa: E402
from charlm_rows import QUICK, REGIME  # noqa: E402
from common import DEFAULT_OUTPUT, machine_info, md_table, set_threads, write_results  # noqa: E402
from compress import RUNS_ROOT, int_list, stage_context  # noqa: E402
from compress_rows import POSITIONS, QUICK_EVAL_EVERY, QUICK_PRETRAIN, QUICK_UPTRAIN, SHRINK_UNTIL  # noqa: E402
from stats import mean_ci  # noqa: E402

# (label, from_stock's init, tie_lora_roots): "+roots" gives each group's root position its own delta too
INITS = (("root", "root", False), ("average", "average", False), ("average+roots", "average", True),
         ("stepwise", "stepwise", False), ("stepwise+roots", "stepwise", True))
LABELS = [label for label, _, _ in INITS]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0", help="comma-separated teacher seeds")
    p.add_argument("--budgets", default="4,2", help="comma-separated unique-layer budgets u")
    p.add_argument("--ranks", default="1,2,4,8,11,16,32", help="delta ranks besides 0 and the full rank d")
    p.add_argument("--pretrain-steps", type=int, default=2500, help="the teachers' P (which saved teachers)")
    p.add_argument("--val-blocks", type=int, default=64, help="validation blocks scored per point (the first N)")
    p.add_argument("--quick", action="store_true", help="a 40-step teacher of the tiny regime (seconds)")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument("--runs-root", type=Path, default=RUNS_ROOT)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    args.seed_list = int_list(args.seeds, "--seeds")
    args.budget_list = int_list(args.budgets, "--budgets")
    args.rank_list = int_list(args.ranks, "--ranks")
    if any(not 1 <= u < POSITIONS for u in args.budget_list):
        raise SystemExit(f"compress_start: --budgets must lie in 1..{POSITIONS - 1}, got {args.budgets}")
    if any(r < 1 for r in args.rank_list):
        raise SystemExit(f"compress_start: --ranks must be positive, got {args.ranks}")
    # what compress.stage_context reads to name the teacher (P, quick, family, width)
    args.family, args.shrink_until = DEFAULT_FAMILY, SHRINK_UNTIL
    args.pretrain_steps = QUICK_PRETRAIN if args.quick else args.pretrain_steps
    args.uptrain_steps, args.eval_every = (QUICK_UPTRAIN, QUICK_EVAL_EVERY) if args.quick else (1, 100)
    return args


def sweep(folder: Path, budget: int, ranks: list[int], val, batch: int) -> list[dict[str, Any]]:
    """Validation bits/char of the teacher in ``folder`` tied to ``sequence`` at ``budget``, per init and rank."""
    from compress_train import held_out_bpc
    from hf_dyntie.convert import from_stock
    from hf_dyntie.training.policies.static import sequence_map

    tie_map = sequence_map(POSITIONS, budget)
    points = []
    for label, init, roots in INITS:
        for rank in ([] if roots else [0]) + ranks:  # relaxed roots need deltas: no rank-0 point
            model = from_stock(folder, tie_map, init=init, tie_lora_rank=rank, delta_init="svd" if rank else "zero",
                               tie_lora_vectors=bool(rank), tie_lora_roots=roots)
            points.append({"budget": budget, "init": label, "rank": rank, "val_bpc": held_out_bpc(model, val, batch)})
    return points


def summarize(points: list[dict[str, Any]], teachers: dict[int, float]) -> list[dict[str, Any]]:
    """Mean and t-CI over seeds of each (budget, init, rank)."""
    keys = sorted({(p["budget"], p["init"], p["rank"]) for p in points}, key=lambda k: (-k[0], LABELS.index(k[1]), k[2]))
    rows = []
    for budget, init, rank in keys:
        values = [p["val_bpc"] for p in points if (p["budget"], p["init"], p["rank"]) == (budget, init, rank)]
        stats = mean_ci(values)
        rows.append({"budget": budget, "init": init, "rank": rank, "n": stats["n"], "val_bpc": stats,
                     "vs_teacher": stats["mean"] - sum(teachers.values()) / len(teachers)})
    return rows


def results_table(payload: dict[str, Any], ranks: tuple[int, ...] = (0, 5, 11, 32)) -> str:
    """The compact table of docs/RESULTS.md: per budget and init, validation bits/char before uptraining at a
    few ranks and at full rank (the .md beside the JSON has every rank)."""
    rows = payload["rows"]
    full = max(r["rank"] for r in rows)
    shown = [k for k in (*ranks, full) if any(r["rank"] == k for r in rows)]
    by = {(r["budget"], r["init"], r["rank"]): r for r in rows}
    heads = " | ".join("plain ties" if k == 0 else f"rank {k}" + (" (full)" if k == full else "") for k in shown)
    lines = [f"| u | init | {heads} |", "|---|---|" + "---|" * len(shown)]
    for budget in sorted({r["budget"] for r in rows}, reverse=True):
        for label in LABELS:
            cells = [by.get((budget, label, k)) for k in shown]
            if any(cells):
                values = " | ".join(f"{c['val_bpc']['mean']:.3f}" if c else "" for c in cells)
                lines.append(f"| {budget} | `{label}` | {values} |")
    teacher = sum(payload["teachers_val_bpc"].values()) / len(payload["teachers_val_bpc"])
    lines.append(f"| - | teacher (untied) | {teacher:.3f} |" + " |" * (len(shown) - 1))
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], teacher: float, path: Path, full_rank: int) -> str:
    from plots import pyplot, save

    fig, ax = pyplot().subplots(figsize=(8, 5))
    for budget, style in zip(sorted({r["budget"] for r in rows}, reverse=True), ("-", "--", ":", "-.")):
        for i, init in enumerate(LABELS):  # a colour per init, a line style per budget
            line = [r for r in rows if r["budget"] == budget and r["init"] == init]
            ax.plot([max(r["rank"], 0.5) for r in line], [r["val_bpc"]["mean"] for r in line], linestyle=style,
                    color=f"C{i}", marker="o", label=f"u={budget}, init={init}")
    ax.axhline(teacher, color="black", lw=0.8, label="teacher (untied)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"delta rank (SVD-started, with offsets; 0 plotted at 0.5; full rank = {full_rank})")
    ax.set_ylabel("validation bits/char before uptraining")
    ax.set_title("What a conversion keeps of the teacher, by init and delta rank")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from data import load_chars
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    set_threads(args.threads)
    data = load_chars(QUICK if args.quick else REGIME)  # SystemExit "SKIP: ..." when the data file is missing
    from compress_teacher import ensure_teacher, teacher_weights
    from compress_train import held_out_bpc
    from hf_dyntie.convert import from_stock

    regime = QUICK if args.quick else REGIME
    full_rank = int(regime["embd"])
    ranks = sorted({r for r in args.rank_list if r < full_rank} | {full_rank})
    val = data["val"][: args.val_blocks]
    points, teachers = [], {}
    for seed in args.seed_list:
        ctx = stage_context(args, args.budget_list[0], data)
        record = ensure_teacher(seed, ctx)
        folder = teacher_weights(seed, ctx)
        teachers[seed] = held_out_bpc(from_stock(folder), val, regime["eval_batch_size"])
        for budget in args.budget_list:
            for p in sweep(folder, budget, ranks, val, regime["eval_batch_size"]):
                points.append({"seed": seed, "teacher_sha": record.get("teacher_sha"), **p})
                print(f"compress_start: seed {seed} u={budget} {p['init']} rank {p['rank']}: "
                      f"{p['val_bpc']:.4f} bpc (teacher {teachers[seed]:.4f})", flush=True)
    rows = summarize(points, teachers)
    args.output.mkdir(parents=True, exist_ok=True)
    name = "compress_start" + ("_quick" if args.quick else "")
    teacher = sum(teachers.values()) / len(teachers)
    payload = {"machine": {**machine_info()}, "seeds": args.seed_list, "pretrain_steps": args.pretrain_steps,
               "val_blocks": len(val), "teachers_val_bpc": teachers, "rows": rows, "points": points,
               "plots": [plot(rows, teacher, args.output / f"{name}.png", full_rank)]}
    table = [{"u": r["budget"], "init": r["init"], "rank": r["rank"] or "0 (plain)", "n": r["n"],
              "val": f"{r['val_bpc']['mean']:.4f}" + (f" ± {r['val_bpc']['ci95']:.4f}" if r["val_bpc"]["ci95"] else ""),
              "d": f"{r['vs_teacher']:+.4f}"} for r in rows]
    markdown = (
        f"Validation bits/char (first {len(val)} validation blocks) of the compress harness's teachers (seeds "
        f"{args.seed_list}, {args.pretrain_steps} steps; teacher mean {teacher:.4f}) tied to the static `sequence` "
        "map by `from_stock`, before any uptraining. Rank 0: plain ties; rank r > 0: SVD-started deltas and vector "
        f"offsets (`tie_lora_vectors`); rank {full_rank} is full. Mean ± 95% t-CI over seeds.\n\n"
        + md_table(table, ["u", "init", "rank", "n", "val", "d"],
                   ["u", "init", "delta rank", "seeds", "val bpc before uptraining", "vs teacher"])
    )
    write_results(args.output, name, payload, markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
