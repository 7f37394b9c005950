"""The benchmark scripts' --quick modes still run and write sane results (keeps them from rotting).

Each script runs in a subprocess, as a user would run it, with its output in a temporary folder.
"""

from __future__ import annotations

import json
import math
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
SHARED = REPO.parent / "shared"


def run_script(name: str, out: Path, *extra: str) -> dict:
    cmd = [sys.executable, str(BENCH / name), "--quick", "--output", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stem = name.removesuffix(".py") + "_quick"
    if name == "quality.py":
        stem = "quality_wikitext2_quick"
    data = json.loads((out / f"{stem}.json").read_text())
    assert (out / f"{stem}.md").read_text().count("|") > 10
    for key in ("machine", "torch", "transformers", "command"):
        assert data["machine"][key]
    return data


@pytest.mark.parametrize("script", ["speed.py", "memory.py", "checkpoints.py", "quality.py"])
def test_help(script, monkeypatch, capsys):
    """--help works (in this process: four interpreter start-ups would cost more than the quick runs)."""
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(BENCH / script), run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--output" in out


def test_speed_quick(tmp_path):
    data = run_script("speed.py", tmp_path)
    rows = {r["row"]: r for r in data["steps"]}
    assert "identity / share" in rows and any("follow" in r for r in rows)
    for r in rows.values():
        assert 0.05 < r["ratio_median_of_pairs"] < 20 and r["steps"] >= 4
    assert {r["reward_source"] for r in data["trainer"]} == {"train_batch", "eval_batch"}
    for r in data["trainer"]:
        assert 0 <= r["decide_share_qlearning_pct"] < 100 and r["decisions"] >= 1


def test_memory_quick(tmp_path):
    data = run_script("memory.py", tmp_path, "--in-process")
    rows = {r["map"]: r for r in data["rows"]}
    assert rows["stock"]["measured_bytes"] == rows["untied"]["measured_bytes"]
    for r in rows.values():
        assert r["within_5pct"], r
        assert r["peak_rss_bytes"] > 0
    assert rows["all shared"]["measured_bytes"] < rows["50% tied"]["measured_bytes"] < rows["untied"]["measured_bytes"]
    untied, tied, untied_again = data["retie"]
    assert tied["measured_bytes"] < untied["measured_bytes"] == untied_again["measured_bytes"]
    for r in data["retie"]:
        assert abs(r["measured_over_min"] - 1) < 0.05


def test_memory_fsdp_quick(tmp_path):
    """--fsdp: per-rank state under FSDP2 is the roots-only analytic figure / world (within 5%, padding), half
    of DDP's at world 2, for the tied map and the identity."""
    cmd = [sys.executable, str(BENCH / "memory.py"), "--quick", "--fsdp", "--output", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "memory_fsdp_quick.json").read_text())
    rows = {(r["map"], r["engine"]): r for r in data["rows"]}
    assert data["world"] == 2 and len(rows) == 4
    for key in (("5 roots", "FSDP2"), ("identity", "FSDP2")):
        assert abs(rows[key]["over_min"] - 1) < 0.05, rows[key]
        assert 1.8 < rows[key]["ddp_over_this"] < 2.05, rows[key]
    assert rows[("5 roots", "FSDP2")]["state_MiB"] < rows[("identity", "FSDP2")]["state_MiB"]


def test_checkpoints_quick(tmp_path):
    data = run_script("checkpoints.py", tmp_path)
    rows = {r["map"]: r for r in data["rows"]}
    for r in rows.values():
        assert r["compact_reloads_same_logits"]
        assert abs(r["tensor_bytes_over_analytic"] - 1) < 0.01, r
    assert rows["all shared"]["compact_bytes"] < rows["untied"]["compact_bytes"]
    assert rows["all shared"]["expanded_bytes"] == rows["untied"]["expanded_bytes"]


@pytest.mark.skipif(not (SHARED / "data/wikitext-2/valid.txt").exists(), reason="../shared/data/wikitext-2 missing")
def test_quality_quick(tmp_path):
    data = run_script("quality.py", tmp_path, "--rows", "untied,dlt_improved_share,sequence")
    rows = {r["row"]: r for r in data["rows"]}
    assert set(rows) == {"untied", "dlt_improved_share", "sequence"}
    for r in rows.values():
        assert math.isfinite(r["test_ppl"]) and 1 < r["test_ppl"] < 1e4
        assert 1 <= r["mean_unique_layers"] <= r["num_layers"]
        assert r["eval_curve"] and r["training_state_bytes"] > 0
    assert rows["untied"]["mean_unique_layers"] == rows["untied"]["num_layers"]
    # tied positions still count in the model's total (as if untied), whatever the final map
    assert len({r["total_parameters"] for r in rows.values()}) == 1
    assert rows["sequence"]["final_unique_layers"] == data["meta"]["unique_layers"]
    assert (tmp_path / "quality_wikitext2_quick_eval_ppl.png").exists()
    assert (tmp_path / "quality_wikitext2_quick_dlt_improved_share_tie_map.png").exists()


@pytest.mark.skipif(not (SHARED / "data/wikitext-2/valid.txt").exists(), reason="../shared/data/wikitext-2 missing")
def test_quality_quick_mlm(tmp_path):
    cmd = [sys.executable, str(BENCH / "quality.py"), "--quick", "--task", "mlm", "--rows", "dlt_improved_share",
           "--output", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = json.loads((tmp_path / "quality_wikitext2_mlm_quick.json").read_text())["rows"][0]
    assert math.isfinite(row["test_ppl"]) and 1 < row["test_ppl"] < 1e4


def test_structure_cost_quick(tmp_path):
    """Every structure event keeps the training state at the analytic roots-only figure (no leaked copies)."""
    data = run_script("structure_cost.py", tmp_path)
    kinds = {r["event"] for r in data["rows"]}
    assert kinds == {"untie (grow split)", "tie, merge=discard", "tie, merge=average"}
    for r in data["rows"]:
        assert abs(r["state_over_analytic_min"] - 1.0) < 1e-3 and r["median_event_s"] > 0


@pytest.mark.skipif(not (SHARED / "data" / "tinyshakespeare" / "input.txt").exists(),
                    reason="needs ../shared/data/tinyshakespeare/input.txt (see shared/README.md)")
def test_controller_cost_quick(tmp_path):
    data = run_script("controller_cost.py", tmp_path)
    summary = data["summary"]
    assert summary["candidates"] > 0 and summary["forward_per_candidate_s"] > 0
    assert 0.5 < summary["median_time_ratio"] < 10 and all(p["decisions"] >= 1 for p in data["pairs"])
