"""The scripts' ``--output_dir`` (``scripts/output_dir.py``): a folder holding another run is refused, resumed
or cleared as asked, and nothing in it is deleted before the new run's flags are known to be good."""

from __future__ import annotations

import json

from helpers import CLM, checkpointed_run, clm_args, digest, run_in_process, script_error


def test_output_dir_of_another_run_is_refused_resumed_or_cleared(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    base = clm_args(corpus, out, "--save_strategy", "steps", "--save_steps", "2", "--max_steps", "4")
    assert run_in_process(CLM, base) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    before = digest(out)

    capsys.readouterr()
    assert run_in_process(CLM, base) == 2  # a second run into the same folder
    line = script_error(capsys)
    assert "holds checkpoints of an earlier run (checkpoint-2, checkpoint-4)" in line, line
    assert "--resume_from_checkpoint last" in line and "--overwrite_output_dir" in line
    assert digest(out) == before

    assert run_in_process(CLM, base + ["--max_steps", "6", "--resume_from_checkpoint", "last"]) == 0
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6
    after = digest(out)
    assert {k: v for k, v in after.items() if k.startswith("checkpoint-2/")} == \
        {k: v for k, v in before.items() if k.startswith("checkpoint-2/")}  # continued, not started over

    assert run_in_process(CLM, base + ["--max_steps", "2", "--overwrite_output_dir"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2


def test_a_refused_overwrite_deletes_nothing(corpus, tmp_path, capsys):
    """--overwrite_output_dir with a bad flag: the flag is refused before anything is deleted."""
    out = tmp_path / "out"
    base = checkpointed_run(corpus, out)
    before = digest(out)
    assert run_in_process(CLM, base + ["--overwrite_output_dir", "--tie_init", "0,0,1"]) == 2
    assert "tie_map has length 3" in script_error(capsys)
    assert digest(out) == before


def test_a_finished_run_is_refused_and_a_failed_overwrite_keeps_it(corpus, tmp_path, capsys):
    """A folder holding a finished run is refused without --overwrite_output_dir; with it, a run that diverges
    leaves every file of the earlier run byte-identical (its tie history included)."""
    out = tmp_path / "out"
    base = clm_args(corpus, out, "--max_steps", "4")
    assert run_in_process(CLM, base) == 0
    before = digest(out)
    assert before["tie_history.jsonl"] and before["model.safetensors"]
    capsys.readouterr()
    assert run_in_process(CLM, base) == 2
    line = script_error(capsys)
    assert "holds a finished run" in line and "config.json" in line and "--overwrite_output_dir" in line
    assert run_in_process(CLM, base + ["--overwrite_output_dir", "--learning_rate", "1e30"]) == 3
    after = digest(out)
    assert {k: after.get(k) for k in before} == before
