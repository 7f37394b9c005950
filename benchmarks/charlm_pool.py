"""Run many charlm.py cells at once on a big machine (a lent GPU, many cores), inside a time limit.

A *plan* (JSON) lists groups of cells; every (group, seed, row chain) becomes one ``charlm.py`` process
writing to its own scratch folder, ``--workers`` of them at a time, in plan order (so put what matters
most first). A row chain is rows joined by ``+`` that must run in one process in that order, e.g.
``greedy+final_map:greedy`` (the final-map row reads the map its source row just reached). After every
finished process its cells are appended to ``<output>/charlm_<stage>_u<budget>_cells.jsonl``, the same
file ``charlm.py`` writes and resumes from, so the table is built with ``charlm.py --summarize-only``.
At ``--deadline`` seconds the running processes are stopped (their cells are lost, every finished one is
kept) and the pool exits 0; rerunning the same plan skips cells already in the output files.

    python benchmarks/charlm_pool.py --plan benchmarks/plans/gpu.json --workers 14 --deadline 520 \\
        --device cuda --output /tmp/out
    python benchmarks/charlm_pool.py --plan benchmarks/plans/gpu.json --quick --workers 2 --output /tmp/q

Plan entries: ``{"stage": "gpu_confirm", "budget": 4, "steps": 2500, "seeds": [0, 1], "rows": ["untied8",
"greedy+final_map:greedy"], "sets": {"tie_mode": "follow"}, "tag": "follow"}``; ``{"snr": true, "budget": 4,
"steps": 1200, "seeds": [0]}`` runs the action-effect SNR probe, ``charlm_snr.py``, for the first seed
(its JSON is copied to the output). ``"family": "llama"`` runs the entry's cells on Llama blocks
(``charlm.py --family llama``; their files end in ``_llama``, so they never join a GPT-2 stage's file);
``"corpus": "wikitext2"`` trains them on WikiText-2 by byte (``charlm.py --corpus``; give it its own stage).
One log, ``<output>/charlm_pool_log.txt``, says what ran, how long, and the tail of every failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from charlm_cells import stage_name  # noqa: E402
from charlm_family import DEFAULT_FAMILY, FAMILIES  # noqa: E402

CHARLM = HERE / "charlm.py"
SNR_PROBE = HERE / "charlm_snr.py"


@dataclass
class Job:
    """One charlm.py process (a seed and a chain of rows of one plan group), or one charlm_snr.py process."""

    name: str
    stage: str
    budget: int
    steps: int
    seed: int
    rows: list[str]
    sets: dict[str, Any] = field(default_factory=dict)
    tag: str = ""
    snr: bool = False
    family: str = DEFAULT_FAMILY
    corpus: str = ""  # "": charlm.py's default corpus

    def cell_names(self) -> list[str]:
        suffix = f"_{self.tag}" if self.tag else ""
        return [r + suffix for r in self.rows]

    def cells_file(self, quick: bool) -> str:
        return f"{stage_name(self.stage, self.budget, quick, self.family)}_cells.jsonl"


def expand_plan(plan: list[dict[str, Any]]) -> list[Job]:
    """Jobs in plan order, seed-major inside a group (complete pairs first). Fails fast on a bad entry."""
    jobs: list[Job] = []
    for i, entry in enumerate(plan):
        unknown = set(entry) - {"stage", "budget", "steps", "seeds", "rows", "sets", "tag", "snr", "family",
                                  "corpus"}
        if unknown:
            raise SystemExit(f"charlm_pool: plan entry {i} has unknown keys {sorted(unknown)}")
        family = entry_family(entry, i)
        seeds = entry.get("seeds") or [0]
        if entry.get("snr"):
            jobs.append(Job(f"snr_u{entry['budget']}", "snr", entry["budget"], entry["steps"], seeds[0], [], snr=True))
            continue
        for seed in seeds:
            for chain in entry["rows"]:
                rows = chain.split("+")
                tag = entry.get("tag", "")
                fam = "" if family == DEFAULT_FAMILY else f"_{family}"
                name = f"{entry['stage']}_u{entry['budget']}{fam}_{'+'.join(rows)}{'_' + tag if tag else ''}_s{seed}"
                jobs.append(Job(name.replace(":", "-"), entry["stage"], entry["budget"], entry["steps"], seed, rows,
                                entry.get("sets", {}), tag, family=family, corpus=entry.get("corpus", "")))
    return jobs


def entry_family(entry: dict[str, Any], i: int) -> str:
    """The entry's block family (GPT-2 unless it says); the SNR probe builds GPT-2 blocks only."""
    family = entry.get("family", DEFAULT_FAMILY)
    if family not in FAMILIES:
        raise SystemExit(f"charlm_pool: plan entry {i} has family {family!r} (known: {', '.join(FAMILIES)})")
    if entry.get("snr") and family != DEFAULT_FAMILY:
        raise SystemExit(f"charlm_pool: plan entry {i}: the SNR probe builds {DEFAULT_FAMILY} blocks only")
    return family


def done_cells(path: Path) -> set[tuple[str, int]]:
    if not path.exists():
        return set()
    out = set()
    for line in path.read_text().splitlines():
        try:
            cell = json.loads(line)
        except json.JSONDecodeError:
            continue
        out.add((cell["row"], cell["seed"]))
    return out


