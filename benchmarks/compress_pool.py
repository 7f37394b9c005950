"""Run a compression plan: ``compress.py`` processes, one per (plan entry, seed), ``--workers`` at a time.

A plan (JSON) is a list of entries ``{"budget": 4, "pretrain_steps": 2500, "uptrain_steps": 500, "seeds":
[0, 1, 2, 3, 4], "rows": [...]}`` (``rows`` defaults to every plan row, ``uptrain_steps`` to 20% of P). Jobs
start in plan order, seed-major inside an entry, so a stopped run leaves complete seeds and the first budget
before the second. Every process writes straight into the output's cells file (``compress.py`` appends under
a lock) and reuses the seed's teacher from ``--runs-root`` (a lock there keeps two processes of one seed from
training it twice), so nothing needs merging and a rerun skips what is done. Its own log is
``<output>/compress_pool_log.txt``; each process's output goes to ``<runs-root>/logs/<job>.txt``. This is
not ``charlm_pool.py``: that one merges per-job scratch folders and appends to the charlm log.

    python benchmarks/compress.py --plan benchmarks/plans/compress_cpu.json --workers 2 --output docs/results
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from charlm_cells import read_cells
from compress_rows import PLAN_ROWS, UPTRAIN_FRACTION, check_row_name

HERE = Path(__file__).resolve().parent
ENTRY_KEYS = {"budget", "pretrain_steps", "uptrain_steps", "seeds", "rows"}


@dataclass
class Job:
    """One ``compress.py`` process: every row of one plan entry for one seed."""

    budget: int
    pretrain: int
    uptrain: int
    seed: int
    rows: list[str]

    @property
    def name(self) -> str:
        return f"u{self.budget}_P{self.pretrain}_U{self.uptrain}_s{self.seed}"


def expand_plan(plan: list[dict[str, Any]]) -> list[Job]:
    """Jobs in plan order, seed-major inside an entry; fails fast (one line) on a bad entry."""
    jobs = []
    for i, entry in enumerate(plan):
        unknown = set(entry) - ENTRY_KEYS
        if unknown or "budget" not in entry or "pretrain_steps" not in entry:
            raise SystemExit(f"compress_pool: plan entry {i} needs budget and pretrain_steps, may have "
                             f"{sorted(ENTRY_KEYS)}; got {sorted(entry)}")
        rows = entry.get("rows") or PLAN_ROWS
        for r in rows:
            check_row_name(r)
        pretrain = int(entry["pretrain_steps"])
        uptrain = int(entry.get("uptrain_steps") or max(1, round(UPTRAIN_FRACTION * pretrain)))
        jobs += [Job(int(entry["budget"]), pretrain, uptrain, int(s), list(rows)) for s in entry.get("seeds", [0])]
    return jobs


def command(job: Job, args: argparse.Namespace) -> list[str]:
    """The job's ``compress.py`` line: one thread, the pool's output and runs root."""
    cmd = [sys.executable, str(HERE / "compress.py"), "--budgets", str(job.budget), "--seeds", str(job.seed),
           "--pretrain-steps", str(job.pretrain), "--uptrain-steps", str(job.uptrain), "--rows", ",".join(job.rows),
           "--output", str(args.output.resolve()), "--runs-root", str(args.runs_root.resolve()), "--threads", "1",
           "--family", args.family, "--eval-every", str(args.eval_every), "--shrink-until", str(args.shrink_until)]
    return cmd + (["--quick"] if args.quick else [])


def is_done(job: Job, args: argparse.Namespace) -> bool:
    """Every cell of the job is in the output's cells file already."""
    from compress import stage_name

    cells = read_cells(args.output / f"{stage_name(job.budget, args.quick, args.family)}_cells.jsonl")
    done = {(c["row"], c["seed"]) for c in cells}
    return all((r, job.seed) in done for r in job.rows)


def log_line(log: TextIO, text: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {text}", flush=True)
    log.write(f"[{stamp}] {text}\n")
    log.flush()


def run_plan(args: argparse.Namespace) -> int:
    """Run the plan's unfinished jobs, ``args.workers`` at a time; 0 when every job exited cleanly."""
    if not args.plan.exists():
        raise SystemExit(f"compress_pool: no plan at {args.plan}")
    if args.workers < 1:
        raise SystemExit("compress_pool: --workers must be at least 1")
    jobs = expand_plan(json.loads(args.plan.read_text()))
    todo = [job for job in jobs if not is_done(job, args)]
    args.output.mkdir(parents=True, exist_ok=True)
    logs = args.runs_root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    failed = 0
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    with (args.output / "compress_pool_log.txt").open("a") as log:
        log_line(log, f"pool: {len(todo)} of {len(jobs)} jobs to run, {args.workers} workers, plan {args.plan}")
        start = time.monotonic()
        while todo or running:
            while todo and len(running) < args.workers:
                job = todo.pop(0)
                out = (logs / f"{job.name}.txt").open("w")
                running[job.name] = (subprocess.Popen(command(job, args), stdout=out, stderr=subprocess.STDOUT,
                                                      env=env, cwd=HERE.parent), time.monotonic())
                log_line(log, f"start {job.name}")
            for name in list(running):
                proc, t0 = running[name]
                if proc.poll() is None:
                    continue
                del running[name]
                failed += proc.returncode != 0
                state = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}; {logs / name}.txt)"
                log_line(log, f"{state} {name} after {time.monotonic() - t0:.0f}s")
            time.sleep(1.0)
        log_line(log, f"pool: all jobs ended in {time.monotonic() - start:.0f}s; {failed} failed")
    return 0 if failed == 0 else 1
