"""Compress a pretrained model: the evidence of issue 23, part 4 (the table a user reads before choosing).

In the char-level regime of docs/RESULTS.md section 0 (``charlm_rows.REGIME``): pretrain the untied 8-layer
model for ``P`` steps (the *teacher*, trained once per seed and saved; ``compress_teacher.py``), then reach u
unique layers from it by one-shot ``root`` / ``average`` / ``average`` + SVD deltas, or progressive ``shrink``
(``sequence`` / ``scored`` order, with and without SVD deltas), each uptrained ``U`` steps (default 20% of P)
on the same windows; against the teacher, the same tied architecture trained from scratch for ``P + U`` steps,
an untied u-layer model trained from scratch for ``P + U`` steps, and an untied u-layer student distilled
from the teacher for ``U`` steps. Rows: ``compress_rows.py``.

Uptraining runs the regime's schedule over its ``U`` steps (5% warm-up to lr 3e-3, cosine to 0), the same for
every derived row (not tuned for uptraining: a lower peak may suit them all). The teacher, the derived rows'
windows and the from-scratch rows' windows are one seeded stream (``compress_train.stream``), so every row of
a seed is paired with the others on data, and the derived rows on their starting weights.

One *cell* = one (row, seed) at one budget. Cells are appended (one JSON line each, under a lock) to
``compress_u<u>_cells.jsonl`` as they finish; a restart skips the cells already there, and the teacher's
weights are reused if saved, so a killed run loses at most the cell in progress. The summary
(``compress_u<u>.json`` / ``.md``, ``compress_summary.py``) is rebuilt after every cell and by
``--summarize-only``: mean +- 95% t-CI, paired differences to the teacher and to ``scratch_tied``, the best
teacher-derived row chosen on validation (test reported, never chosen on).

    python benchmarks/compress.py --budgets 4,2 --seeds 0,1,2,3,4                    # the whole stage, in order
    python benchmarks/compress.py --plan benchmarks/plans/compress_cpu.json --workers 2  # compress_pool.py
    python benchmarks/compress.py --budgets 4 --summarize-only
    python benchmarks/compress.py --quick --output /tmp/c --runs-root /tmp/c/runs --seeds 0   # a minute

Run with ``OMP_NUM_THREADS=1`` and ``--threads 1`` on a shared CPU. Trainer folders and teachers are under
``--runs-root`` (default ``/tmp/compress_runs``; a teacher is reused from there). The parts:
``compress_rows.py`` (rows, ranks), ``compress_teacher.py``, ``compress_train.py`` (training, distillation),
``compress_cell.py`` (one cell), ``compress_summary.py``, ``compress_pool.py`` (a plan in parallel).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from charlm_cells import append_cell, read_cells  # noqa: E402
from charlm_family import DEFAULT_FAMILY, FAMILIES, family_hparams  # noqa: E402
from charlm_rows import QUICK, REGIME  # noqa: E402
from common import DEFAULT_OUTPUT, machine_info, report_failure, set_threads  # noqa: E402
from compress_rows import (  # noqa: E402
    PLAN_ROWS, POSITIONS, QUICK_EVAL_EVERY, QUICK_PRETRAIN, QUICK_UPTRAIN, SHRINK_UNTIL, UPTRAIN_FRACTION,
    check_row_name, resolve_row,
)

RUNS_ROOT = Path("/tmp/compress_runs")
IDENTITY_KEYS = ("pretrain_steps", "uptrain_steps", "shrink_until", "quick", "family", "embd")


def stage_name(budget: int, quick: bool, family: str = DEFAULT_FAMILY) -> str:
    """``compress[_quick]_u<u>[_<family>]``: the stem of a stage's files (one budget, one family)."""
    name = f"compress{'_quick' if quick else ''}_u{budget}"
    return name if family == DEFAULT_FAMILY else f"{name}_{family}"


