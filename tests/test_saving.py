"""Saves that lose nothing (``training/saving.py``): a save that fails half way leaves the folder's earlier
files whole, and a disk that fills during a checkpoint or the final save is one line naming what is whole."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import CLM, clm_args, digest, run_in_process, script_error, tiny_model
from helpers import short_args as make_args  # 8 steps, logged one by one: the fault tests' run
from helpers import short_blocks as byte_blocks
from hf_dyntie.training.saving import DiskFullError
from hf_dyntie.training.trainer import DynTieTrainer


def test_an_interrupted_save_leaves_the_previous_files_whole(tmp_path, monkeypatch):
    """A save that fails half way (here: after config.json, before the weights) changes nothing in the folder:
    the files are written beside it and renamed in only when the whole save succeeded."""
    from transformers import Trainer

    args = make_args(tmp_path / "run", max_steps=2, tie_policy="sequence", tie_unique_layers=2)
    trainer = DynTieTrainer(model=tiny_model(), args=args, train_dataset=byte_blocks())
    trainer.save_model()
    before = digest(tmp_path / "run")
    stock_save = Trainer._save

    def dies_half_way(self, output_dir=None, state_dict=None):
        self.model.config.save_pretrained(output_dir)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Trainer, "_save", dies_half_way)
    trainer.dyntie_model.config.tie_map = [0, 1, 2, 3]  # what a half-written config.json would now say
    with pytest.raises(OSError, match="No space left"):
        trainer.save_model()
    monkeypatch.setattr(Trainer, "_save", stock_save)
    assert digest(tmp_path / "run") == before
    assert not list((tmp_path / "run").glob(".saving-*"))


def test_a_disk_that_fills_during_a_save_is_one_line_and_the_run_resumes(corpus, tmp_path, capsys, monkeypatch):
    """torch's own words for a full disk while checkpoint-4 is written: one line (exit 4) naming the whole
    checkpoint-2, the half-written checkpoint-4 removed, and the resume from checkpoint-2 finishing the run."""
    out = tmp_path / "out"
    real_save = torch.save

    def disk_fills_at_step_4(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\n"
                               "PytorchStreamWriter failed writing file data/0: file write failed")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_fills_at_step_4)
    argv = clm_args(corpus, out, "--save_strategy", "steps", "--save_steps", "2", "--max_steps", "4")
    assert run_in_process(CLM, argv) == 4
    line = script_error(capsys)
    assert "the disk filled while saving checkpoint 4" in line and "(the last: " in line, line
    assert line.rstrip().endswith("resume with --resume_from_checkpoint last") and "checkpoint-2" in line, line
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    monkeypatch.undo()
    assert run_in_process(CLM, argv + ["--resume_from_checkpoint", "last"]) == 0
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4


def test_a_disk_that_fills_during_the_final_save_names_what_is_whole(tmp_path, monkeypatch):
    args = make_args(tmp_path / "run", max_steps=2, tie_policy="sequence", tie_unique_layers=2,
                     save_strategy="steps", save_steps=2)
    trainer = DynTieTrainer(model=tiny_model(), args=args, train_dataset=byte_blocks())
    trainer.train()
    before = digest(tmp_path / "run")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    import transformers.modeling_utils

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    with pytest.raises(DiskFullError, match=r"while saving the model .*/checkpoint-2 holds the model of step 2"):
        trainer.save_model()
    assert digest(tmp_path / "run") == before
