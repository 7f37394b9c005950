"""The compression harness's summary of a stage: ``compress_u<u>.json`` / ``.md`` and a curves plot.

Every row that ran is listed (docs/RESULTS.md section 0: every row reported). Per row: mean +- 95% Student-t
CI of validation and test bits/char, the converted model's validation score before uptraining (derived rows),
and *paired* (same-seed) differences to the teacher and to the same tied architecture trained from scratch
(``scratch_tied``). The recipe a reader should pick is chosen among the rows that start from the teacher on
**validation**, over the seeds they all have; test is only reported. Rebuilt after every cell.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from charlm_cells import by_row, read_cells
from common import machine_info, md_table, write_results
from compress_rows import DERIVED_KINDS, POSITIONS, SCRATCH_TIED, TEACHER, row_order
from plots import mean_curves, paired_differences
from stats import fmt_ci, fmt_diff, mean_ci, paired

Rows = dict[str, dict[int, dict[str, Any]]]  # row -> seed -> cell
REFERENCES = ((TEACHER, "teacher"), (SCRATCH_TIED, "scratch"))


def mean_of(cells: list[dict[str, Any]], key: str) -> float | None:
    values = [c[key] for c in cells if c.get(key) is not None]
    return sum(values) / len(values) if values else None


def teacher_mismatches(rows: Rows) -> list[str]:
    """Derived cells whose teacher fingerprint differs from their seed's teacher cell, each with how far its
    teacher's validation bpc lies from the teacher cell's. It happens when a seed's saved teacher is lost and
    retrained (training on this CPU is not bitwise repeatable); such a pair compares compressions of two nearly
    equal teachers, and the table says so."""
    teachers = {s: c for s, c in rows.get(TEACHER, {}).items()}
    return [f"{name} seed {s} (its teacher {c['teacher_val_bpc'] - teachers[s]['teacher_val_bpc']:+.4f} bpc)"
            for name, seeds in rows.items() for s, c in seeds.items()
            if c.get("teacher_sha") and s in teachers and c["teacher_sha"] != teachers[s]["teacher_sha"]]


def row_entry(name: str, rows: Rows) -> dict[str, Any]:
    """One row of the summary: means, CIs, the pre-uptraining score and the paired differences."""
    seeds = rows[name]
    cs = [seeds[s] for s in sorted(seeds)]
    starts = [c["val_bpc_start"] for c in cs if c.get("val_bpc_start") is not None]
    entry: dict[str, Any] = {
        "row": name, "kind": cs[0]["kind"], "seeds": sorted(seeds), "n": len(cs), "steps": cs[0]["steps"],
        "total_steps": cs[0]["total_steps"], "rank": cs[0].get("rank", 0), "settings": cs[0]["settings"],
        "val_bpc": mean_ci([c["val_bpc"] for c in cs]), "test_bpc": mean_ci([c["test_bpc"] for c in cs]),
        "val_bpc_start": mean_ci(starts) if starts else None,
        "final_unique_layers": mean_of(cs, "final_unique_layers"),
        "final_trainable_parameters": mean_of(cs, "final_trainable_parameters"),
        "total_flops_vs_teacher": mean_of(cs, "total_flops_vs_teacher"),
        "seconds_per_step": mean_of(cs, "seconds_per_step"),
        "final_tie_maps": {str(c["seed"]): c["final_tie_map"] for c in cs},
    }
    for ref, label in REFERENCES:
        for key in ("val_bpc", "test_bpc"):
            if ref == name:
                entry[f"diff_{key}_vs_{label}"] = {"reference": True}
            else:
                entry[f"diff_{key}_vs_{label}"] = paired(seeds, rows[ref], key) if ref in rows else None
    return entry


def best_on_validation(rows: Rows) -> tuple[str | None, dict[str, float]]:
    """The row that starts from the teacher with the lowest mean validation bpc; chosen on validation, never on
    test, among rows compared on the same seeds. Which seeds: of the derived rows' seed sets, the one that makes
    the largest comparison (seeds x rows that have them all), so a row with extra seeds cannot win by them, a row
    added later (fewer seeds so far) does not narrow the others' comparison to its seeds, and a row that ran
    first in a stage still running does not win alone. A complete stage compares every row on every seed."""
    derived = {r: set(seeds) for r, seeds in rows.items() if next(iter(seeds.values()))["kind"] in DERIVED_KINDS}
    if not derived:
        return None, {}

    def covering(seeds: set[int]) -> list[str]:
        return [r for r, have in derived.items() if seeds <= have]

    common = max(derived.values(), key=lambda seeds: (len(seeds) * len(covering(seeds)), len(seeds)))
    means = {r: sum(rows[r][s]["val_bpc"] for s in common) / len(common) for r in covering(common)}
    return min(means, key=means.get), means


def summarize(cells: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """The summary's JSON body: meta, the validation choice, the teacher check, one entry per row."""
    rows = by_row(cells)
    best, means = best_on_validation(rows)
    entries = sorted((row_entry(name, rows) for name in rows), key=lambda e: (row_order(e["row"]), e["row"]))
    return {"meta": meta, "best_on_validation": best, "validation_means": means,
            "teacher_mismatches": teacher_mismatches(rows), "rows": entries}