def int_list(text: str, what: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"compress: {what} must be comma-separated integers, got {text!r}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default="4", help="comma-separated unique-layer budgets u, run in this order")
    p.add_argument("--rows", default=",".join(PLAN_ROWS), help="comma-separated rows (compress_rows.ROWS)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (seed-major inside each budget)")
    p.add_argument("--pretrain-steps", type=int, default=2500, help="P: the teacher's steps")
    p.add_argument("--uptrain-steps", type=int, default=None,
                   help=f"U: steps after the teacher (default {UPTRAIN_FRACTION * 100:.0f}%% of P)")
    p.add_argument("--shrink-until", type=float, default=SHRINK_UNTIL,
                   help="shrink rows: last merge at this fraction of U")
    p.add_argument("--family", default=DEFAULT_FAMILY, choices=FAMILIES)
    p.add_argument("--eval-every", type=int, default=100, help="validation curve interval (steps)")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument("--runs-root", type=Path, default=RUNS_ROOT, help="teachers and trainer scratch (outside the repo)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help=f"tiny model, P={QUICK_PRETRAIN}, U={QUICK_UPTRAIN} (the test)")
    p.add_argument("--summarize-only", action="store_true", help="rebuild the summaries from the cells files")
    p.add_argument("--plan", type=Path, default=None, help="run a plan file in parallel (compress_pool.py)")
    p.add_argument("--workers", type=int, default=1, help="with --plan: processes at a time")
    args = p.parse_args(argv)
    args.budget_list = int_list(args.budgets, "--budgets")
    args.seed_list = int_list(args.seeds, "--seeds")
    args.row_list = [r.strip() for r in args.rows.split(",") if r.strip()]
    for r in args.row_list:
        check_row_name(r)
    if any(not 1 <= u < POSITIONS for u in args.budget_list):
        raise SystemExit(f"compress: --budgets must lie in 1..{POSITIONS - 1}, got {args.budgets}")
    if args.quick:
        args.pretrain_steps, args.eval_every = QUICK_PRETRAIN, QUICK_EVAL_EVERY
        args.uptrain_steps = args.uptrain_steps or QUICK_UPTRAIN
    if args.uptrain_steps is None:
        args.uptrain_steps = max(1, round(UPTRAIN_FRACTION * args.pretrain_steps))
    return args


def stage_context(args: argparse.Namespace, budget: int, data: dict[str, Any]) -> dict[str, Any]:
    """Everything a cell of one budget needs: regime, data, the identity of its cells (hparams), paths."""
    regime = QUICK if args.quick else REGIME
    name = stage_name(budget, args.quick, args.family)
    hparams = {"pretrain_steps": args.pretrain_steps, "uptrain_steps": args.uptrain_steps, "budget": budget,
               "shrink_until": args.shrink_until, "eval_every": args.eval_every, "quick": args.quick,
               "device": "cpu", **regime, **family_hparams(args.family, regime)}
    meta = {"budget": budget, "pretrain_steps": args.pretrain_steps, "uptrain_steps": args.uptrain_steps,
            "shrink_until": args.shrink_until, "regime": regime, "family": args.family,
            "vocab_size": data["vocab_size"], "train_chars": len(data["train"]), "quick": args.quick,
            "threads": args.threads}
    return {"regime": regime, "data": data, "eval_every": args.eval_every, "hparams": hparams, "meta": meta,
            "budget": budget, "stage": name, "machine": machine_info(), "runs_root": args.runs_root,
            "cells_path": args.output / f"{name}_cells.jsonl", "lock": args.runs_root / "locks" / f"{name}.lock"}


def check_resumable(cells: list[dict[str, Any]], ctx: dict[str, Any]) -> None:
    """A stage's cells must share P, U, the shrink schedule, quick, family and width: else pairs would
    compare unlike runs (use another --output)."""
    want = {k: ctx["hparams"][k] for k in IDENTITY_KEYS}
    for c in cells:
        have = {k: c["hparams"].get(k) for k in IDENTITY_KEYS}
        if have != want:
            raise SystemExit(f"compress: {ctx['cells_path']} holds cells with {have}; this run asks {want}")


def record(cell: dict[str, Any], ctx: dict[str, Any]) -> None:
    """Append the cell (unless another process just did) and rebuild the summary, under the stage's lock."""
    from compress_summary import write_summary
    from compress_teacher import file_lock

    with file_lock(ctx["lock"]):
        done = {(c["row"], c["seed"]) for c in read_cells(ctx["cells_path"])}
        if (cell["row"], cell["seed"]) not in done:
            append_cell(ctx["cells_path"], cell)
        write_summary(ctx["cells_path"], ctx["cells_path"].parent, ctx["stage"], ctx["meta"])


def run_stage(args: argparse.Namespace, ctx: dict[str, Any]) -> list[str]:
    """Every missing (seed, row) cell of one budget, seed-major; one broken cell never stops the others.
    The cells that did not run."""
    from compress_cell import run_cell

    done_cells = read_cells(ctx["cells_path"])
    check_resumable(done_cells, ctx)
    done = {(c["row"], c["seed"]) for c in done_cells}
    todo = [(s, r) for s in args.seed_list for r in args.row_list if (r, s) not in done]
    print(f"compress: {ctx['stage']}: {len(done)} cells done, {len(todo)} to run -> {ctx['cells_path']}", flush=True)
    failed = []
    for seed, name in todo:
        row = resolve_row(name, ctx["budget"], args.pretrain_steps, args.uptrain_steps, args.family, ctx["regime"],
                          args.shrink_until)
        try:
            cell = run_cell(row, seed, ctx)
        except Exception as error:
            report_failure("compress", f"{ctx['stage']} {name} seed {seed}", error, failed)
            continue
        record(cell, ctx)
        start = "" if cell["val_bpc_start"] is None else f"start {cell['val_bpc_start']:.4f}, "
        print(f"compress: {ctx['stage']} {name} seed {seed}: {start}val {cell['val_bpc']:.4f}, test "
              f"{cell['test_bpc']:.4f} bpc, unique {cell['final_unique_layers']}, "
              f"{cell['seconds_per_step']:.3f} s/step", flush=True)
    return failed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # fails fast: unknown row, bad budget
    if args.plan is not None:
        from compress_pool import run_plan

        return run_plan(args)
    from data import load_chars

    data = load_chars(QUICK if args.quick else REGIME)  # SystemExit "SKIP: ..." when the data file is missing
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    set_threads(args.threads)
    failed: list[str] = []
    for budget in args.budget_list:
        ctx = stage_context(args, budget, data)
        if args.summarize_only:
            from compress_summary import write_summary

            write_summary(ctx["cells_path"], args.output, ctx["stage"], ctx["meta"])
            continue
        failed += run_stage(args, ctx)
    if failed:
        print("compress: cells not run:\n  " + "\n  ".join(failed), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