def command(job: Job, args: argparse.Namespace, scratch: Path) -> list[str]:
    """The job's command line: one thread per process, its own scratch folder as the output."""
    if job.snr:
        cmd = [sys.executable, str(SNR_PROBE), "--budget", str(job.budget), "--steps", str(job.steps),
               "--seed", str(job.seed), "--output", str(scratch), "--threads", "1", "--device", args.device]
        return cmd + (["--quick"] if args.quick else [])
    cmd = [sys.executable, str(CHARLM), "--stage", job.stage, "--budget", str(job.budget), "--steps", str(job.steps),
           "--seeds", str(job.seed), "--output", str(scratch), "--runs-root", str(scratch / "runs"),
           "--threads", "1", "--device", args.device]
    if args.quick:
        cmd.append("--quick")
    if job.family != DEFAULT_FAMILY:  # GPT-2 command lines stay as they were
        cmd += ["--family", job.family]
    if job.corpus:
        cmd += ["--corpus", job.corpus]
    cmd += ["--rows", ",".join(job.rows)]
    for key, value in job.sets.items():
        cmd += ["--set", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    if job.tag:
        cmd += ["--tag", job.tag]
    return cmd


def collect(job: Job, args: argparse.Namespace, scratch: Path) -> int:
    """Append the job's new cells to the output cells file (or copy the SNR result); cells appended."""
    if job.snr:
        for src in scratch.glob("charlm_snr*.json"):
            shutil.copy(src, args.output / src.name)
        return 0
    name = job.cells_file(args.quick)
    src, dst = scratch / name, args.output / name
    if not src.exists():
        return 0
    have = done_cells(dst)
    added = 0
    with dst.open("a") as f:
        for line in src.read_text().splitlines():
            if not line.strip():
                continue
            cell = json.loads(line)
            if (cell["row"], cell["seed"]) not in have:
                f.write(line + "\n")
                added += 1
    return added


def log_line(log: TextIO, text: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {text}", flush=True)
    log.write(f"[{stamp}] {text}\n")
    log.flush()


def tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_pool(args: argparse.Namespace, jobs: list[Job]) -> int:
    args.output.mkdir(parents=True, exist_ok=True)
    scratch_root = args.scratch
    scratch_root.mkdir(parents=True, exist_ok=True)
    log = (args.output / "charlm_pool_log.txt").open("a")
    todo = []
    for job in jobs:
        have = done_cells(args.output / job.cells_file(args.quick))
        if job.snr and list(args.output.glob("charlm_snr*.json")):
            continue
        if not job.snr and all((c, job.seed) in have for c in job.cell_names()):
            continue
        todo.append(job)
    log_line(log, f"pool: {len(todo)} of {len(jobs)} jobs to run, {args.workers} workers, deadline {args.deadline}s, "
                  f"device {args.device}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    running: dict[str, tuple[Job, subprocess.Popen, float, Path]] = {}
    finished = failed = 0
    while todo or running:
        elapsed = time.monotonic() - start
        if elapsed > args.deadline:
            for name, (job, proc, t0, scratch) in running.items():
                proc.send_signal(signal.SIGTERM)
            for name, (job, proc, t0, scratch) in running.items():
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                added = collect(job, args, scratch)  # a chain may have finished some of its cells
                log_line(log, f"STOPPED at the deadline: {name} after {time.monotonic() - t0:.0f}s ({added} cells kept)")
            log_line(log, f"pool: deadline reached; {finished} jobs done, {failed} failed, {len(todo)} never started")
            return 0
        while todo and len(running) < args.workers:
            job = todo.pop(0)
            scratch = scratch_root / job.name
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(parents=True)
            out = (scratch / "log.txt").open("w")
            proc = subprocess.Popen(command(job, args, scratch), stdout=out, stderr=subprocess.STDOUT, env=env,
                                    cwd=HERE.parent, start_new_session=True)
            running[job.name] = (job, proc, time.monotonic(), scratch)
        for name in list(running):
            job, proc, t0, scratch = running[name]
            if proc.poll() is None:
                continue
            del running[name]
            added = collect(job, args, scratch)
            seconds = time.monotonic() - t0
            if proc.returncode == 0:
                finished += 1
                log_line(log, f"done {name}: {added} cells in {seconds:.0f}s")
            else:
                failed += 1
                log_line(log, f"FAILED {name} (exit {proc.returncode}, {added} cells kept) after {seconds:.0f}s:\n"
                              f"{tail(scratch / 'log.txt')}")
        time.sleep(0.5)
    log_line(log, f"pool: all jobs ended in {time.monotonic() - start:.0f}s; {finished} done, {failed} failed")
    return 0 if failed == 0 else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", type=Path, required=True, help="JSON list of plan entries (see above)")
    p.add_argument("--output", type=Path, required=True, help="where the merged cells files and the log go")
    p.add_argument("--workers", type=int, default=2, help="charlm.py processes at a time")
    p.add_argument("--deadline", type=float, default=float("inf"), help="seconds; then stop and keep what finished")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="charlm.py --quick for every job (the test)")
    p.add_argument("--scratch", type=Path, default=Path("/tmp/charlm_pool"), help="per-job folders")
    args = p.parse_args(argv)
    if args.workers < 1:
        raise SystemExit("charlm_pool: --workers must be at least 1")
    if not args.plan.exists():
        raise SystemExit(f"charlm_pool: no plan at {args.plan}")
    return run_pool(args, expand_plan(json.loads(args.plan.read_text())))


if __name__ == "__main__":
    sys.exit(main())
