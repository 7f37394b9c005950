"""The char-level evidence harness (benchmarks/charlm.py) in --quick mode: cells, pairing, resume, summary CIs."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import charlm  # noqa: E402
from common import SHARED_DIR  # noqa: E402
from data import TINY_SHAKESPEARE  # noqa: E402
from stats import mean_ci  # noqa: E402

DATA = SHARED_DIR / TINY_SHAKESPEARE
pytestmark = pytest.mark.skipif(not DATA.exists(), reason=f"{DATA} is missing (Tiny Shakespeare; set DYNTIE_SHARED)")

T975_DOF1 = 12.706  # Student t 97.5% quantile, 1 degree of freedom (two seeds)


def quick_args(out: Path, rows: str, seeds: str) -> list[str]:
    return ["--quick", "--output", str(out), "--runs-root", str(out / "runs"), "--rows", rows, "--seeds", seeds,
            "--threads", "1"]


def cells_of(out: Path) -> list[dict]:
    path = out / "charlm_screen_quick_u4_cells.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("charlm")
    assert charlm.main(quick_args(out, "untied8,sequence_u", "0,1")) == 0
    return out


def test_one_line_per_cell_with_the_record(run):
    cells = cells_of(run)
    assert len(cells) == 4
    assert {(c["row"], c["seed"]) for c in cells} == {(r, s) for r in ("untied8", "sequence_u") for s in (0, 1)}
    for c in cells:
        assert math.isfinite(c["val_bpc"]) and math.isfinite(c["test_bpc"])
        assert c["curve"] and c["curve"][-1] == [c["steps"], c["val_bpc"]]
        assert c["tie_history"] and c["unique_layers_over_time"]
    by = {(c["row"], c["seed"]): c for c in cells}
    assert by["sequence_u", 0]["final_tie_map"] == [0, 0, 2, 2, 4, 4, 6, 6]
    assert by["sequence_u", 0]["final_unique_layers"] == 4 and by["untied8", 0]["final_unique_layers"] == 8
    assert by["sequence_u", 0]["flops_per_step_ratio"] == 1.0  # tying saves parameters, not compute
    assert by["sequence_u", 0]["mean_trainable_parameters"] < by["untied8", 0]["mean_trainable_parameters"]


def test_same_seed_pairs_data_and_init(run):
    by = {(c["row"], c["seed"]): c for c in cells_of(run)}
    for seed in (0, 1):
        assert by["untied8", seed]["data_sha"] == by["sequence_u", seed]["data_sha"]
        assert by["untied8", seed]["init_sha"] == by["sequence_u", seed]["init_sha"]
    assert by["untied8", 0]["data_sha"] != by["untied8", 1]["data_sha"]
    assert by["untied8", 0]["init_sha"] != by["untied8", 1]["init_sha"]


def test_a_cell_reproduces_exactly(run, tmp_path):
    assert charlm.main(quick_args(tmp_path, "untied8", "1")) == 0
    again = cells_of(tmp_path)[0]
    first = next(c for c in cells_of(run) if c["row"] == "untied8" and c["seed"] == 1)
    assert again["val_bpc"] == first["val_bpc"] and again["test_bpc"] == first["test_bpc"]
    assert again["curve"] == first["curve"]


def test_second_invocation_skips_finished_cells(run):
    path = run / "charlm_screen_quick_u4_cells.jsonl"
    before = path.read_text()
    t0 = time.perf_counter()
    assert charlm.main(quick_args(run, "untied8,sequence_u", "0,1")) == 0
    assert path.read_text() == before
    assert time.perf_counter() - t0 < 10


def test_summary_ci_matches_a_hand_computation(run):
    summary = json.loads((run / "charlm_screen_quick_u4.json").read_text())
    cells = cells_of(run)
    rows = {r["row"]: r for r in summary["rows"]}
    vals = {s: c["val_bpc"] for c in cells for s in [c["seed"]] if c["row"] == "sequence_u"}
    base = {s: c["val_bpc"] for c in cells for s in [c["seed"]] if c["row"] == "untied8"}
    stats = rows["sequence_u"]["val_bpc"]
    assert stats["n"] == 2
    assert stats["mean"] == pytest.approx((vals[0] + vals[1]) / 2, abs=1e-12)
    assert stats["ci95"] == pytest.approx(T975_DOF1 * statistics.stdev(vals.values()) / math.sqrt(2), rel=1e-3)
    diffs = [vals[s] - base[s] for s in (0, 1)]
    d = rows["sequence_u"]["diff_val_bpc_vs_untied8"]
    assert d["mean"] == pytest.approx(sum(diffs) / 2, abs=1e-12)
    assert d["ci95"] == pytest.approx(T975_DOF1 * statistics.stdev(diffs) / math.sqrt(2), rel=1e-3)
    assert d["real"] == (d["lo"] > 0 or d["hi"] < 0)
    assert summary["best_static_u"] == "sequence_u"
    assert (run / "charlm_screen_quick_u4.md").exists() and (run / "charlm_screen_quick_u4_val_bpc.png").exists()


def test_one_seed_gets_no_ci():
    stats = mean_ci([1.5])
    assert stats["mean"] == 1.5 and stats["ci95"] is None


def test_unknown_row_fails_fast_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH / "charlm.py"), *quick_args(tmp_path, "untied8,no_such_row", "0")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no_such_row" in lines[0]
    assert not list(tmp_path.glob("*_cells.jsonl"))


def test_snr_probe_quick(tmp_path):
    """The action-effect probe (benchmarks/charlm_snr.py): every one-action map under every order, effects paired
    against keep within an order, and go only when the signal reaches 3x the noise."""
    import charlm_snr

    assert charlm_snr.main(["--quick", "--output", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "charlm_snr_quick.json").read_text())
    maps = data["maps"]
    assert maps["keep"]["tie_map"] == [0, 0, 2, 2, 4, 4, 6, 6] and len(maps) == 17
    assert len({tuple(m["tie_map"]) for m in maps.values()}) == len(maps)
    assert all(len(m["val_bpc"]) == data["meta"]["orders"] == 2 for m in maps.values())
    effect = data["effects"]["l1a1"][0]
    assert effect == pytest.approx(maps["l1a1"]["val_bpc"][0] - maps["keep"]["val_bpc"][0], abs=1e-12)
    assert data["signal_sd"] > 0 and data["paired_noise_sd"] > 0
    assert data["go"] == (data["snr"] >= 3)


# ---- the pool (benchmarks/charlm_pool.py): many cells in parallel, merged into the harness's cells file


def pool_plan(tmp_path: Path) -> Path:
    plan = [{"stage": "pool", "budget": 4, "steps": 12, "seeds": [0, 1], "rows": ["untied8", "greedy+final_map:greedy"]}]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    return path


def test_pool_runs_chains_in_order_merges_and_resumes(tmp_path):
    import charlm_pool

    out = tmp_path / "out"
    args = ["--plan", str(pool_plan(tmp_path)), "--quick", "--workers", "2", "--output", str(out),
            "--scratch", str(tmp_path / "scratch")]
    assert charlm_pool.main(args) == 0
    cells_path = out / "charlm_pool_quick_u4_cells.jsonl"
    cells = [json.loads(line) for line in cells_path.read_text().splitlines()]
    assert sorted((c["row"], c["seed"]) for c in cells) == sorted(
        (r, s) for r in ("untied8", "greedy", "final_map:greedy") for s in (0, 1))
    by = {(c["row"], c["seed"]): c for c in cells}
    for seed in (0, 1):  # the final-map row trained the map its source row reached for the same seed
        assert by[("final_map:greedy", seed)]["source_map"] == by[("greedy", seed)]["final_tie_map"]
        assert by[("final_map:greedy", seed)]["init_sha"] == by[("untied8", seed)]["init_sha"]
    # the merged file is the harness's own: it summarises it, and a rerun of the plan starts nothing
    assert charlm.main(["--quick", "--stage", "pool", "--output", str(out), "--summarize-only"]) == 0
    assert (out / "charlm_pool_quick_u4.json").exists()
    before = cells_path.read_text()
    assert charlm_pool.main(args) == 0
    assert cells_path.read_text() == before
    assert "pool: 0 of 4 jobs to run" in (out / "charlm_pool_log.txt").read_text()


def test_pool_deadline_stops_jobs_and_keeps_finished_cells(tmp_path):
    import charlm_pool

    out = tmp_path / "out"
    args = ["--plan", str(pool_plan(tmp_path)), "--quick", "--workers", "1", "--deadline", "3", "--output", str(out),
            "--scratch", str(tmp_path / "scratch")]
    t0 = time.monotonic()
    assert charlm_pool.main(args) == 0
    assert time.monotonic() - t0 < 60  # stopped, not run to the end
    log = (out / "charlm_pool_log.txt").read_text()
    assert "STOPPED at the deadline" in log  # the first job was running (a quick cell takes >3 s to start)
    assert "deadline reached" in log and "3 never started" in log
    assert not (out / "charlm_pool_quick_u4_cells.jsonl").exists()


def test_pool_refuses_a_bad_plan_in_one_line(tmp_path):
    import charlm_pool

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps([{"stage": "x", "budget": 4, "steps": 12, "rows": ["untied8"], "seed": [0]}]))
    with pytest.raises(SystemExit, match="unknown keys"):
        charlm_pool.main(["--plan", str(plan), "--output", str(tmp_path / "o")])


def test_report_replaces_only_the_marked_block():
    import charlm_report

    text = "a\n<!-- table:x -->\nold 1\nold 2\n<!-- /table:x -->\nb\n"
    new = charlm_report.replace_between(text, "<!-- table:x -->", "<!-- /table:x -->", "| new |", "t")
    assert new == "a\n<!-- table:x -->\n| new |\n<!-- /table:x -->\nb\n"
    empty = "<!-- table:x -->\n<!-- /table:x -->"
    assert charlm_report.replace_between(empty, "<!-- table:x -->", "<!-- /table:x -->", "y", "t").count("y") == 1
    with pytest.raises(SystemExit, match="no <!-- table:z -->"):
        charlm_report.replace_between(text, "<!-- table:z -->", "<!-- /table:z -->", "y", "t")


# ---- --family llama: the same rows on DynTieLlama blocks of the same size (issue 25, item 3)


def llama_cells_of(out: Path) -> list[dict]:
    path = out / "charlm_screen_quick_u4_llama_cells.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("charlm_llama")
    assert charlm.main(quick_args(out, "untied8,grow_sequence", "0") + ["--family", "llama"]) == 0
    relaxed = ["--family", "llama", "--set", "tie_lora_rank=2", "--tag", "r2"]
    assert charlm.main(quick_args(out, "sequence_u", "0") + relaxed) == 0
    return out


def layer_parameters(family: str, regime: dict) -> int:
    """Counted on the built model, not from the formulas the harness uses."""
    from charlm_family import build_model

    model = build_model(family, 2, regime, 65)
    layer = model.transformer.h[0] if family == "gpt2" else model.model.layers[0]
    return sum(p.numel() for p in layer.parameters())


def test_llama_cells_record_the_family_and_matched_layer_sizes(llama_run):
    from charlm_family import llama_intermediate_size
    from charlm_rows import QUICK, REGIME

    cells = {c["row"]: c for c in llama_cells_of(llama_run)}
    assert set(cells) == {"untied8", "grow_sequence", "sequence_u_r2"}
    h = cells["untied8"]["hparams"]
    assert h["family"] == "llama" and h["num_key_value_heads"] == QUICK["heads"] and h["tie_word_embeddings"]
    assert h["intermediate_size"] == 46
    assert h["layer_parameters_gpt2"] == layer_parameters("gpt2", QUICK) == 3280
    assert h["layer_parameters_llama"] == layer_parameters("llama", QUICK) == 3264
    assert llama_intermediate_size(64, 4, 4) == 174  # the section-0 regime: 49,920 against 49,984
    assert layer_parameters("llama", REGIME) == 49920 and layer_parameters("gpt2", REGIME) == 49984
    assert cells["grow_sequence"]["final_tie_map"] == [0, 0, 2, 2, 4, 4, 6, 6]
    assert cells["grow_sequence"]["init_sha"] == cells["untied8"]["init_sha"]  # paired within the family
    # a relaxed tie adds (11 d + 3 I) r parameters per tied position (the docstring's rank matching)
    plain = cells["untied8"]["mean_trainable_parameters"] - 4 * h["layer_parameters_llama"]
    delta = 4 * (11 * QUICK["embd"] + 3 * h["intermediate_size"]) * 2
    assert cells["sequence_u_r2"]["mean_trainable_parameters"] == plain + delta
    assert cells["sequence_u_r2"]["flops_per_step_ratio"] > 1.0
    assert "Llama blocks" in (llama_run / "charlm_screen_quick_u4_llama.md").read_text()


def test_families_never_share_a_cells_file(run, llama_run, tmp_path):
    from charlm_cells import stage_name

    assert stage_name("confirm", 4, False) == "charlm_confirm_u4"
    assert stage_name("confirm", 4, False, "llama") == "charlm_confirm_u4_llama"
    assert all(c["hparams"].get("family", "gpt2") == "gpt2" for c in cells_of(run))
    # a Llama cell in a GPT-2 stage's file: resuming and summarising refuse it, in one line, before training
    mixed = tmp_path / "charlm_screen_quick_u4_cells.jsonl"
    mixed.write_text((run / "charlm_screen_quick_u4_cells.jsonl").read_text()
                     + (llama_run / "charlm_screen_quick_u4_llama_cells.jsonl").read_text())
    with pytest.raises(SystemExit, match="mix block families"):
        charlm.main(quick_args(tmp_path, "untied8", "2"))
    with pytest.raises(SystemExit, match="mix block families"):
        charlm.main(["--quick", "--output", str(tmp_path), "--summarize-only"])
    # GPT-2 cells (written before --family: no key) in a Llama stage's file: refused as well
    legacy = tmp_path / "charlm_screen_quick_u4_llama_cells.jsonl"
    legacy.write_text("".join(json.dumps({**c, "hparams": {k: v for k, v in c["hparams"].items() if k != "family"}})
                              + "\n" for c in cells_of(run)))
    with pytest.raises(SystemExit, match="mix block families"):
        charlm.main(quick_args(tmp_path, "untied8", "2") + ["--family", "llama"])
    assert not list(tmp_path.glob("*.json"))


def test_pool_passes_the_family_and_the_llama_plan_is_seed_major(tmp_path):
    import argparse

    import charlm_pool

    plan = json.loads((BENCH / "plans" / "llama_u4_cpu.json").read_text())
    jobs = charlm_pool.expand_plan(plan)
    assert {j.family for j in jobs} == {"llama"} and {(j.budget, j.steps) for j in jobs} == {(4, 2500)}
    assert [j.seed for j in jobs] == sorted(j.seed for j in jobs) and {j.seed for j in jobs} == set(range(5))
    assert {c for j in jobs if j.seed == 0 for c in j.cell_names()} == {
        "untied8", "untied_u", "sequence_u", "grow_sequence_g25", "grow_sequence_g25_r10", "grow_sequence_g10"}
    assert jobs[0].cells_file(False) == "charlm_confirm_u4_llama_cells.jsonl"
    ns = argparse.Namespace(device="cpu", quick=True)
    assert charlm_pool.command(jobs[0], ns, tmp_path)[-4:-2] == ["--family", "llama"]
    gpt2 = charlm_pool.expand_plan([{k: v for k, v in plan[0].items() if k != "family"}])[0]
    assert "--family" not in charlm_pool.command(gpt2, ns, tmp_path)  # GPT-2 command lines are unchanged
    with pytest.raises(SystemExit, match="SNR probe"):
        charlm_pool.expand_plan([{"snr": True, "budget": 4, "steps": 12, "family": "llama"}])
    with pytest.raises(SystemExit, match="family 'bert'"):
        charlm_pool.expand_plan([{**plan[0], "family": "bert"}])
