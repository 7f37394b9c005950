"""The char-level harness's summary of a cells file: ``charlm_<stage>_u<budget>.json`` / ``.md`` and plots.

Per row: mean +- 95% Student-t CI of validation and test bits/char over its seeds, and *paired* (same-seed)
differences to ``untied8`` and to the best static-u row, which is chosen on validation over the seeds every
static row has (never on test). Rebuilt from the cells file after every cell and by ``--summarize-only``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from charlm_cells import by_row, check_one_family, read_cells
from charlm_rows import BASELINE, POSITIONS, STATIC_U_ROWS, row_rank
from common import machine_info, md_table, write_results
from plots import mean_curves, step_lines, tie_map_grid
from stats import fmt_ci, fmt_diff, mean_ci, paired

Rows = dict[str, dict[int, dict[str, Any]]]  # row -> seed -> cell


def choose_best_static(rows: Rows) -> tuple[str | None, dict[str, float]]:
    """The static-u row with the lowest mean validation bpc over the seeds *every* static row has (a row with
    more seeds must not win or lose by its extra seeds); its mean over those seeds for each row. Chosen on
    validation, never on test."""
    present = [r for r in STATIC_U_ROWS if r in rows]
    if not present:
        return None, {}
    common = set.intersection(*(set(rows[r]) for r in present))
    if not common:  # no shared seed: fall back to each row's own mean
        common_of = {r: set(rows[r]) for r in present}
    else:
        common_of = {r: common for r in present}
    means = {r: sum(rows[r][s]["val_bpc"] for s in common_of[r]) / len(common_of[r]) for r in present}
    return min(means, key=means.get), means


def row_entry(name: str, rows: Rows, best_static: str | None) -> dict[str, Any]:
    """One row of the summary: its means, CIs and paired differences to the two references."""
    seeds = rows[name]
    cs = [seeds[s] for s in sorted(seeds)]
    entry: dict[str, Any] = {
        "row": name,
        "seeds": sorted(seeds),
        "n": len(cs),
        "steps": cs[0]["steps"],
        "num_layers": cs[0]["num_layers"],
        "settings": cs[0]["settings"],
        "val_bpc": mean_ci([c["val_bpc"] for c in cs]),
        "test_bpc": mean_ci([c["test_bpc"] for c in cs]),
        "mean_unique_layers": sum(c["mean_unique_layers"] for c in cs) / len(cs),
        "final_unique_layers": sum(c["final_unique_layers"] for c in cs) / len(cs),
        "mean_trainable_parameters": sum(c["mean_trainable_parameters"] for c in cs) / len(cs),
        "training_state_bytes": sum(c["training_state_bytes"] for c in cs) / len(cs),
        "flops_per_step_ratio": cs[0]["flops_per_step_ratio"],
        "total_flops_ratio": cs[0]["total_flops_ratio"],
        "train_seconds": sum(c["train_seconds"] for c in cs) / len(cs),
        "final_tie_maps": {str(c["seed"]): c["final_tie_map"] for c in cs},
    }
    if len(cs) < 2:
        entry["note"] = "one seed: no confidence interval"
    for ref_name, label in ((BASELINE, "untied8"), (best_static, "best_static")):
        for key in ("val_bpc", "test_bpc"):
            if ref_name == name:
                entry[f"diff_{key}_vs_{label}"] = {"reference": True}
            else:
                entry[f"diff_{key}_vs_{label}"] = paired(seeds, rows[ref_name], key) if ref_name in rows else None
    if BASELINE in rows:
        common = sorted(set(seeds) & set(rows[BASELINE]))
        ratios = [seeds[s]["train_seconds"] / rows[BASELINE][s]["train_seconds"] for s in common]
        entry["wall_ratio_vs_untied8"] = sum(ratios) / len(ratios) if ratios else None
    return entry


def summarize(cells: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """The summary's JSON body: the run's meta, the best static row, and one entry per row in table order."""
    rows = by_row(cells)
    best_static, statics = choose_best_static(rows)
    out = [row_entry(name, rows, best_static) for name in rows]
    out.sort(key=lambda e: (row_rank(e["row"]), e["row"]))
    return {"meta": meta, "best_static_u": best_static, "best_static_means": statics, "rows": out}


def block_words(meta: dict[str, Any]) -> str:
    """The block family in words before the shape, empty for GPT-2 (its tables read as they always did)."""
    family = meta.get("family") or {"family": "gpt2"}
    if family["family"] == "gpt2":
        return ""
    return (f"{family['family'].capitalize()} blocks (RoPE, RMSNorm, SwiGLU width {family['intermediate_size']}: "
            f"{family['layer_parameters_llama']:,} parameters per layer against GPT-2's "
            f"{family['layer_parameters_gpt2']:,}), ")


def markdown(summary: dict[str, Any]) -> str:
    """The summary's table, after a paragraph saying what was trained and how the intervals are computed."""
    meta = summary["meta"]
    table = []
    for e in summary["rows"]:
        table.append({
            "row": e["row"], "n": e["n"], "steps": e["steps"],
            "val": fmt_ci(e["val_bpc"]), "test": fmt_ci(e["test_bpc"]),
            "d8": fmt_diff(e.get("diff_val_bpc_vs_untied8")), "ds": fmt_diff(e.get("diff_val_bpc_vs_best_static")),
            "dt8": fmt_diff(e.get("diff_test_bpc_vs_untied8")),
            "unique": f"{e['mean_unique_layers']:.2f} / {e['final_unique_layers']:.2f}",
            "params": f"{e['mean_trainable_parameters'] / 1e3:.0f}k",
            "state": f"{e['training_state_bytes'] / 2**20:.2f} MiB",
            "flops": f"{e['flops_per_step_ratio']:.3f} ({e['total_flops_ratio']:.2f})",
            "wall": "" if e.get("wall_ratio_vs_untied8") is None else f"{e['wall_ratio_vs_untied8']:.2f}",
        })
    cols = ["row", "n", "steps", "val", "test", "d8", "ds", "dt8", "unique", "params", "state", "flops", "wall"]
    heads = ["row", "seeds", "steps", "val bpc (mean ± 95% t-CI)", "test bpc", "Δ val vs untied8 [CI]",
             f"Δ val vs best static-u ({summary['best_static_u']}) [CI]", "Δ test vs untied8 [CI]",
             "mean / final unique", "mean trainable", "train state", "FLOPs/step (total) vs untied8",
             "wall ratio vs untied8"]
    return (
        f"Char-level Tiny Shakespeare ({meta['train_chars']} training chars, vocab {meta['vocab_size']}), "
        f"{block_words(meta)}{POSITIONS} positions x d {meta['regime']['embd']} ({meta['regime']['heads']} heads), seq "
        f"{meta['regime']['seq_len']}, batch {meta['regime']['batch_size']}, {meta['steps']} base steps, budget u = "
        f"{meta['budget']}. Validation = first {meta['regime']['val_blocks']} held-out blocks, test = last "
        f"{meta['regime']['test_blocks']} (evaluated once per cell). Bits per character. CIs: Student t, n-1 dof; "
        "differences are paired by seed and marked **real** only when the 95% CI excludes 0. Rows with one seed "
        "have no CI. FLOPs: analytic (see `flops_per_step`), per step and (in brackets) for the whole run. "
        "Wall: training only (evaluations excluded), same-seed ratio, noisy on a shared CPU.\n\n"
        + md_table(table, cols, heads)
    )