def table_row(e: dict[str, Any]) -> dict[str, Any]:
    """The markdown cells of one entry."""
    return {
        "row": e["row"], "n": e["n"], "steps": f"{e['steps']} ({e['total_steps']})",
        "start": fmt_ci(e["val_bpc_start"]), "val": fmt_ci(e["val_bpc"]), "test": fmt_ci(e["test_bpc"]),
        "dvt": fmt_diff(e.get("diff_val_bpc_vs_teacher")), "dtt": fmt_diff(e.get("diff_test_bpc_vs_teacher")),
        "dvs": fmt_diff(e.get("diff_val_bpc_vs_scratch")), "dts": fmt_diff(e.get("diff_test_bpc_vs_scratch")),
        "unique": f"{e['final_unique_layers']:.2f}", "rank": e["rank"] or "",
        "params": f"{e['final_trainable_parameters'] / 1e3:.0f}k",
        "flops": "" if e["total_flops_vs_teacher"] is None else f"{e['total_flops_vs_teacher']:.2f}",
        "sps": "" if e["seconds_per_step"] is None else f"{e['seconds_per_step']:.3f}",
    }


def markdown(summary: dict[str, Any]) -> str:
    """A paragraph saying what was trained and how to read it, then the table."""
    meta, regime = summary["meta"], summary["meta"]["regime"]
    cols = ["row", "n", "steps", "start", "val", "test", "dvt", "dtt", "dvs", "dts", "unique", "rank", "params",
            "flops", "sps"]
    heads = ["row", "seeds", "steps (total)", "val bpc before uptraining", "val bpc (mean ± 95% t-CI)", "test bpc",
             "Δ val vs teacher [CI]", "Δ test vs teacher [CI]", f"Δ val vs {SCRATCH_TIED} [CI]",
             f"Δ test vs {SCRATCH_TIED} [CI]", "final unique", "delta rank", "trainable (final)",
             "training FLOPs vs teacher", "s/step"]
    warn = ""
    if summary["teacher_mismatches"]:
        warn = ("\n\n**Teacher mismatch** (these cells started from a retrained teacher of their seed, not the "
                f"teacher cell's): {', '.join(summary['teacher_mismatches'])}")
    return (
        f"Compressing a pretrained model, char-level Tiny Shakespeare (vocab {meta['vocab_size']}, "
        f"{meta['family']} blocks, d {regime['embd']}, {regime['heads']} heads, seq {regime['seq_len']}, batch "
        f"{regime['batch_size']}). Teacher: the untied {POSITIONS}-layer model, {meta['pretrain_steps']} steps, trained "
        f"once per seed. Every other row ends with u = {meta['budget']} unique layers: rows from the teacher are "
        f"uptrained {meta['uptrain_steps']} steps on the windows after the teacher's, from-scratch rows train "
        f"{meta['pretrain_steps'] + meta['uptrain_steps']} steps on the same stream. Validation = first "
        f"{regime['val_blocks']} held-out blocks, test = last {regime['test_blocks']} (evaluated once per cell). "
        "Bits per character. CIs: Student t, n-1 dof; differences are paired by seed and **real** only when the "
        "95% CI excludes 0; one seed has no CI. 'Before uptraining': the converted model's validation score at "
        "its first step. FLOPs: analytic, the teacher's pretraining included for rows that start from it. "
        f"Best row from the teacher on validation: **{summary['best_on_validation']}**.{warn}\n\n"
        + md_table([table_row(e) for e in summary["rows"]], cols, heads)
    )


LABELS = {
    TEACHER: "teacher: untied, 8 layers, {P} steps",
    "oneshot_root": "one-shot `root` (each group's lowest layer)",
    "oneshot_average": "one-shot `average` (each group's mean)",
    "oneshot_average_svd": "one-shot `average` + SVD deltas and offsets, rank {r}",
    "oneshot_root_svd": "one-shot `root` + SVD deltas and offsets, rank {r}",
    "shrink_sequence": "progressive `shrink`, order `sequence`",
    "shrink_sequence_svd": "progressive `shrink`, order `sequence`, + SVD deltas and offsets, rank {r}",
    "shrink_scored": "progressive `shrink`, order `scored`",
    "shrink_scored_svd": "progressive `shrink`, order `scored`, + SVD deltas and offsets, rank {r}",
    "oneshot_average_svd_roots": "one-shot `average` + SVD deltas and offsets at every position, roots too, rank {r}",
    "shrink_sequence_svd_roots": "progressive `shrink`, order `sequence`, + SVD deltas and offsets, roots too, rank {r}",
    "oneshot_root_svd_lr1e-3": "one-shot `root` + SVD deltas and offsets, rank {r}, uptrained at peak lr 1e-3",
    "oneshot_root_svd_lr6e-3": "one-shot `root` + SVD deltas and offsets, rank {r}, uptrained at peak lr 6e-3",
    "oneshot_root_svd_lr3e-4": "one-shot `root` + SVD deltas and offsets, rank {r}, uptrained at peak lr 3e-4",
    "shrink_sequence_svd_until0.1": "progressive `shrink`, order `sequence`, + SVD deltas and offsets, rank {r}, "
                                    "last merge at 10% of the uptraining",
    "distill_untied_u": "untied, {u} layers, distilled from the teacher ({U} steps)",
    SCRATCH_TIED: "tied (`sequence`, u={u}) from scratch, {PU} steps",
    "scratch_untied_u": "untied, {u} layers, from scratch, {PU} steps",
}


