"""Char-level Tiny Shakespeare evidence harness: tying rows at a fixed unique-layer budget, paired seeds.

The regime (docs/RESULTS.md, section 0): GPT-2 blocks (8 positions x d 64, 4 heads, dropout off), seq 128,
batch 16, character vocabulary (65), AdamW (0.9, 0.95), weight decay 0.01, lr 3e-3 cosine with 5% warm-up,
grad clip 1.0, 90/10 train/held-out split. The held-out 10% holds a fixed *validation* slice (its first 256
non-overlapping 128-char blocks: curves, final score, and whatever a policy scores maps on) and a fixed
*test* slice (its last 256 blocks), evaluated once at the end of each cell. Nothing is chosen on test.

One *cell* = one (row, seed). Every cell of one seed is paired with the others:

- data: ``max_steps * batch`` random 128-char training windows, offsets drawn from
  ``torch.Generator().manual_seed(seed)`` and fed in that order (sequential sampler), identical across rows;
- init: ``torch.manual_seed(seed)`` right before the model is built, so every 8-position row of one seed
  starts from the same weights (the tie map is applied afterwards by the trainer).

``--family llama`` trains ``DynTieLlamaForCausalLM`` blocks of the same size instead (RoPE, RMSNorm, SwiGLU
at matched parameters per layer: ``charlm_family.py``). Its files are ``charlm_<stage>_u<budget>_llama*``, so
a cells file, a summary and a pairing never mix families; resuming or summarising a file that holds another
family's cells stops with one line. ``--corpus wikitext2`` trains on WikiText-2 by byte instead (vocabulary 256,
``valid.txt`` trains, ``test.txt`` holds the validation and test blocks: ``data.load_chars``); the scores are
then bits per byte, and a stage never mixes corpora.

Cells are appended (one JSON line each, flushed) to ``charlm_<stage>_u<budget>_cells.jsonl`` as they finish;
a restart skips the cells already there, so a killed run loses at most the cell in progress. The summary
(``charlm_<stage>_u<budget>.json`` / ``.md`` and plots) is rebuilt from that file after every cell and by
``--summarize-only``: mean +- 95% Student-t CI per row and *paired* (same-seed) differences to ``untied8`` and
to the best static-u row.

    python benchmarks/charlm.py --stage spread --rows untied8,untied_u --seeds 0,1,2,3,4 --steps 1200
    python benchmarks/charlm.py --stage screen --rows greedy --set tie_interval=64 --tag i64 --seeds 0,1
    python benchmarks/charlm.py --stage screen --rows dlt_parity,final_map:dlt_parity --seeds 0,1
    python benchmarks/charlm.py --stage screen --summarize-only
    python benchmarks/charlm.py --quick --output /tmp/c --rows untied8,sequence_u --seeds 0,1   # seconds
    python benchmarks/charlm.py --quick --family llama --output /tmp/l --rows untied8,grow_sequence --seeds 0
    python benchmarks/charlm_snr.py      # the action-effect SNR probe in this regime (its own script)

Rows (``ROWS``; ``u`` = ``--budget``): untied8, untied_u, untied_u_walltime (steps x 8/u), sequence_u,
sequence_u_plus1 (u + 1 unique layers: the row relaxed ties, ``--set tie_lora_rank=r``, are measured against), cycle_u,
cycle_rev_u, grow_sequence, grow_spread (grow ending on cycle_u), grow_scored, greedy, random_u, dlt_parity, dlt_improved, dlt_paired, and
``final_map:<row>`` (the final map ``<row>`` reached for the same seed, retrained from scratch as a static
map; share mode unless ``--set tie_mode=follow``). ``--set key=value`` adds tie_*/trainer overrides to every
row of the invocation and ``--tag`` suffixes their names (``greedy_i64``), so variants live side by side.

Run with ``OMP_NUM_THREADS=1`` and ``--threads 1`` on a shared CPU. Run folders are scratch, under
``/tmp/charlm_runs``. The parts: ``charlm_rows.py`` (rows, regime, FLOPs), ``charlm_cell.py`` (one cell),
``charlm_cells.py`` (the cells file), ``charlm_summary.py`` (tables, plots), ``charlm_family.py`` (GPT-2 or
Llama blocks), ``data.py``, ``stats.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from charlm_cell import RUNS_ROOT, HarnessError, check_cell_options, final_map_of, run_cell  # noqa: E402
from charlm_cells import append_cell, check_one_family, read_cells, stage_name  # noqa: E402
from charlm_family import DEFAULT_FAMILY, FAMILIES, family_hparams, parameter_line  # noqa: E402
from charlm_rows import (  # noqa: E402
    FINAL_MAP, POSITIONS, QUICK, QUICK_EVAL_EVERY, QUICK_STEPS, REGIME, ROWS, check_row_name, flops_per_step,
    parse_sets, resolve_row,
)
from charlm_summary import write_summary  # noqa: E402
from common import DEFAULT_OUTPUT, machine_info, report_failure, set_threads  # noqa: E402
from data import CHAR_CORPORA, load_chars  # noqa: E402

Plan = list[tuple[str, str, int, dict[str, Any]]]  # (cell name, requested row, seed, resolved row)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="untied8,untied_u", help="comma-separated rows: " + ", ".join(ROWS) + ", final_map:<row>")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    p.add_argument("--steps", type=int, default=1200, help="base optimizer steps (rows may multiply them)")
    p.add_argument("--budget", type=int, default=4, help="unique-layer budget u (1..8)")
    p.add_argument("--stage", default="screen", help="names the output files: charlm_<stage>_u<budget>*")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where cells train (cuda: one GPU; cells of one stage must not mix devices)")
    p.add_argument("--corpus", default=CHAR_CORPORA[0], choices=CHAR_CORPORA,
                   help="shakespeare: Tiny Shakespeare by character (section 0); wikitext2: WikiText-2 by byte")
    p.add_argument("--family", default=DEFAULT_FAMILY, choices=FAMILIES,
                   help="block family: gpt2 (every stored cell) or llama (same size, matched parameters per "
                        "layer; its files end in _llama)")
    p.add_argument("--eval-every", type=int, default=100, help="validation curve interval (steps)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="extra DynTieTrainingArguments override for every row of this run (repeatable)")
    p.add_argument("--tag", default="", help="suffix of the row names of this run (variants: greedy_<tag>)")
    p.add_argument("--map-source", type=Path, default=None,
                   help="cells file final_map:<row> takes its maps from (default: this stage's cells file)")
    p.add_argument("--summarize-only", action="store_true", help="rebuild the summary from the cells file")
    p.add_argument("--quick", action="store_true", help="tiny model, slices and steps (seconds; for the test)")
    p.add_argument("--runs-root", type=Path, default=RUNS_ROOT, help="scratch trainer folders (outside the repo)")
    args = p.parse_args(argv)
    if not 1 <= args.budget <= POSITIONS:
        raise SystemExit(f"charlm: --budget must lie in 1..{POSITIONS}, got {args.budget}")
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"charlm: --seeds must be comma-separated integers, got {args.seeds!r}") from None
    args.row_list = [r.strip() for r in args.rows.split(",") if r.strip()]
    for r in args.row_list:
        check_row_name(r)
    args.set_dict = parse_sets(args.sets)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("charlm: --device cuda, but torch sees no CUDA device")
    if args.quick:
        args.steps, args.eval_every = QUICK_STEPS, QUICK_EVAL_EVERY
    return args


def check_resumable(cells: list[dict[str, Any]], args: argparse.Namespace, cells_path: Path) -> None:
    """A stage's cells must share the family, corpus, steps, quick and device (cells written before ``--device``,
    ``--family`` and ``--corpus`` existed ran GPT-2 on Tiny Shakespeare on the CPU): otherwise their pairs would
    compare unlike runs."""
    check_one_family(cells, cells_path, args.family)
    for c in cells:
        h = c.get("hparams", {})
        if h.get("corpus", CHAR_CORPORA[0]) != args.corpus:
            raise SystemExit(f"charlm: {cells_path} holds cells trained on {h.get('corpus', CHAR_CORPORA[0])}; this "
                             f"run asks --corpus {args.corpus}: use another --stage")
        if h.get("steps") != args.steps or h.get("quick") != args.quick or h.get("device", "cpu") != args.device:
            raise SystemExit(f"charlm: {cells_path} holds cells with steps={h.get('steps')} quick={h.get('quick')} "
                             f"device={h.get('device', 'cpu')}; this run asks steps={args.steps} quick={args.quick} "
                             f"device={args.device}: use another --stage")


def plan_cells(args: argparse.Namespace, regime: dict[str, Any], done: set[tuple[str, int]]) -> tuple[Plan, list[str]]:
    """The cells still to run, seed-major (complete pairs come first), and the ones whose options the trainer
    refuses (checked once per row, reported, skipped)."""
    suffix = f"_{args.tag}" if args.tag else ""
    plan: Plan = []
    failed: list[str] = []
    checked: dict[str, str | None] = {}
    for seed in args.seed_list:
        for row_name in args.row_list:
            cell_name = row_name + suffix
            if (cell_name, seed) in done:
                continue
            row = resolve_row(row_name, args.budget, args.steps, args.set_dict)
            if row_name not in checked:
                try:
                    check_cell_options(row, regime, args.eval_every)
                    checked[row_name] = None
                except HarnessError as error:
                    checked[row_name] = str(error)
            if checked[row_name]:
                failed.append(f"{cell_name} seed {seed}: {checked[row_name]}")
                print(f"charlm: SKIP {cell_name} seed {seed}: {checked[row_name]}", flush=True)
                continue
            plan.append((cell_name, row_name, seed, row))
    return plan, failed


def run_plan(plan: Plan, args: argparse.Namespace, ctx: dict[str, Any], cells_path: Path, name: str,
             meta: dict[str, Any]) -> list[str]:
    """Run the cells one by one, appending each and re-summarising; one broken cell never stops the others.
    The cells that did not run."""
    failed: list[str] = []
    for cell_name, row_name, seed, row in plan:
        try:
            if row_name.startswith(FINAL_MAP):
                source = row_name[len(FINAL_MAP):]
                row["source_map"] = final_map_of(source, seed, read_cells(args.map_source or cells_path))
            cell = run_cell(cell_name, seed, row, ctx)
        except HarnessError as error:
            failed.append(f"{cell_name} seed {seed}: {error}")
            print(f"charlm: SKIP {cell_name} seed {seed}: {error}", flush=True)
            continue
        except Exception as error:
            report_failure("charlm", f"{cell_name} seed {seed}", error, failed)
            continue
        append_cell(cells_path, cell)
        print(f"charlm: {cell_name} seed {seed}: val {cell['val_bpc']:.4f} bpc, test {cell['test_bpc']:.4f} bpc, "
              f"unique {cell['mean_unique_layers']:.2f}/{cell['final_unique_layers']}, train {cell['train_seconds']:.0f}s "
              f"({cell['seconds_per_step']:.3f} s/step)", flush=True)
        write_summary(cells_path, args.output, name, meta)
    return failed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # fails fast: unknown row, bad budget
    regime = QUICK if args.quick else REGIME
    name = stage_name(args.stage, args.budget, args.quick, args.family)
    cells_path = args.output / f"{name}_cells.jsonl"
    data = load_chars(regime, args.corpus)  # SystemExit "SKIP: ..." when the data file is missing
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    set_threads(args.threads)
    hparams = {"steps": args.steps, "budget": args.budget, "eval_every": args.eval_every, "quick": args.quick,
               "device": args.device, "corpus": args.corpus,
               **{k: v for k, v in regime.items()}, **family_hparams(args.family, regime)}
    meta = {"stage": args.stage, "corpus": args.corpus, "budget": args.budget, "steps": args.steps,
            "eval_every": args.eval_every,
            "regime": regime, "family": family_hparams(args.family, regime), "vocab_size": data["vocab_size"],
            "train_chars": len(data["train"]),
            "held_out_blocks": data["held_blocks"], "threads": args.threads, "quick": args.quick,
            "flops_formula": flops_per_step.__doc__}
    if args.summarize_only:
        write_summary(cells_path, args.output, name, meta)
        return 0

    if args.family != DEFAULT_FAMILY:
        print(f"charlm: {parameter_line(regime)}", flush=True)
    done_cells = read_cells(cells_path)
    check_resumable(done_cells, args, cells_path)
    if args.map_source:  # final_map rows must not retrain another family's maps
        check_one_family(read_cells(args.map_source), args.map_source, args.family)
    done = {(c["row"], c["seed"]) for c in done_cells}
    plan, failed = plan_cells(args, regime, done)
    print(f"charlm: {name}: {len(done)} cells done, {len(plan)} to run -> {cells_path}", flush=True)
    ctx = {"regime": regime, "family": args.family, "data": data, "eval_every": args.eval_every, "hparams": hparams,
           "device": args.device, "machine": machine_info(),
           "runs_root": args.runs_root / name}
    failed += run_plan(plan, args, ctx, cells_path, name, meta)
    if failed:
        print("charlm: cells not run:\n  " + "\n  ".join(failed), flush=True)
        return 1
    if not plan and cells_path.exists():
        print("charlm: nothing to do (all requested cells are in the cells file)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