def plot_all(rows: Rows, output: Path, name: str) -> list[str]:
    """Validation curves (every row), unique layers over time (rows whose count changed), final maps."""
    curves = {row: [dict(c["curve"]) for c in seeds.values()] for row, seeds in rows.items()}
    written = [mean_curves(curves, output / f"{name}_val_bpc.png", "validation bits/char",
                           f"{name}: validation bits/char (band: 95% t-CI over seeds)")]
    dynamic = {row: [c["unique_layers_over_time"] + [(c["steps"], c["unique_layers_over_time"][-1][1])]
                     for c in seeds.values()]
               for row, seeds in rows.items() if any(len(c["unique_layers_over_time"]) > 1 for c in seeds.values())}
    if dynamic:
        written.append(step_lines(dynamic, output / f"{name}_unique_layers.png", "unique layers",
                                  f"{name}: unique layers over time (one line per seed)"))
    maps = {f"{row} s{s}": seeds[s]["final_tie_map"] for row, seeds in rows.items() for s in sorted(seeds)}
    if maps:
        written.append(tie_map_grid(maps, POSITIONS, output / f"{name}_final_maps.png", f"{name}: final tie maps"))
    return written


def write_summary(cells_path: Path, output: Path, name: str, meta: dict[str, Any]) -> Path | None:
    """Summarise ``cells_path`` into ``output`` (JSON, markdown, plots); the JSON's path, None with no cells."""
    cells = read_cells(cells_path)
    if not cells:
        print(f"charlm: no cells in {cells_path} yet", flush=True)
        return None
    check_one_family(cells, cells_path, meta.get("family", {}).get("family"))
    summary = summarize(cells, meta)
    summary["cells_file"] = cells_path.name
    summary["plots"] = plot_all(by_row(cells), output, name)
    machine = dict(cells[-1].get("machine") or machine_info())  # where the cells ran, not where this summarizes
    machine["command"] = machine_info()["command"]
    json_path, _ = write_results(output, name, {"machine": machine, **summary}, markdown(summary))
    return json_path
