"""Resuming (``training/checkpoints.py``): which checkpoint a run resumes from, and the resumes refused in one
line before anything is touched: a checkpoint lacking root weights, optimizer or schedule state, a lower budget,
a checkpoint already at the run's last step. (Exact resumes: test_trainer.py.)"""

from __future__ import annotations

import json
import logging
import time

import pytest
from safetensors.torch import load_file

from helpers import CLM, checkpointed_run, digest, run_in_process, script_error, tiny_model
from helpers import replace_flag as _replace
from helpers import short_args as make_args  # 8 steps, logged one by one: the fault tests' run
from helpers import short_blocks as byte_blocks
from hf_dyntie.training.checkpoints import CheckpointError
from hf_dyntie.training.trainer import DynTieTrainer


# ---- the trainer ----------------------------------------------------------------------------------------------


def test_resume_true_means_the_latest_checkpoint(tmp_path):
    args = make_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    DynTieTrainer(model=tiny_model(), args=args, train_dataset=byte_blocks()).train()
    args = make_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=2)
    trainer = DynTieTrainer(model=tiny_model(), args=args, train_dataset=byte_blocks())
    trainer.train(resume_from_checkpoint="True")  # how a command line spells it
    assert trainer.state.global_step == 6 and trainer._last_checkpoint.endswith("checkpoint-6")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        DynTieTrainer(model=tiny_model(), args=make_args(tmp_path / "empty"), train_dataset=byte_blocks()).train(True)


def test_resume_refuses_a_checkpoint_lacking_root_weights(tmp_path):
    args = make_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, tie_policy="untied")
    DynTieTrainer(model=tiny_model(), args=args, train_dataset=byte_blocks()).train()
    checkpoint = tmp_path / "checkpoint-2"
    state = json.loads((checkpoint / "dyntie_state.json").read_text())
    # the saved map trains layer 2 on its own, but the weights lack it (as from a compact save of another map)
    weights = load_file(checkpoint / "model.safetensors")
    from safetensors.torch import save_file

    save_file({k: v for k, v in weights.items() if not k.startswith("transformer.h.2.")},
              checkpoint / "model.safetensors", metadata={"format": "pt"})
    assert state["tie_map"][2] == 2
    before = digest(checkpoint)
    trainer = DynTieTrainer(model=tiny_model(), args=make_args(tmp_path, max_steps=4, tie_policy="untied"),
                            train_dataset=byte_blocks())
    started = time.monotonic()
    with pytest.raises(CheckpointError, match=r"lacks the weights of layer\(s\) \[2\]"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert time.monotonic() - started < 30
    assert digest(checkpoint) == before


# ---- the scripts ----------------------------------------------------------------------------------------------


def test_resume_last_skips_an_incomplete_checkpoint_and_says_so(corpus, tmp_path, caplog):
    out = tmp_path / "out"
    base = checkpointed_run(corpus, out)
    (out / "checkpoint-4" / "model.safetensors").write_bytes(b"")  # a save cut short
    (out / "checkpoint-4" / "trainer_state.json").unlink()
    with caplog.at_level(logging.WARNING):
        assert run_in_process(CLM, base + ["--max_steps", "6", "--resume_from_checkpoint", "last"]) == 0
    assert any("resuming from" in r.getMessage() and "checkpoint-2" in r.getMessage() and "incomplete" in r.getMessage()
               for r in caplog.records)
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6


@pytest.mark.parametrize("lost", ["optimizer.pt", "scheduler.pt"])
def test_resume_without_optimizer_or_schedule_stops_unless_allowed(lost, corpus, tmp_path, capsys):
    """A resume that would silently restart AdamW's moments or the schedule is refused in one line naming the
    flag; with --resume_allow_partial it runs."""
    out = tmp_path / "out"
    base = checkpointed_run(corpus, out)
    (out / "checkpoint-4" / lost).unlink()
    resume = base + ["--max_steps", "6", "--resume_from_checkpoint", str(out / "checkpoint-4")]
    capsys.readouterr()
    assert run_in_process(CLM, resume) == 2
    line = script_error(capsys)
    what = "optimizer state" if lost == "optimizer.pt" else "learning-rate schedule"
    assert what in line and "--resume_allow_partial" in line, line
    assert run_in_process(CLM, resume + ["--resume_allow_partial"]) == 0


def test_resume_with_a_lower_budget_is_refused_in_one_line(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    base = checkpointed_run(corpus, out, "--tie_policy", "grow", "--tie_budget", "3", "--tie_interval", "1")
    capsys.readouterr()
    argv = _replace(base, "--tie_budget", "2") + ["--max_steps", "6", "--resume_from_checkpoint", "last"]
    assert run_in_process(CLM, argv) == 2
    assert "more than this run's tie_budget 2" in script_error(capsys)


def test_resume_from_the_final_checkpoint_stops_cleanly_and_keeps_the_model(corpus, tmp_path, capsys):
    """The stock Trainer would train one step past the end and overwrite the final model: refused in one line
    (the files untouched); raising --max_steps trains on from it."""
    out = tmp_path / "out"
    base = checkpointed_run(corpus, out)  # max_steps 4, a checkpoint at 4
    before = digest(out)
    capsys.readouterr()
    assert run_in_process(CLM, base + ["--resume_from_checkpoint", "last"]) == 2
    line = script_error(capsys)
    assert "checkpoint-4 is at step 4, the end of this run (4 steps)" in line and "--max_steps" in line, line
    assert digest(out) == before
    trainer = DynTieTrainer(model=tiny_model(), args=make_args(tmp_path / "t", max_steps=2, save_strategy="steps",
                                                               save_steps=2),
                            train_dataset=byte_blocks())
    trainer.train()
    with pytest.raises(CheckpointError, match="at step 2, the end of this run"):
        trainer.train(resume_from_checkpoint=True)
    assert run_in_process(CLM, base + ["--max_steps", "6", "--resume_from_checkpoint", "last"]) == 0
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6