def results_table(summary: dict[str, Any]) -> str:
    """The compact table of docs/RESULTS.md (the .md beside the cells has every column): per row, validation
    before and after uptraining, test, the paired differences to the teacher and to the tied model from
    scratch, and what the final model trains and what it cost."""
    meta = summary["meta"]
    P, U, u = meta["pretrain_steps"], meta["uptrain_steps"], meta["budget"]
    lines = ["| row | seeds | val bpc before uptraining | val bpc | test bpc | Δ val vs teacher [95% CI] | "
             "Δ val vs tied from scratch [95% CI] | Δ test vs tied from scratch [95% CI] | trainable | "
             "training FLOPs vs teacher |", "|---|---|---|---|---|---|---|---|---|---|"]
    for e in summary["rows"]:
        name = LABELS.get(e["row"], e["row"]).format(P=P, U=U, PU=P + U, u=u, r=e["rank"])
        if e["row"] == summary["best_on_validation"]:
            name = f"**{name}** (best from the teacher on validation)"
        t = table_row(e)
        lines.append(f"| {name} | {e['n']} | {t['start']} | {t['val']} | {t['test']} | {t['dvt']} | {t['dvs']} | "
                     f"{t['dts']} | {t['params']} | {t['flops']} |")
    return "\n".join(lines)


# the paired differences RESULTS quotes: the decision rule's (c), then what each ingredient does
RULE_PAIRS = (("shrink_sequence", "oneshot_average"), ("shrink_sequence_svd", "oneshot_average_svd"),
              ("oneshot_root_svd", "oneshot_root"), ("oneshot_average_svd", "oneshot_average"),
              ("oneshot_root", "oneshot_average"), ("shrink_scored_svd", "shrink_sequence_svd"),
              ("oneshot_average_svd_roots", "oneshot_average_svd"), ("oneshot_average_svd_roots", "oneshot_root_svd"),
              ("distill_untied_u", "scratch_untied_u"),
              ("oneshot_root_svd_lr1e-3", "oneshot_root_svd"), ("oneshot_root_svd_lr3e-4", "oneshot_root_svd"),
              ("oneshot_root_svd_lr6e-3", "oneshot_root_svd"),
              ("shrink_sequence_svd_until0.1", "shrink_sequence_svd"),
              ("shrink_sequence_svd_until0.1", "oneshot_average_svd"))


def comparisons(cells: list[dict[str, Any]]) -> list[str]:
    """``a - b: val [CI], test [CI] (seeds)`` for each pair of ``RULE_PAIRS`` both rows have."""
    rows = by_row(cells)
    out = []
    for a, b in RULE_PAIRS:
        if a in rows and b in rows:
            val, test = paired(rows[a], rows[b], "val_bpc"), paired(rows[a], rows[b], "test_bpc")
            out.append(f"{a} - {b}: val {fmt_diff(val, with_n=True)}; test {fmt_diff(test, with_n=True)}")
    return out


def write_summary(cells_path: Path, output: Path, name: str, meta: dict[str, Any]) -> Path | None:
    """Summarise ``cells_path`` into ``output`` (JSON, markdown, curves); the JSON's path, None with no cells."""
    cells = read_cells(cells_path)
    if not cells:
        print(f"compress: no cells in {cells_path} yet", flush=True)
        return None
    h = cells[0]["hparams"]  # the cells' own P and U, whatever the summarizing command line said
    summary = summarize(cells, {**meta, "pretrain_steps": h["pretrain_steps"], "uptrain_steps": h["uptrain_steps"]})
    summary["cells_file"] = cells_path.name
    curves = {row: [{int(s): v for s, v in c["curve"]} for c in seeds.values()] for row, seeds in by_row(cells).items()}
    summary["plots"] = [mean_curves(curves, output / f"{name}_val_bpc.png", "validation bits/char",
                                    f"{name}: validation bits/char over total steps (band: 95% t-CI)"),
                        paired_differences([(e["row"], e.get("diff_val_bpc_vs_scratch")) for e in summary["rows"]],
                                           output / f"{name}_vs_scratch.png",
                                           f"validation bits/char minus {SCRATCH_TIED}'s, same seed (< 0: better)",
                                           f"{name}: each row vs {SCRATCH_TIED} (bar: 95% t-CI; green/red: real)")]
    machine = dict(cells[-1].get("machine") or machine_info())
    machine["command"] = machine_info()["command"]
    json_path, _ = write_results(output, name, {"machine": machine, **summary}, markdown(summary))
    return json_path
