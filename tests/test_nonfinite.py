"""A diverged run stops: the first non-finite training loss ends training in one line that names the step, the
last checkpoint and what to change (``tie_max_nonfinite`` tolerates a few, skipping their updates), and the
scripts exit 3 without saving a model. (The policies' side: test_qlearning.py.)"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from helpers import CLM, clm_args, run_in_process, script_error, tiny_model, warnings_logged
from helpers import short_args as make_args  # 8 steps, logged one by one: the fault tests' run
from helpers import short_blocks as byte_blocks
from hf_dyntie.training.nonfinite import NonFiniteLossError
from hf_dyntie.training.trainer import DynTieTrainer


# ---- helpers --------------------------------------------------------------------------------------------------


def all_finite(tensors) -> bool:
    return all(torch.isfinite(t).all() for t in tensors)


class NaNLossTrainer(DynTieTrainer):
    """A trainer whose training loss is NaN at the optimizer steps in ``nan_steps`` (0-based global step):
    a bad batch, as an overflow in the forward pass gives one."""

    nan_steps: set[int] = set()

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        if self.state.global_step in self.nan_steps and model.training:
            loss = loss * float("nan")
        return loss


class Snapshots(TrainerCallback):
    """The model's weights after every optimizer step."""

    def __init__(self):
        self.trainer = None
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, **kwargs):
        model = self.trainer.dyntie_model
        self.after[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- the trainer stops, or skips a tolerated few --------------------------------------------------------------


def test_first_nonfinite_loss_stops_training_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = make_args(out, save_strategy="steps", save_steps=2)
    trainer = NaNLossTrainer(model=tiny_model(), args=args, train_dataset=byte_blocks())
    trainer.nan_steps = {4}
    with pytest.raises(NonFiniteLossError) as info:
        trainer.train()
    message = str(info.value)
    assert "\n" not in message
    assert "training loss is nan at optimizer step 5" in message
    assert f"the last checkpoint is {out / 'checkpoint-4'}" in message
    assert "learning_rate (now 0.003)" in message and "max_grad_norm" in message
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert all_finite(load_file(out / "checkpoint-4" / "model.safetensors").values())
    assert not (out / "model.safetensors").exists()  # nothing saved as the result
    assert trainer.state.global_step == 4  # the bad step made no update
    assert all_finite(trainer.dyntie_model.parameters())


def test_tolerated_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path, caplog):
    snapshots = Snapshots()
    trainer = NaNLossTrainer(
        model=tiny_model(), args=make_args(tmp_path / "a", tie_max_nonfinite=3), train_dataset=byte_blocks(),
        callbacks=[snapshots],
    )  # fmt: skip
    snapshots.trainer = trainer
    trainer.nan_steps = {2, 5}
    caplog.clear()
    trainer.train()  # two bad steps of three allowed: the run finishes
    messages = warnings_logged(caplog)
    assert trainer.state.global_step == 8
    assert all_finite(trainer.dyntie_model.parameters())
    skipped = [m for m in messages if "skipping its update" in m]
    assert len(skipped) == 2 and "optimizer step 3" in skipped[0] and "1 of tie_max_nonfinite=3" in skipped[0]
    # a skipped step leaves every weight as it was (the tie map may change at a decision, not the weights)
    for step in (3, 6):  # global_step after the skipped steps 2 and 5
        before, after = snapshots.after[step - 1], snapshots.after[step]
        for key in before:
            assert torch.equal(before[key], after[key]), (step, key)

    trainer = NaNLossTrainer(model=tiny_model(), args=make_args(tmp_path / "b", tie_max_nonfinite=3),
                             train_dataset=byte_blocks())
    trainer.nan_steps = {1, 3, 6}
    with pytest.raises(NonFiniteLossError, match=r"step 7 \(non-finite step 3 of tie_max_nonfinite=3\)"):
        trainer.train()


def test_tie_max_nonfinite_zero_keeps_the_stock_behaviour(tmp_path):
    trainer = NaNLossTrainer(model=tiny_model(), args=make_args(tmp_path, tie_max_nonfinite=0, max_steps=4),
                             train_dataset=byte_blocks())
    trainer.nan_steps = {2}
    trainer.train()  # no stop: the NaN update goes through, as with transformers' Trainer
    assert not all_finite(trainer.dyntie_model.parameters())
    with pytest.raises(ValueError, match="tie_max_nonfinite"):
        make_args(tmp_path, tie_max_nonfinite=-1)


# ---- the scripts: exit 3, one line, no model ------------------------------------------------------------------


def test_diverged_script_run_exits_3_with_one_line_and_saves_no_model(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    code = run_in_process(CLM, clm_args(corpus, out, "--learning_rate", "1e30"))
    assert code == 3
    line = script_error(capsys)
    assert line.startswith("error: training loss is nan at optimizer step "), line
    assert "learning_rate (now 1e+30)" in line and "max_grad_norm" in line
    for name in ("model.safetensors", "README.md", "all_results.json"):
        assert not (out / name).exists(), name
