"""The evidence table of docs/RESULTS.md, rendered from the merged charlm cells and summary, so no number in it
is typed by hand. The merged stage is built from the per-sitting cell files and summarised by the harness:

    cat docs/results/charlm_{spread,screenb,screenc,screend}_u4_cells.jsonl > docs/results/charlm_screen_u4_cells.jsonl
    python benchmarks/charlm.py --summarize-only --stage screen
    python benchmarks/charlm_report.py            # prints the table and the paired comparisons quoted in the text
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from charlm import by_row, paired, read_cells  # noqa: E402

out = Path(__file__).resolve().parents[1] / "docs" / "results"
summary = json.loads((out / "charlm_screen_u4.json").read_text())
rows = {r["row"]: r for r in summary["rows"]}
cells = by_row(read_cells(out / "charlm_screen_u4_cells.jsonl"))

def ci(stats):
    if not stats or stats.get("ci95") is None:
        return f"{stats['mean']:.4f} (n={stats['n']})" if stats else ""
    return f"{stats['mean']:.4f} ± {stats['ci95']:.4f}"

def d(a, b, key="val_bpc"):
    if a not in cells or b not in cells:
        return "not run"
    s = paired(cells[a], cells[b], key)
    if s is None:
        return "no common seed"
    if s.get("ci95") is None:
        return f"{s['mean']:+.4f} (n={s['n']}, no CI)"
    mark = " **real**" if s["real"] else ""
    return f"{s['mean']:+.4f} [{s['lo']:+.4f}, {s['hi']:+.4f}] (n={s['n']}){mark}"

ORDER = ["untied8", "untied_u", "untied_u_walltime", "sequence_u", "cycle_u", "cycle_rev_u", "grow_sequence",
         "grow_sequence_g25", "grow_scored", "greedy", "greedy_follow", "final_map:greedy", "random_u", "dlt_parity",
         "dlt_improved", "dlt_paired"]
LABEL = {
    "untied8": "untied, 8 layers", "untied_u": "untied, 4 layers (equal steps)",
    "untied_u_walltime": "untied, 4 layers, equal wall-time (2x steps)", "sequence_u": "static `sequence`, u=4",
    "cycle_u": "static `cycle`, u=4", "cycle_rev_u": "static `cycle_rev`, u=4",
    "grow_sequence": "`grow`, order `sequence`, until 0.5", "grow_sequence_g25": "`grow`, order `sequence`, until 0.25",
    "grow_scored": "`grow`, order `scored`, until 0.5", "greedy": "**`greedy`**, budget 4, interval 100",
    "greedy_follow": "`greedy`, follow mode", "final_map:greedy": "greedy's final map, retrained static from scratch",
    "random_u": "`random`, budget 4", "dlt_parity": "DLT paper-parity agent (no budget)",
    "dlt_improved": "DLT improved agent (no budget)", "dlt_paired": "Q-learning, paired reward, budget 4, interval 32",
}
lines = ["| row | seeds | val bpc (mean ± 95% CI) | test bpc | Δ val vs untied-8 [95% CI] | Δ val vs `sequence_u` [95% CI] | mean / final unique | mean trainable | FLOPs/step vs untied-8 |",
         "|---|---|---|---|---|---|---|---|---|"]
for name in ORDER:
    if name not in rows:
        continue
    r = rows[name]
    vs8 = "0 (reference)" if name == "untied8" else d(name, "untied8")
    vss = "0 (reference)" if name == "sequence_u" else d(name, "sequence_u")
    lines.append(f"| {LABEL[name]} | {r['n']} | {ci(r['val_bpc'])} | {ci(r['test_bpc'])} | {vs8} | {vss} | "
                 f"{r['mean_unique_layers']:.2f} / {r['final_unique_layers']:.2f} | {r['mean_trainable_parameters']/1e3:.0f}k | "
                 f"{r['flops_per_step_ratio']:.2f} |")
table = "\n".join(lines)
pairs = {k: d(*k) for k in [("greedy", "final_map:greedy"), ("greedy", "grow_scored"), ("grow_scored", "grow_sequence"),
                            ("grow_sequence", "sequence_u"), ("grow_sequence_g25", "grow_sequence"), ("greedy_follow", "greedy"),
                            ("untied8", "untied_u"), ("dlt_paired", "dlt_improved"), ("final_map:greedy", "sequence_u")]}
pairs_test = {k: d(*k, key="test_bpc") for k in [("greedy", "sequence_u"), ("greedy", "untied8"), ("untied8", "untied_u")]}
print(table)
print()
for k, v in pairs.items():
    print("VAL", k, v)
for k, v in pairs_test.items():
    print("TEST", k, v)
