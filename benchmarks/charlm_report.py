"""The evidence tables of docs/RESULTS.md and the README, rendered from the charlm cells and summaries, so no
number in them is typed by hand.

Each stage's cells are summarised by the harness first (``charlm.py --summarize-only --stage S --budget U
--steps N``). Then this script prints every table and the paired comparisons quoted in the text, and with
``--write`` replaces the text between ``<!-- table:<name> -->`` and ``<!-- /table:<name> -->`` in
docs/RESULTS.md (one per stage) and between ``<!-- readme-table -->`` markers in the README (the headline
stage, ``--headline``).

    python benchmarks/charlm_report.py                 # print
    python benchmarks/charlm_report.py --write         # and update RESULTS.md / README.md

The 1,200-step CPU screen was merged from the per-sitting cell files of its sittings:
``cat docs/results/charlm_{spread,screenb,screenc,screend}_u4_cells.jsonl > docs/results/charlm_screen_u4_cells.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from charlm_cells import by_row, check_one_family, read_cells  # noqa: E402
from compress_start import results_table as start_table  # noqa: E402
from compress_summary import comparisons as compress_comparisons  # noqa: E402
from compress_summary import results_table  # noqa: E402
from stats import fmt_ci, fmt_diff, paired  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results"
STAGES = ["charlm_gpu_confirm_u4", "charlm_gpu_long_u4", "charlm_gpu_screen_u2", "charlm_screen_u4", "charlm_relaxed_u4",
          "charlm_relaxed_confirm_u4", "charlm_u2_confirm_u2", "charlm_wt2_short_u4", "charlm_wt2_long_u4",
          "charlm_confirm_u4_llama"]
COMPRESS_STAGES = ["compress_u4", "compress_u2"]  # issue 23.4: compress_summary.results_table
# the regimes the default is chosen across (issue 25.4): (stage, corpus and run length), in the order shown
REGIMES = [("charlm_screen_u4", "Tiny Shakespeare by char, 1,200 steps"),
           ("charlm_gpu_confirm_u4", "Tiny Shakespeare by char, 2,500 steps"),
           ("charlm_wt2_short_u4", "WikiText-2 by byte, 1,200 steps"),
           ("charlm_wt2_long_u4", "WikiText-2 by byte, 3,000 steps")]
STATIC_ROWS = ("sequence_u", "cycle_u", "cycle_rev_u")
GROW_CANDIDATES = ("grow_sequence_g25", "grow_sequence_g10", "grow_spread_g25")
HEADLINE = "charlm_gpu_confirm_u4"
REFERENCE = "sequence_u"  # the best static row of every stage (chosen on validation by the harness)
# a stage's own further reference, as two more columns (val, test): relaxed ties against the same parameters
# spent on one more unique layer
EXTRA_REFERENCE = {"charlm_relaxed_u4": "sequence_u_plus1", "charlm_relaxed_confirm_u4": "sequence_u_plus1"}

ORDER = ["untied8", "untied_u", "untied_u_walltime", "sequence_u", "sequence_u_plus1", "sequence_u_r12",
         "sequence_u_r4", "cycle_u", "cycle_rev_u", "grow_sequence", "grow_sequence_g25", "grow_sequence_g25_r12",
         "grow_sequence_g25_r8", "grow_sequence_g25_r16", "sequence_u_r8", "grow_sequence_g10", "grow_spread_g25",
         "grow_sequence_g25_r10", "grow_scored", "greedy", "greedy_follow", "final_map:greedy", "random_u", "dlt_parity",
         "dlt_improved", "dlt_paired"]
LABEL = {
    "untied8": "untied, 8 layers", "untied_u": "untied, {u} layers (equal steps)",
    "untied_u_walltime": "untied, {u} layers, equal wall-time ({m}x steps)", "sequence_u": "static `sequence`, u={u}",
    "sequence_u_plus1": "static `sequence`, one more unique layer (u={u1})",
    "sequence_u_r12": "static `sequence`, u={u}, relaxed ties rank 12 (= one layer's parameters)",
    "sequence_u_r4": "static `sequence`, u={u}, relaxed ties rank 4",
    "sequence_u_r8": "static `sequence`, u={u}, relaxed ties rank 8 (= one layer's parameters at u=2)",
    "grow_sequence_g25_r8": "`grow`, order `sequence`, until 0.25, relaxed ties rank 8 (one layer's parameters)",
    "grow_sequence_g25_r16": "`grow`, order `sequence`, until 0.25, relaxed ties rank 16 (two layers' parameters)",
    "grow_sequence_g25_r12": "`grow`, order `sequence`, until 0.25, relaxed ties rank 12",
    "cycle_u": "static `cycle`, u={u}", "cycle_rev_u": "static `cycle_rev`, u={u}",
    "grow_sequence": "`grow`, order `sequence`, until 0.5", "grow_sequence_g25": "`grow`, order `sequence`, until 0.25",
    "grow_sequence_g10": "`grow`, order `sequence`, until 0.1",
    "grow_sequence_g25_r10": "`grow`, order `sequence`, until 0.25, relaxed ties rank 10 (one Llama layer's parameters)",
    "grow_spread_g25": "`grow`, order `spread` (ends on `cycle`), until 0.25",
    "grow_scored": "`grow`, order `scored`, until 0.5", "greedy": "`greedy`, budget {u}, interval 100",
    "greedy_follow": "`greedy`, follow mode", "final_map:greedy": "greedy's final map, retrained static from scratch",
    "random_u": "`random`, budget {u}", "dlt_parity": "DLT paper-parity agent (no budget)",
    "dlt_improved": "DLT improved agent (no budget)", "dlt_paired": "Q-learning, paired reward, budget {u}, interval 32",
}
# the comparisons the text quotes, per stage (validation and test)
PAIRS = [("grow_sequence_g25", "sequence_u"), ("grow_sequence_g25", "untied8"), ("greedy", "sequence_u"),
         ("greedy", "untied8"), ("greedy", "grow_sequence_g25"), ("grow_scored", "sequence_u"),
         ("final_map:greedy", "sequence_u"), ("greedy", "final_map:greedy"), ("greedy_follow", "greedy"),
         ("untied8", "untied_u"), ("sequence_u", "untied_u"), ("untied_u_walltime", "untied8"),
         ("dlt_paired", "dlt_parity"), ("grow_sequence", "sequence_u"), ("sequence_u_r12", "sequence_u_plus1"),
         ("sequence_u_r12", "sequence_u"), ("sequence_u_r4", "sequence_u"), ("sequence_u_plus1", "sequence_u"),
         ("grow_sequence_g25_r12", "grow_sequence_g25"), ("grow_sequence_g25_r12", "sequence_u_plus1"),
         ("grow_sequence_g25_r8", "untied8"), ("grow_sequence_g25_r16", "untied8"), ("sequence_u_r8", "untied8"),
         ("grow_sequence_g25_r8", "sequence_u"), ("grow_sequence_g25_r16", "sequence_u"), ("sequence_u_r8", "sequence_u"),
         ("grow_sequence_g25_r16", "grow_sequence_g25"), ("cycle_u", "sequence_u"), ("cycle_rev_u", "sequence_u"),
         ("grow_sequence_g25", "cycle_u"), ("grow_sequence_g10", "sequence_u"), ("grow_sequence_g10", "grow_sequence_g25"),
         ("grow_spread_g25", "cycle_u"), ("grow_spread_g25", "sequence_u"), ("grow_spread_g25", "grow_sequence_g25"),
         ("grow_sequence_g25_r10", "untied8"), ("grow_sequence_g25_r10", "grow_sequence_g25")]


def diff(cells: dict, a: str, b: str, key: str = "val_bpc") -> str:
    """Row a minus row b, paired by seed, with the number of seeds."""
    if a not in cells or b not in cells:
        return "not run"
    s = paired(cells[a], cells[b], key)
    if s is None:
        return "no common seed"
    return fmt_diff(s, with_n=True)


def load(name: str) -> tuple[dict[str, Any], dict[str, dict], dict]:
    summary = json.loads((OUT / f"{name}.json").read_text())
    cells = read_cells(OUT / f"{name}_cells.jsonl")
    check_one_family(cells, OUT / f"{name}_cells.jsonl")  # never pair a Llama cell with a GPT-2 one
    return summary, {r["row"]: r for r in summary["rows"]}, by_row(cells)


def label(name: str, summary: dict[str, Any]) -> str:
    u = summary["meta"]["budget"]
    return LABEL[name].format(u=u, u1=u + 1, m=f"{8 / u:g}")


def stage_table(name: str) -> str:
    summary, rows, cells = load(name)
    extra = EXTRA_REFERENCE.get(name)
    extra_head = f" Δ val vs {label(extra, summary)} | Δ test vs it |" if extra else ""
    lines = ["| row | seeds | val bpc (mean ± 95% CI) | test bpc | Δ val vs untied-8 [95% CI] | Δ val vs `sequence` "
             f"[95% CI] | Δ test vs `sequence` [95% CI] |{extra_head} mean / final unique | mean trainable |",
             "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if extra else "")]
    for row in ORDER:
        if row not in rows:
            continue
        r = rows[row]
        vs8 = "0 (reference)" if row == "untied8" else diff(cells, row, "untied8")
        vss = "0 (reference)" if row == REFERENCE else diff(cells, row, REFERENCE)
        tss = "0 (reference)" if row == REFERENCE else diff(cells, row, REFERENCE, "test_bpc")
        more = ""
        if extra:
            more = (" 0 (reference) | 0 (reference) |" if row == extra else
                    f" {diff(cells, row, extra)} | {diff(cells, row, extra, 'test_bpc')} |")
        lines.append(f"| {label(row, summary)} | {r['n']} | {fmt_ci(r['val_bpc'])} | {fmt_ci(r['test_bpc'])} | {vs8} | {vss} | "
                     f"{tss} |{more} {r['mean_unique_layers']:.2f} / {r['final_unique_layers']:.2f} | "
                     f"{r['mean_trainable_parameters'] / 1e3:.0f}k |")
    return "\n".join(lines)


def readme_table(name: str) -> str:
    summary, rows, cells = load(name)
    lines = ["| row | seeds | val bits/char | Δ vs untied-8 | Δ vs `sequence` (val) | Δ vs `sequence` (test) | mean unique layers |",
             "|---|---|---|---|---|---|---|"]
    for row in ["untied8", "untied_u", "sequence_u", "grow_sequence_g25", "grow_scored", "greedy", "final_map:greedy",
                "greedy_follow", "untied_u_walltime"]:
        if row not in rows:
            continue
        r = rows[row]
        text = label(row, summary)
        if row == "grow_sequence_g25":
            text = f"**{text}** (the default)"
        vs8 = "0" if row == "untied8" else diff(cells, row, "untied8")
        vss = "0" if row == REFERENCE else diff(cells, row, REFERENCE)
        tss = "0" if row == REFERENCE else diff(cells, row, REFERENCE, "test_bpc")
        lines.append(f"| {text} | {r['n']} | {fmt_ci(r['val_bpc'])} | {vs8} | {vss} | {tss} | {r['mean_unique_layers']:.2f} |")
    return "\n".join(lines)


def comparisons(name: str) -> list[str]:
    _, _, cells = load(name)
    out = []
    for a, b in PAIRS:
        if a in cells and b in cells:
            out.append(f"{name}: {a} - {b}: val {diff(cells, a, b)}; test {diff(cells, a, b, 'test_bpc')}")
    return out


def best_static(cells: dict[str, dict[int, dict]]) -> str | None:
    """The stage's best static pattern at the budget, chosen on validation: the lowest mean val bpc over the
    seeds every static row of the stage has (so rows run on more seeds are not compared on other seeds)."""
    present = [r for r in STATIC_ROWS if r in cells]
    if not present:
        return None
    seeds = set.intersection(*(set(cells[r]) for r in present))
    return min(present, key=lambda r: sum(cells[r][s]["val_bpc"] for s in seeds) / max(len(seeds), 1))


def wins(cells: dict[str, dict[int, dict]], row: str, reference: str) -> str:
    """In how many of the shared seeds ``row`` has the lower validation bpc than ``reference``."""
    if row == reference:
        return ""
    seeds = sorted(set(cells[row]) & set(cells[reference]))
    better = sum(cells[row][s]["val_bpc"] < cells[reference][s]["val_bpc"] for s in seeds)
    return f"{better} of {len(seeds)} seeds"


def regimes_table() -> str:
    """Every grow variant against the static patterns and untied-8, regime by regime (issue 25.4): the default
    is chosen on what wins across them, on validation; test is shown once beside it."""
    lines = ["| regime | row | seeds | Δ val vs `sequence` | Δ val vs best static (which) | better than it in | "
             "Δ test vs best static | Δ val vs untied-8 |", "|---|---|---|---|---|---|---|---|"]
    for stage, regime in REGIMES:
        if not (OUT / f"{stage}.json").exists():
            lines.append(f"| {regime} | not run | | | | | | |")
            continue
        summary, rows, cells = load(stage)
        best = best_static(cells)
        for row in [r for r in (*STATIC_ROWS, *GROW_CANDIDATES) if r in rows]:
            vs_best = "0 (reference)" if row == best else diff(cells, row, best)
            test_best = "0 (reference)" if row == best else diff(cells, row, best, "test_bpc")
            vs_seq = "0 (reference)" if row == REFERENCE else diff(cells, row, REFERENCE)
            lines.append(f"| {regime} | {label(row, summary)} | {rows[row]['n']} | {vs_seq} | {vs_best} "
                         f"(`{best.removesuffix('_u')}`) | {wins(cells, row, best)} | {test_best} | "
                         f"{diff(cells, row, 'untied8')} |")
    return "\n".join(lines)


def replace_between(text: str, start: str, end: str, body: str, where: str) -> str:
    pattern = re.compile(re.escape(start) + r"\n(?:.*?\n)?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"charlm_report: no {start} ... {end} block in {where}")
    return pattern.sub(lambda _: f"{start}\n{body}\n{end}", text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="update docs/RESULTS.md and README.md in place")
    args = p.parse_args(argv)
    stages = [s for s in STAGES if (OUT / f"{s}.json").exists()]
    tables = {s: stage_table(s) for s in stages}
    for s in stages:
        print(f"## {s}\n{tables[s]}\n")
        print("\n".join(comparisons(s)) + "\n")
    for s in COMPRESS_STAGES:
        if (OUT / f"{s}.json").exists():
            tables[s] = results_table(json.loads((OUT / f"{s}.json").read_text()))
            stages.append(s)
            print(f"## {s}\n{tables[s]}\n")
            print("\n".join(compress_comparisons(read_cells(OUT / f"{s}_cells.jsonl"))) + "\n")
    if (OUT / "compress_start.json").exists():
        tables["compress_start"] = start_table(json.loads((OUT / "compress_start.json").read_text()))
        stages.append("compress_start")
        print(f"## compress_start\n{tables['compress_start']}\n")
    regimes = regimes_table()
    print(f"## regimes\n{regimes}\n")
    headline = readme_table(HEADLINE) if HEADLINE in stages else None
    if headline:
        print(f"## README\n{headline}")
    if args.write:
        results = ROOT / "docs" / "RESULTS.md"
        text = results.read_text()
        for s in stages:
            if f"<!-- table:{s} -->" in text:
                text = replace_between(text, f"<!-- table:{s} -->", f"<!-- /table:{s} -->", tables[s], "RESULTS.md")
        if "<!-- table:regimes -->" in text:
            text = replace_between(text, "<!-- table:regimes -->", "<!-- /table:regimes -->", regimes, "RESULTS.md")
        results.write_text(text)
        if headline:
            readme = ROOT / "README.md"
            readme.write_text(replace_between(readme.read_text(), "<!-- readme-table -->", "<!-- /readme-table -->",
                                              headline, "README.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
